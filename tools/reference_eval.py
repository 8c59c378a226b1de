"""COCO evaluation of a NanoDet-Plus model with the PyTorch reference's OWN val pipeline.

Usage (from the repository root, with torch installed)::

    python tools/reference_eval.py /path/to/nanodet \\
        --config configs/nanodet_plus_m_416.py --weights nanodet-plus-m_416.pth \\
        --ann data/coco/annotations/instances_val2017.json --img-dir data/coco/val2017 \\
        [--batch-size 8] [--workers 0] [--out-json dets.json] [--save-raw raw.npz] \\
        [--save-inputs] [--golden tests/data/golden_coco_tiny.json.gz]
        [--config.a.b=value ...]

``/path/to/nanodet`` is a checkout of RangiLyu/nanodet; everything on the data and
model path is NanoDet's code, driven the way its ``tools/test.py`` / ``TrainingTask``
drive it:

1. ``CocoDataset(mode="val")`` with its ``Pipeline`` (warpPerspective resize to the
   config's ``data.val.input_size``, ``keep_ratio`` as configured, normalize), batched
   with ``naive_collate`` and ``stack_batch_img(divisible=32)``;
2. ``NanoDetPlus`` built from our config's ``model.arch``, loaded from ``--weights``
   (a plain state_dict, or a Lightning/NanoDet checkpoint whose EMA weights are taken)
   with ``strict=False``: only ``aux_fpn.*`` / ``aux_head.*`` (training-only) may be
   missing, nothing may be unexpected;
3. the model's forward and ``head.post_process`` (NMS: ``tools.reference.torch_nms``,
   a stand-in with torchvision's semantics, as torchvision is not installed);
4. ``CocoDetectionEvaluator.results2json`` then pycocotools ``COCOeval`` (exactly the
   steps of the evaluator's ``evaluate``, which only returns 6 of the 12 numbers; its
   mAP is cross-checked against ours).

Prints the 12 COCOeval numbers, mAP and the wall time. ``--out-json`` writes the
detections (COCO results format); ``--save-raw`` writes an npz with, per image id, the
raw head output ``raw/<id>`` [num_priors, num_classes + 4 * (reg_max + 1)] and the
warp matrix ``warp/<id>`` (with ``--save-inputs`` also the network input
``input/<id>``, NHWC float32), plus ``image_ids`` and ``input_hw``.

``--golden FILE`` (``.json`` or ``.json.gz``) merges this run into a golden file for
tests: under ``runs[<config file name>]`` (``opencv_variants[<fingerprint>].runs[...]``
on a machine whose OpenCV warps round differently from the file's ``opencv_warp``,
``tools/opencv_warp.py``) the 12 COCOeval numbers at full precision
(JSON floats round-trip float64 exactly), the weights' and annotations' file names, the image count,
and every detection as a row ``[image_id, category_id, x, y, w, h, score]`` in
results2json order, boxes rounded to ``--golden-box-decimals`` (default 4: 1e-4 px) and
scores to ``--golden-score-decimals`` (default 7); the roundings are recorded. Other
configs' entries already in the file are kept, so the 320 and 416 runs share one file::

    python tools/reference_eval.py /path/to/nanodet --config configs/nanodet_plus_m.py \\
        --weights ../shared/data/weights/nanodet-plus-m_320.pth \\
        --ann ../shared/data/coco_tiny/annotations/instances_val2017.json \\
        --img-dir ../shared/data/coco_tiny/val2017 --golden tests/data/golden_coco_tiny.json.gz
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import io
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from nanodet_jax import runtime  # noqa: E402
from nanodet_jax.config.loading import load_config  # noqa: E402
from nanodet_jax.models.detectors.nanodet_plus import NanoDetPlus  # noqa: E402
from nanodet_jax.weights.pytorch import extract_state_dict  # noqa: E402
from tools import opencv_warp  # noqa: E402
from tools.reference import Reference, load_reference  # noqa: E402

STAT_NAMES = (
    "AP@[.50:.95] all",
    "AP@.50 all",
    "AP@.75 all",
    "AP small",
    "AP medium",
    "AP large",
    "AR@1 all",
    "AR@10 all",
    "AR@100 all",
    "AR@100 small",
    "AR@100 medium",
    "AR@100 large",
)


def build_reference_model(ref: Reference, config: Any, weights: str):
    """NanoDet's NanoDetPlus with ``weights`` loaded (strict except for the aux branch)."""
    import torch

    with contextlib.redirect_stdout(io.StringIO()):  # NanoDet prints while building
        model = ref.build_model(config.model.arch.to_dict())
    raw = torch.load(weights, map_location="cpu", weights_only=True)
    state, which = extract_state_dict(raw, prefer_ema=True)
    result = model.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False
    )
    bad_missing = [k for k in result.missing_keys if not k.startswith(NanoDetPlus.TRAINING_ONLY)]
    if bad_missing or result.unexpected_keys:
        raise SystemExit(
            f"{weights} does not fit the model: missing {bad_missing[:20]} "
            f"(+{max(0, len(bad_missing) - 20)}), unexpected {result.unexpected_keys[:20]}"
        )
    aux_missing = len(result.missing_keys)
    print(
        f"loaded {len(state)} tensors ({which}) from {weights}; "
        f"{aux_missing} aux_fpn/aux_head tensors absent (training only)"
    )
    return model.eval()


