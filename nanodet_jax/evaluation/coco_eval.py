"""COCO evaluation: run a Predictor over a COCO-format dataset and score it with pycocotools."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from collections.abc import Iterator, Sequence

import grain
import numpy as np

from nanodet_jax import paths
from nanodet_jax.data.coco import CocoDetection, ImageRecord, load_image
from nanodet_jax.evaluation.predictor import Detections, Predictor, PreparedImage

log = logging.getLogger("nanodet_jax")

# COCOeval.stats, in order.
STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
# NanoDet's CocoDetectionEvaluator names (``evaluator.save_key``) -> ours.
NANODET_STAT_KEYS = {"mAP": "AP", "AP_50": "AP50", "AP_75": "AP75", "AP_small": "APs",
                     "AP_m": "APm", "AP_l": "APl"}  # fmt: skip


def save_key_stat(save_key: str) -> str:
    """The stat ``evaluator.save_key`` (NanoDet's name, or ours) selects the best model by."""
    stat = NANODET_STAT_KEYS.get(save_key, save_key)
    if stat not in STAT_NAMES:
        raise ValueError(
            f"evaluator.save_key {save_key!r} is not a COCO metric; use one of "
            f"{', '.join(NANODET_STAT_KEYS)} (NanoDet's names) or {', '.join(STAT_NAMES)}"
        )
    return stat


# The names NanoDet logs for the first six.
NANODET_NAMES = ("mAP", "AP_50", "AP_75", "AP_small", "AP_m", "AP_l")


def prepared_images(
    predictor: Predictor, records: Sequence[ImageRecord], num_threads: int = 2
) -> Iterator[tuple[ImageRecord, PreparedImage]]:
    """Decode and warp images in background threads, in dataset order."""

    def load(record: ImageRecord) -> tuple[ImageRecord, PreparedImage]:
        return record, predictor.prepare(load_image(record))

    ds = grain.MapDataset.source(list(records)).map(load)
    opts = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=16)
    return iter(ds.to_iter_dataset(read_options=opts))


def predict_dataset(
    predictor: Predictor,
    records: Sequence[ImageRecord],
    batch_size: int = 8,
    progress: bool = True,
) -> dict[int, Detections]:
    """Detections for every record, keyed by image id. Batches are padded to ``batch_size``
    so that one program is compiled per canvas. With several canvases (``data.val.resize``)
    a batch holds one canvas: images wait in a queue per canvas, a full queue runs, the
    partial ones run at the end. (Padding mixed batches to their largest canvas would also
    compile once per canvas, but run small images on big canvases and make an image's
    detections depend on its batch neighbours, through the canvas its boxes are clipped to.)"""
    from tqdm import tqdm

    results: dict[int, Detections] = {}
    bar = tqdm(total=len(records), desc="eval", unit="img", disable=not progress, leave=False)
    pending: dict[tuple, list[tuple[ImageRecord, PreparedImage]]] = {}

    def flush(key: tuple) -> None:
        group = pending.pop(key)
        dets = predictor.run_prepared([p for _, p in group], batch_size)
        for (record, _), det in zip(group, dets):
            results[record.image_id] = det
        bar.update(len(group))

    for record, prepared in prepared_images(predictor, records):
        key = (prepared.canvas.shape, prepared.canvas.dtype.str)
        pending.setdefault(key, []).append((record, prepared))
        if len(pending[key]) == batch_size:
            flush(key)
    for key in list(pending):
        flush(key)
    bar.close()
    return results


