"""Record NanoDet's ATSS assigner and IoU-family losses on structured random inputs, for
``tests/losses/test_atss.py`` and ``tests/losses/test_iou_losses.py``.

Usage (from the repository root, with torch installed)::

    python tools/make_golden_atss.py /path/to/nanodet [--out tests/data/golden_atss.npz]

ATSS: GFLHead's own grid cells (``get_grid_cells``, octave_base_scale 5, strides 8 / 16 /
32 on a 64 x 96 input, so the last level has fewer cells than topk 9) and a padded batch
of 4 images: a few random gts, none, a crowded one (12 gts, with an exact duplicate and
nested boxes, so cells are positive for several gts and IoU ties go to the first), and
one of integer boxes centred on cell centres and corners (equal distances and IoUs
inside the top-k), a tiny box, boxes crossing the border. A box whose k-th and
(k+1)-th closest cell distances tie on some level is left out: PyTorch's topk picks
among those by std::nth_element's internal order (see nanodet_jax/assigners/atss.py).
Recorded: the cells, the gts, and per cell the assigned gt (-1 background) and label.

IoU losses: NanoDet's loss classes (default eps / beta) with reduction "none" on 96
random box pairs plus degenerate ones (zero width, zero area, identical, disjoint,
nested), and the gradient of each loss's sum w.r.t. the predicted boxes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tools.reference import load_reference  # noqa: E402

INPUT_HW = (64, 96)
STRIDES = (8, 16, 32)
OCTAVE = 5
TOPK = 9
NUM_CLASSES = 5
MAX_GTS = 12
IOU_LOSSES = ("IoULoss", "GIoULoss", "DIoULoss", "CIoULoss", "BoundedIoULoss")
NUM_SMOOTH = 96  # the first NUM_SMOOTH pairs are generic: gradients are compared there


def _straddles(box: np.ndarray, cells: np.ndarray, counts: list[int]) -> bool:
    """Whether the k-th and (k+1)-th smallest centre distances tie on some level."""
    ctr = (cells[:, :2] + cells[:, 2:]) / np.float32(2)
    g = (box[:2] + box[2:]) / np.float32(2)
    d = np.sqrt(np.sum(np.square(ctr - g), axis=1, dtype=np.float32)).astype(np.float32)
    start = 0
    for n in counts:
        level = np.sort(d[start : start + n])
        start += n
        if n > TOPK and level[TOPK - 1] == level[TOPK]:
            return True
    return False


def _random_boxes(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    h, w = INPUT_HW
    x1 = rng.uniform(-8, w - 4, n)
    y1 = rng.uniform(-8, h - 4, n)
    bw = rng.uniform(2, 60, n)
    bh = rng.uniform(2, 50, n)
    return [np.array(b, np.float32) for b in zip(x1, y1, x1 + bw, y1 + bh)]


def _images(cells: np.ndarray, counts: list[int]) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(7)

    def keep(boxes, limit):
        return [b for b in boxes if not _straddles(b, cells, counts)][:limit]

    few = keep(_random_boxes(rng, 8), 3)
    crowded = keep(_random_boxes(rng, 30), 8)
    crowded.insert(2, crowded[1].copy())  # an exact duplicate: every IoU ties
    crowded.append(np.array([20, 10, 60, 50], np.float32))  # nested boxes
    crowded.append(np.array([28, 18, 52, 42], np.float32))
    crowded.append(np.array([24, 14, 56, 46], np.float32))
    ties = keep(
        [
            np.array(b, np.float32)
            for b in (
                [28, 28, 44, 44],  # centred on a stride-8 cell centre
                [32, 16, 64, 48],  # centred on a cell corner
                [4, 4, 12, 12],  # one cell
                [40, 40, 42, 42],  # tiny
                [-10, -10, 30, 20],  # crosses the border
                [60, 30, 110, 70],
                [0, 0, 96, 64],  # the whole canvas
                [16, 8, 80, 56],
            )
        ],
        MAX_GTS,
    )
    return [few, [], crowded[:MAX_GTS], ties]


def record_atss(ref) -> tuple[dict[str, np.ndarray], dict]:
    import torch

    head_mod = ref.module("nanodet.model.head.gfl_head")
    atss = ref.module("nanodet.model.head.assigner.atss_assigner")
    sizes = [(-(-INPUT_HW[0] // s), -(-INPUT_HW[1] // s)) for s in STRIDES]
    # get_grid_cells only calls get_single_level_center_point, which uses no state.
    head = head_mod.GFLHead.__new__(head_mod.GFLHead)
    levels = [
        head_mod.GFLHead.get_grid_cells(head, sz, OCTAVE, s, torch.float32, "cpu")
        for sz, s in zip(sizes, STRIDES)
    ]
    counts = [int(c.shape[0]) for c in levels]
    cells_t = torch.cat(levels)
    cells = cells_t.numpy()
    images = _images(cells, counts)
    rng = np.random.default_rng(8)
    b = len(images)
    gt_boxes = np.zeros((b, MAX_GTS, 4), np.float32)
    gt_labels = np.zeros((b, MAX_GTS), np.int64)
    gt_mask = np.zeros((b, MAX_GTS), bool)
    assigned = np.full((b, cells.shape[0]), -1, np.int64)
    labels = np.full((b, cells.shape[0]), NUM_CLASSES, np.int64)
    multi = 0
    assigner = atss.ATSSAssigner(topk=TOPK)
    for i, boxes in enumerate(images):
        n = len(boxes)
        lab = rng.integers(0, NUM_CLASSES, n)
        if n:
            gt_boxes[i, :n] = np.stack(boxes)
        gt_labels[i, :n] = lab
        gt_mask[i, :n] = True
        res = assigner.assign(
            cells_t,
            counts,
            torch.from_numpy(gt_boxes[i, :n].copy()),
            None,
            torch.from_numpy(lab.astype(np.int64)),
        )
        inds = res.gt_inds.numpy()
        pos = inds > 0
        assigned[i, pos] = inds[pos] - 1
        labels[i, pos] = lab[inds[pos] - 1]
        multi += _multi_positive(cells, gt_boxes[i, :n], inds, counts)
    arrays = {
        "atss/cells": cells,
        "atss/gt_boxes": gt_boxes,
        "atss/gt_labels": gt_labels,
        "atss/gt_mask": gt_mask,
        "atss/assigned_gt": assigned,
        "atss/labels": labels,
    }
    meta = {
        "input_hw": list(INPUT_HW),
        "strides": list(STRIDES),
        "octave_base_scale": OCTAVE,
        "topk": TOPK,
        "num_classes": NUM_CLASSES,
        "level_counts": counts,
        "num_positive": int((assigned >= 0).sum()),
        "cells_positive_for_several_gts": multi,
    }
    return arrays, meta


def _multi_positive(cells, boxes, inds, counts) -> int:
    """Positives whose cell lies inside more than one gt (where the max-IoU rule decides)."""
    if len(boxes) == 0:
        return 0
    ctr = (cells[:, :2] + cells[:, 2:]) / 2
    inside = (
        (ctr[:, None, 0] > boxes[None, :, 0] + 0.01)
        & (ctr[:, None, 1] > boxes[None, :, 1] + 0.01)
        & (ctr[:, None, 0] < boxes[None, :, 2] - 0.01)
        & (ctr[:, None, 1] < boxes[None, :, 3] - 0.01)
    )
    return int(((inside.sum(1) > 1) & (inds > 0)).sum())


def _box_pairs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(9)
    xy = rng.uniform(-20, 40, (NUM_SMOOTH, 2, 2))
    wh = rng.uniform(0.5, 30, (NUM_SMOOTH, 2, 2))
    boxes = np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)  # [N, 2, 4]
    pred, target = boxes[:, 0], boxes[:, 1]
    degenerate = np.array(
        [
            [[5, 5, 5, 15], [0, 0, 10, 10]],  # zero-width prediction
            [[3, 3, 3, 3], [3, 3, 3, 3]],  # two points
            [[0, 0, 10, 10], [0, 0, 10, 10]],  # identical
            [[0, 0, 4, 4], [10, 10, 20, 20]],  # disjoint
            [[0, 0, 20, 20], [5, 5, 8, 9]],  # nested
            [[2, 2, 6, 6], [6, 2, 10, 6]],  # touching
            [[0, 0, 10, 0], [0, 0, 10, 5]],  # zero-height prediction
            [[1, 1, 9, 9], [1, 1, 9, 9.000001]],
        ],
        np.float32,
    )
    return (
        np.concatenate([pred, degenerate[:, 0]]).astype(np.float32),
        np.concatenate([target, degenerate[:, 1]]).astype(np.float32),
    )


def record_iou_losses(ref) -> tuple[dict[str, np.ndarray], dict]:
    import torch

    mod = ref.module("nanodet.model.loss.iou_loss")
    pred, target = _box_pairs()
    arrays = {"iou/pred": pred, "iou/target": target}
    for name in IOU_LOSSES:
        p = torch.from_numpy(pred.copy()).requires_grad_(True)
        loss = getattr(mod, name)()(p, torch.from_numpy(target.copy()), reduction_override="none")
        loss.sum().backward()
        arrays[f"iou/{name}/loss"] = loss.detach().numpy().astype(np.float32)
        arrays[f"iou/{name}/grad"] = p.grad.numpy().astype(np.float32)
    return arrays, {"losses": list(IOU_LOSSES), "num_smooth": NUM_SMOOTH}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("ref_path", help="checkout of RangiLyu/nanodet")
    p.add_argument("--out", default=os.path.join(REPO, "tests", "data", "golden_atss.npz"))
    args = p.parse_args(argv)
    ref = load_reference(args.ref_path)
    atss_arrays, atss_meta = record_atss(ref)
    iou_arrays, iou_meta = record_iou_losses(ref)
    meta = {"format_version": 1, "atss": atss_meta, "iou": iou_meta}
    np.savez_compressed(args.out, **atss_arrays, **iou_arrays, meta=json.dumps(meta))
    print(f"wrote {args.out}: {json.dumps(meta)}")


if __name__ == "__main__":
    main()
