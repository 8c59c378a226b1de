"""Drawing detections and training curves."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import cv2
import numpy as np


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