def build_val_dataset(ref: Reference, config: Any, ann: str, img_dir: str):
    val = config.data.val
    coco = ref.module("nanodet.data.dataset.coco")
    # NanoDet's COCO class prints while indexing the annotations.
    with contextlib.redirect_stdout(io.StringIO()):
        return coco.CocoDataset(
            img_path=img_dir,
            ann_path=ann,
            input_size=list(val.input_size),
            pipeline=val.pipeline.to_dict(),
            keep_ratio=bool(val.keep_ratio),
            mode="val",
        )


def run_inference(
    ref: Reference,
    model,
    dataset,
    batch_size: int,
    workers: int,
    save_raw: bool,
    save_inputs: bool,
) -> tuple[dict, dict[str, np.ndarray]]:
    """NanoDet's predict loop: returns post_process results and (optionally) raw outputs."""
    import torch

    naive_collate = ref.module("nanodet.data.collate").naive_collate
    stack_batch_img = ref.module("nanodet.data.batch_process").stack_batch_img
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=naive_collate,
        drop_last=False,
    )
    results: dict = {}
    raw: dict[str, np.ndarray] = {}
    image_ids: list[int] = []
    done = 0
    for batch in loader:
        batch["img"] = stack_batch_img(batch["img"], divisible=32)
        with torch.no_grad():
            preds = model(batch["img"])
            results.update(model.head.post_process(preds, batch))
        ids = [int(i) for i in batch["img_info"]["id"]]
        image_ids += ids
        if save_raw:
            raw["input_hw"] = np.asarray(batch["img"].shape[2:], np.int64)
            for j, img_id in enumerate(ids):
                raw[f"raw/{img_id}"] = preds[j].numpy().astype(np.float32)
                raw[f"warp/{img_id}"] = np.asarray(batch["warp_matrix"][j], np.float64)
                if save_inputs:
                    raw[f"input/{img_id}"] = batch["img"][j].permute(1, 2, 0).numpy()
        done += len(ids)
        print(f"\r{done}/{len(dataset)} images", end="", flush=True)
    print()
    if save_raw:
        raw["image_ids"] = np.asarray(image_ids, np.int64)
    return results, raw


def coco_evaluate(ref: Reference, dataset, results: dict) -> tuple[list[dict], np.ndarray, str]:
    """results2json + COCOeval, as ``CocoDetectionEvaluator.evaluate`` does it.

    Returns the detections, the 12 ``COCOeval.stats`` and the printed summary.
    """
    from pycocotools.cocoeval import COCOeval

    evaluator = ref.module("nanodet.evaluator.coco_detection").CocoDetectionEvaluator(dataset)
    dets = evaluator.results2json(results)
    if not dets:
        return dets, np.zeros(12), "no detections"
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dets = dataset.coco_api.loadRes(copy.deepcopy(dets))
    coco_eval = COCOeval(copy.deepcopy(dataset.coco_api), coco_dets, "bbox")
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    stats = np.asarray(coco_eval.stats, np.float64)
    # Cross-check with NanoDet's own evaluator (it writes its json into a directory).
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        own = evaluator.evaluate(results, tmp)
    if abs(own["mAP"] - stats[0]) > 1e-12:
        raise RuntimeError(f"CocoDetectionEvaluator mAP {own['mAP']} != COCOeval {stats[0]}")
    return dets, stats, summary.getvalue()


def reference_commit(ref_path: str) -> str | None:
    """The checked-out commit of the reference (``None`` if it is not a git checkout)."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "-C", ref_path, "rev-parse", "HEAD"], capture_output=True, text=True
        )
    except OSError:
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def cpu_description() -> str:
    """``"<CPU model name>, <n> cores"`` from /proc/cpuinfo where there is one."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores"