def predict_dataset_all_hosts(
    predictor: Predictor,
    records: Sequence[ImageRecord],
    batch_size: int = 8,
    progress: bool = True,
) -> dict[int, Detections]:
    """:func:`predict_dataset` with the images split over processes and every process
    receiving all detections (so each can run the same COCOeval). One process: the same."""
    import jax

    count, index = jax.process_count(), jax.process_index()
    if count == 1:
        return predict_dataset(predictor, records, batch_size, progress)
    from jax.experimental import multihost_utils

    mine = list(records)[index::count]
    local = predict_dataset(predictor, mine, batch_size, progress and index == 0)
    # Fixed-size rows so that every process contributes an array of the same shape:
    # [images, max_per_img, (image_id, x1, y1, x2, y2, score, label)], padded with -1.
    per_process = -(-len(records) // count)
    max_det = max([len(d) for d in local.values()] + [1])
    max_det = int(np.max(multihost_utils.process_allgather(np.int32(max_det))))
    packed = np.full((per_process, max_det, 7), -1.0, np.float64)
    for row, record in enumerate(mine):
        det = local[record.image_id]
        n = len(det)
        packed[row, :, 0] = record.image_id
        packed[row, :n, 1:5] = det.boxes
        packed[row, :n, 5] = det.scores
        packed[row, :n, 6] = det.labels
    gathered = multihost_utils.process_allgather(packed)  # [processes, per_process, ...]
    results: dict[int, Detections] = {}
    for rows in gathered.reshape(-1, max_det, 7):
        if rows[0, 0] < 0:
            continue  # padding image slot
        keep = rows[:, 6] >= 0
        results[int(rows[0, 0])] = Detections(
            rows[keep, 1:5].astype(np.float32),
            rows[keep, 5].astype(np.float32),
            rows[keep, 6].astype(np.int32),
        )
    return results


def to_coco_json(results: dict[int, Detections], cat_ids: Sequence[int]) -> list[dict]:
    """COCO result entries (xywh boxes), as NanoDet's results2json writes them."""
    out = []
    for image_id, det in results.items():
        for box, score, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist()):
            x1, y1, x2, y2 = box
            out.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(cat_ids[label]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
    return out


def coco_evaluate(
    dataset: CocoDetection, dets: list[dict], class_names: Sequence[str] | None = None
) -> dict:
    """COCOeval bbox: the 12 standard numbers plus per-class AP / AP50 (0..1 scale)."""
    from pycocotools.cocoeval import COCOeval

    names = list(class_names or dataset.class_names)
    if not dets:
        log.warning("no detections at all: every metric is 0")
        return {"stats": dict.fromkeys(STAT_NAMES, 0.0), "per_class": {}, "summary": ""}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dets = dataset.coco.loadRes(copy.deepcopy(dets))
        evaluator = COCOeval(copy.deepcopy(dataset.coco), coco_dets, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        evaluator.summarize()
    precision = evaluator.eval["precision"]  # [iou, recall, class, area, maxdets]
    per_class = {}
    for idx, name in enumerate(names[: precision.shape[2]]):
        p_all = precision[:, :, idx, 0, -1]
        p_50 = precision[0, :, idx, 0, -1]
        ap = float(np.mean(p_all[p_all > -1])) if (p_all > -1).any() else float("nan")
        ap50 = float(np.mean(p_50[p_50 > -1])) if (p_50 > -1).any() else float("nan")
        per_class[name] = {"AP": ap, "AP50": ap50}
    stats = {k: float(v) for k, v in zip(STAT_NAMES, evaluator.stats)}
    return {"stats": stats, "per_class": per_class, "summary": summary.getvalue()}


def per_class_table(per_class: dict, columns: int = 3) -> str:
    """Per-class AP50 / AP (percent) as a compact markdown table."""
    cells = [(n, v["AP50"] * 100, v["AP"] * 100) for n, v in per_class.items()]
    header = "| " + " | ".join(["class", "AP50", "AP"] * columns) + " |"
    sep = "|" + "---|" * (3 * columns)
    rows = []
    for i in range(0, len(cells), columns):
        chunk = cells[i : i + columns]
        parts = []
        for name, ap50, ap in chunk:
            parts += [
                name,
                "nan" if np.isnan(ap50) else f"{ap50:.1f}",
                "nan" if np.isnan(ap) else f"{ap:.1f}",
            ]
        parts += [""] * (3 * columns - len(parts))
        rows.append("| " + " | ".join(parts) + " |")
    return "\n".join([header, sep, *rows])


def write_results(out_dir: str, dets: list[dict], metrics: dict) -> None:
    paths.makedirs(out_dir)
    paths.write_text(paths.join(out_dir, "detections.json"), json.dumps(dets))
    summary = {"stats": metrics["stats"], "per_class": metrics["per_class"]}
    paths.write_text(paths.join(out_dir, "metrics.json"), json.dumps(summary, indent=1))
