"""Drawing detections and training curves."""

from __future__ import annotations

import colorsys
import io
import os
from collections.abc import Sequence

import cv2
import numpy as np

from nanodet_jax import paths


def class_color(label: int) -> tuple[int, int, int]:
    """A stable, well-separated BGR colour per class (golden-ratio hue steps)."""
    hue = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return int(b * 255), int(g * 255), int(r * 255)


def draw_detections(
    img: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    score_thr: float = 0.35,
) -> np.ndarray:
    """A copy of the BGR image with boxes and ``name:score%`` tags; low scores drawn first."""
    out = img.copy()
    font = cv2.FONT_HERSHEY_SIMPLEX
    for i in np.argsort(scores, kind="stable"):
        if scores[i] <= score_thr:
            continue
        x0, y0, x1, y1 = (int(v) for v in boxes[i])
        color = class_color(int(labels[i]))
        text = f"{class_names[int(labels[i])]}:{scores[i] * 100:.1f}%"
        (tw, th), _ = cv2.getTextSize(text, font, 0.5, 1)
        text_color = (0, 0, 0) if sum(color) / 3 > 127 else (255, 255, 255)
        cv2.rectangle(out, (x0, y0), (x1, y1), color, 2)
        top = max(y0, th + 2)  # keep the tag inside the image
        cv2.rectangle(out, (x0, top - th - 2), (x0 + tw + 2, top), color, -1)
        cv2.putText(out, text, (x0 + 1, top - 2), font, 0.5, text_color, 1, cv2.LINE_AA)
    return out


def write_image(path: str, img: np.ndarray) -> None:
    """``cv2.imwrite`` through the path layer (a ``gs://`` out-dir too): the same bytes,
    encoded in memory in the format the name's extension gives."""
    ok, data = cv2.imencode(os.path.splitext(path)[1], img)
    if not ok:
        raise ValueError(f"{path}: OpenCV cannot encode an image with this extension")
    paths.write_bytes(path, data.tobytes())


def plot_training_curves(records: Sequence[dict], path: str) -> None:
    """Loss terms, learning rate and val mAP against the step, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in train]
    # Every loss term the detector logs (NanoDet-Plus: loss_qfl, ..., aux_loss_*; FCOS:
    # its own names), the total first.
    keys = sorted((k for k in (train[0] if train else {}) if k.startswith(("loss", "aux_loss"))),
                  key=lambda k: (k != "loss", k))  # fmt: skip
    for key in keys:
        axes[0].plot(steps, [r.get(key, float("nan")) for r in train], label=key)
    axes[0].set(title="training loss", xlabel="step")
    if keys:
        axes[0].legend(fontsize=8)
    if train and "lr" in train[0]:
        axes[1].plot(steps, [r["lr"] for r in train])
    axes[1].set(title="learning rate", xlabel="step")
    if evals:
        axes[2].plot([r["step"] for r in evals], [r["AP"] for r in evals], "o-", label="mAP")
        axes[2].plot([r["step"] for r in evals], [r["AP50"] for r in evals], "s--", label="AP50")
        axes[2].legend(fontsize=8)
    axes[2].set(title="val (EMA weights)", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    paths.write_atomic(path, buf.getvalue())  # rewritten at each evaluation
