"""Detect objects in images: a Python API and a command line.

    nanodet-predict --config configs/nanodet_plus_m_416.py \
        --torch-weights nanodet-plus-m_416.pth --out-dir preds IMAGE_OR_FOLDER [...]

writes ``preds/<image>.jpg`` with the boxes drawn and ``preds/predictions.json``
(per image: boxes in original pixels, scores, class ids and names). An image that cannot
be read (missing, truncated, undecodable) is skipped with a warning naming it, and listed
with its problem in ``preds/skipped.json`` (an empty list when none was).

Python::

    predictor = load_predictor("configs/nanodet_plus_m_416.py", torch_weights="x.pth")
    [det] = predictor([cv2.imread("bus.jpg")])   # Detections(boxes, scores, labels)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import cv2

from nanodet_jax.cli import common as cli
from nanodet_jax.config.loading import load_config, split_overrides
from nanodet_jax.data.coco import ImageReadError, read_image
from nanodet_jax.evaluation.predictor import Detections, Predictor
from nanodet_jax.evaluation.visualize import draw_detections
from nanodet_jax.models import build_model

log = logging.getLogger("nanodet_jax")
SKIPPED_JSON = "skipped.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def load_predictor(
    config_path: str,
    torch_weights: str | None = None,
    checkpoint_dir: str | None = None,
    overrides: Sequence[str] = (),
    step: int | None = None,
) -> Predictor:
    """A Predictor for a config file and weights (exactly one of the two sources)."""
    return predictor_from_config(
        load_config(config_path, overrides), torch_weights, checkpoint_dir, step
    )


def predictor_from_config(
    config: Any,
    torch_weights: str | None = None,
    checkpoint_dir: str | None = None,
    step: int | None = None,
) -> Predictor:
    """:func:`load_predictor` for a loaded config."""
    if (torch_weights is None) == (checkpoint_dir is None):
        raise ValueError("give exactly one of torch_weights or checkpoint_dir")
    model = build_model(config, with_aux=False)
    source = argparse.Namespace(torch_weights=torch_weights, checkpoint=checkpoint_dir, step=step)
    cli.load_weights(model, source)
    return Predictor(model, config)


def image_paths(inputs: Sequence[str]) -> list[str]:
    """Files as given; folders expanded to their images (sorted)."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(
                os.path.join(item, f)
                for f in os.listdir(item)
                if f.lower().endswith(IMAGE_EXTENSIONS)
            )
        else:
            paths.append(item)
    return paths


def detections_json(path: str, det: Detections, class_names: Sequence[str]) -> dict:
    return {
        "file": path,
        "detections": [
            {"box_xyxy": [round(v, 2) for v in box], "score": round(score, 4),
             "class_id": label, "class_name": class_names[label]}
            for box, score, label in zip(det.boxes.tolist(), det.scores.tolist(),
                                         det.labels.tolist())
        ],
    }  # fmt: skip


def predict_paths(
    predictor: Predictor, paths: Sequence[str], out_dir: str, score_thr: float = 0.35
) -> list[dict]:
    """Run on image files; write drawn images, predictions.json and skipped.json (the
    unreadable files, ``{"file", "error"}`` each) into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    records, skipped = [], []
    for path in paths:
        try:
            img = read_image(path)
        except ImageReadError as err:  # one bad file in a folder must not cost the rest
            log.warning(f"skipping {err}")
            skipped.append({"file": path, "error": str(err)})
            continue
        [det] = predictor([img])
        drawn = draw_detections(
            img, det.boxes, det.scores, det.labels, predictor.class_names, score_thr
        )
        cv2.imwrite(os.path.join(out_dir, os.path.basename(path)), drawn)
        records.append(detections_json(path, det, predictor.class_names))
        kept = sum(s > score_thr for s in det.scores)
        names = sorted({predictor.class_names[int(lbl)] for lbl, s in zip(det.labels, det.scores)
                        if s > score_thr})  # fmt: skip
        log.info(f"{path}: {kept} objects above {score_thr}: {', '.join(names) or '-'}")
    with open(os.path.join(out_dir, "predictions.json"), "w") as f:
        json.dump(records, f, indent=1)
    # Beside predictions.json, whose list stays one entry per predicted image; written
    # even when empty, so that one from an earlier run in the same folder cannot mislead.
    with open(os.path.join(out_dir, SKIPPED_JSON), "w") as f:
        json.dump(skipped, f, indent=1)
    return records


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--config", required=True)
    cli.add_weight_args(p)
    p.add_argument("--out-dir", default="predictions")
    p.add_argument("--score-thr", type=float, default=0.35, help="drawing threshold")
    others, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(others)
    cli.start()
    config = cli.read_config(args.config, overrides)
    cli.check_data_config(config)
    predictor = predictor_from_config(config, args.torch_weights, args.checkpoint, args.step)
    paths = image_paths(args.inputs)
    if not paths:
        p.error("no images found in the given inputs")
    records = predict_paths(predictor, paths, args.out_dir, args.score_thr)
    skipped = len(paths) - len(records)
    note = f" (skipped {skipped} unreadable, listed in {SKIPPED_JSON})" if skipped else ""
    print(f"wrote {len(records)} drawn images and predictions.json to {args.out_dir}{note}")


if __name__ == "__main__":
    main()
