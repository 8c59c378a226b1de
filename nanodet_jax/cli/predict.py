"""Detect objects in images, videos and a camera: a Python API and a command line.

    nanodet-predict --config configs/nanodet_plus_m_416.py \
        --torch-weights nanodet-plus-m_416.pth --out-dir preds IMAGE_OR_FOLDER [...]

writes ``preds/<image>.jpg`` with the boxes drawn and ``preds/predictions.json``
(per image: boxes in original pixels, scores, class ids and names). An image that cannot
be read (missing, truncated, undecodable) is skipped with a warning naming it, and listed
with its problem in ``preds/skipped.json`` (an empty list when none was).

A video file among the inputs (``.mp4``, ``.avi``, ...; :mod:`nanodet_jax.evaluation.video`)
gives ``preds/<video>.<ext>`` with the boxes drawn (same size and fps) and
``preds/<video>.json`` (per frame: its detections, as for an image); ``--camera INDEX``
reads a camera until Ctrl-C into ``preds/camera<INDEX>.mp4`` and ``.json``.

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

from nanodet_jax import paths
from nanodet_jax.cli import common as cli
from nanodet_jax.config.loading import load_config, split_overrides
from nanodet_jax.data.coco import ImageReadError, read_image
from nanodet_jax.evaluation import video
from nanodet_jax.evaluation.predictor import Detections, Predictor
from nanodet_jax.evaluation.visualize import draw_detections, write_image
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
    found = []
    for item in inputs:
        if paths.isdir(item):
            found += sorted(
                paths.join(item, f)
                for f in paths.listdir(item)
                if f.lower().endswith(IMAGE_EXTENSIONS)
            )
        else:
            found.append(item)
    return found


def detections_json(path: str, det: Detections, class_names: Sequence[str]) -> dict:
    return {"file": path, "detections": det.to_json(class_names)}


def predict_paths(
    predictor: Predictor, image_files: Sequence[str], out_dir: str, score_thr: float = 0.35
) -> list[dict]:
    """Run on image files; write drawn images, predictions.json and skipped.json (the
    unreadable files, ``{"file", "error"}`` each) into ``out_dir``."""
    paths.makedirs(out_dir)
    records, skipped = [], []
    for path in image_files:
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
        write_image(paths.join(out_dir, os.path.basename(path)), drawn)
        records.append(detections_json(path, det, predictor.class_names))
        kept = sum(s > score_thr for s in det.scores)
        names = sorted({predictor.class_names[int(lbl)] for lbl, s in zip(det.labels, det.scores)
                        if s > score_thr})  # fmt: skip
        log.info(f"{path}: {kept} objects above {score_thr}: {', '.join(names) or '-'}")
    paths.write_text(paths.join(out_dir, "predictions.json"), json.dumps(records, indent=1))
    # Beside predictions.json, whose list stays one entry per predicted image; written
    # even when empty, so that one from an earlier run in the same folder cannot mislead.
    paths.write_text(paths.join(out_dir, SKIPPED_JSON), json.dumps(skipped, indent=1))
    return records


def fourcc_arg(text: str) -> str:
    if len(text) != 4:
        raise argparse.ArgumentTypeError(f"a codec is 4 characters (mp4v, MJPG), not {text!r}")
    return text


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a number of frames, 1 or more, not {text!r}")
    return int(text)


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "inputs", nargs="*", help="image files or folders, video files (.mp4, .avi, ...)"
    )
    p.add_argument("--config", required=True)
    cli.add_weight_args(p)
    p.add_argument("--out-dir", default="predictions")
    p.add_argument("--score-thr", type=float, default=0.35, help="drawing threshold")
    p.add_argument("--camera", type=int, metavar="INDEX", help="read camera INDEX until Ctrl-C")
    p.add_argument("--fourcc", type=fourcc_arg,
                   help="codec of the written videos (default: mp4v; MJPG for .avi)")  # fmt: skip
    p.add_argument(
        "--max-frames", type=positive_int, help="stop each video / the camera after N frames"
    )
    p.add_argument("--show", action="store_true", help="also show the frames in a window")
    others, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(others)
    if not args.inputs and args.camera is None:
        p.error("give image files, folders, video files or --camera INDEX")
    cli.start()
    config = cli.read_config(args.config, overrides)
    cli.check_data_config(config)
    videos = [i for i in args.inputs if video.is_video(i)]
    images = image_paths([i for i in args.inputs if not video.is_video(i)])
    if len(videos) < len(args.inputs) and not images:
        p.error("no images found in the given inputs")
    # Every video and the camera opened, the codec tried and --show checked before the
    # model is built: a mistake costs no compile.
    paths.makedirs(args.out_dir)
    sources = [video.video_source(v, args.out_dir) for v in videos]
    if args.camera is not None:
        sources.append(video.camera_source(args.camera, args.out_dir))
    for src in sources:
        video.check_writer(src.video_path, args.fourcc or video.default_fourcc(src.video_path))
    if args.show and sources:
        video.check_gui()
    predictor = predictor_from_config(config, args.torch_weights, args.checkpoint, args.step)
    if images:
        records = predict_paths(predictor, images, args.out_dir, args.score_thr)
        skipped = len(images) - len(records)
        note = f" (skipped {skipped} unreadable, listed in {SKIPPED_JSON})" if skipped else ""
        print(f"wrote {len(records)} drawn images and predictions.json to {args.out_dir}{note}")
    for src in sources:
        if src.name.startswith("camera"):
            log.info(f"{src.name}: press Ctrl-C{' (or q in the window)' if args.show else ''} "
                     "to stop")  # fmt: skip
        result = video.run_stream(
            predictor, src.capture, src.name, src.video_path, src.json_path, args.fourcc,
            args.score_thr, args.max_frames, args.show,
        )  # fmt: skip
        print(f"wrote {src.video_path} ({len(result.frames)} frames, {result.end}) and "
              f"{src.json_path}")  # fmt: skip
        if result.end == video.CTRL_C:  # the user wants to stop, not the next video
            break


if __name__ == "__main__":
    main()