def write_golden(
    path: str,
    run: str,
    dets: list[dict],
    stats: np.ndarray,
    info: dict[str, Any],
    box_decimals: int,
    score_decimals: int,
) -> None:
    """Merge one run (stats at full precision, rounded detections) into the golden ``path``."""
    golden: dict[str, Any] = {}
    gz = path.endswith(".gz")
    if os.path.exists(path):
        with open(path, "rb") as f:
            data = f.read()
        golden = json.loads(gzip.decompress(data) if gz else data)
    golden["about"] = (
        "NanoDet's own val pipeline (tools/reference_eval.py --golden): COCOeval stats at "
        "full precision and detections as [image_id, category_id, x, y, w, h, score]"
    )
    golden["stat_names"] = list(STAT_NAMES)
    rows = [
        [
            int(d["image_id"]),
            int(d["category_id"]),
            *(round(float(v), box_decimals) for v in d["bbox"]),
            round(float(d["score"]), score_decimals),
        ]
        for d in dets
    ]
    # Detections depend on how this machine's OpenCV rounds its warps (tools/opencv_warp.py):
    # the file's own runs are for the machine its "opencv_warp" names (before that field,
    # the machine tests/data/golden_augment.npz was recorded on), others go to a variant.
    here = opencv_warp.this_host()
    primary = golden.setdefault(
        "opencv_warp", opencv_warp.recorded() if golden.get("runs") else here
    )
    target = golden
    if here != primary:
        target = golden.setdefault("opencv_variants", {}).setdefault(here, {})
        target["machine"] = cpu_description()
    target.setdefault("runs", {})[run] = {
        **info,
        "stats": [float(v) for v in stats],
        "num_detections": len(rows),
        "box_decimals": box_decimals,
        "score_decimals": score_decimals,
        "detections": rows,
    }
    target["runs"] = dict(sorted(target["runs"].items()))
    data = json.dumps(golden, separators=(",", ":")).encode() + b"\n"
    with open(path, "wb") as f:
        f.write(gzip.compress(data, compresslevel=9, mtime=0) if gz else data)


def main(argv: list[str] | None = None) -> dict:
    runtime.configure_xla()  # the entry points' XLA settings, before any computation
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("ref_path", help="checkout of RangiLyu/nanodet")
    p.add_argument("--config", required=True, help="our config file (configs/...)")
    p.add_argument("--weights", required=True, help=".pth state_dict or NanoDet .ckpt")
    p.add_argument("--ann", required=True, help="COCO instances json")
    p.add_argument("--img-dir", required=True, help="image directory")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--out-json", help="write the detections (COCO results format)")
    p.add_argument("--save-raw", help="write raw head outputs per image id to this npz")
    p.add_argument("--save-inputs", action="store_true", help="with --save-raw: inputs too")
    p.add_argument("--golden", help="merge stats + detections into this .json(.gz) golden")
    p.add_argument("--golden-box-decimals", type=int, default=4)
    p.add_argument("--golden-score-decimals", type=int, default=7)
    args, overrides = p.parse_known_args(argv)
    config = load_config(args.config, overrides)

    import torch

    # NanoDet's prior generation calls torch.meshgrid without ``indexing`` (it means "ij").
    warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ref = load_reference(args.ref_path)
    model = build_reference_model(ref, config, args.weights)
    dataset = build_val_dataset(ref, config, args.ann, args.img_dir)
    if model.head.num_classes != len(dataset.cat_ids):
        raise SystemExit(
            f"model has {model.head.num_classes} classes, {args.ann} {len(dataset.cat_ids)}"
        )
    t1 = time.perf_counter()
    results, raw = run_inference(
        ref, model, dataset, args.batch_size, args.workers, bool(args.save_raw), args.save_inputs
    )
    t2 = time.perf_counter()
    dets, stats, summary = coco_evaluate(ref, dataset, results)
    t3 = time.perf_counter()

    print(summary.rstrip())
    print(f"\n{args.weights} on {len(dataset)} images ({args.ann}):")
    for name, value in zip(STAT_NAMES, stats):
        print(f"  {name:18s} {value:.4f}")
    print(f"mAP = {stats[0]:.4f}  ({len(dets)} detections)")
    print("full precision:", json.dumps([float(v) for v in stats]))
    print(
        f"wall time {t3 - t0:.1f}s: setup {t1 - t0:.1f}s, inference+post-process "
        f"{t2 - t1:.1f}s, COCOeval {t3 - t2:.1f}s"
    )
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(dets, f)
        print(f"wrote {args.out_json}")
    if args.save_raw:
        np.savez(args.save_raw, **raw)
        print(f"wrote {args.save_raw}")
    if args.golden:
        info = {
            "weights": os.path.basename(args.weights),
            "ann": os.path.basename(args.ann),
            "num_images": len(dataset),
            "overrides": list(overrides),
            "reference_commit": reference_commit(args.ref_path),
            "torch": torch.__version__,
        }
        run = os.path.basename(args.config)
        write_golden(
            args.golden,
            run,
            dets,
            stats,
            info,
            args.golden_box_decimals,
            args.golden_score_decimals,
        )
        print(f"wrote {run} into {args.golden}")
    return {"stats": stats.tolist(), "num_detections": len(dets), "wall_s": t3 - t0}


if __name__ == "__main__":
    main()
