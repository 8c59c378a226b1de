"""The ATSS assigner against NanoDet's, on the fixture of ``tools/make_golden_atss.py``
(GFLHead's grid cells on 64 x 96; images with a few gts, none, a crowded one with a
duplicate and nested gts, and one of boxes placed for equal distances and IoUs), plus
padding invariance, without torch."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from nanodet_jax.assigners import ASSIGNERS
from nanodet_jax.assigners.atss import assign, grid_cells
from tests.conftest import REPO

GOLDEN = os.path.join(REPO, "tests", "data", "golden_atss.npz")


@pytest.fixture(scope="module")
def golden():
    if not os.path.isfile(GOLDEN):
        pytest.fail(
            "tests/data/golden_atss.npz is absent: run tools/make_golden_atss.py",
            pytrace=False,
        )
    with np.load(GOLDEN) as data:
        arrays = {k: data[k] for k in data.files}
    return json.loads(str(arrays.pop("meta")))["atss"], arrays


def _assign(meta, arrays, boxes, labels, mask):
    cells, counts = grid_cells(tuple(meta["input_hw"]), meta["strides"], meta["octave_base_scale"])
    fn = jax.jit(
        lambda b, lab, m: assign(cells, counts, b, lab, m, meta["num_classes"], meta["topk"])
    )
    return fn(boxes, labels, mask)


def test_grid_cells_match_reference(golden):
    meta, arrays = golden
    cells, counts = grid_cells(tuple(meta["input_hw"]), meta["strides"], meta["octave_base_scale"])
    assert list(counts) == meta["level_counts"]
    np.testing.assert_array_equal(cells, arrays["atss/cells"])


def test_assignment_matches_reference(golden):
    meta, arrays = golden
    out = _assign(
        meta, arrays, arrays["atss/gt_boxes"], arrays["atss/gt_labels"], arrays["atss/gt_mask"]
    )
    assigned = np.asarray(out.assigned_gt)
    ref = arrays["atss/assigned_gt"]
    for i in range(ref.shape[0]):
        diff = np.flatnonzero(assigned[i] != ref[i])
        assert diff.size == 0, (
            f"image {i}: cells {diff[:10]} ours {assigned[i][diff[:10]]} ref {ref[i][diff[:10]]}"
        )
    np.testing.assert_array_equal(np.asarray(out.labels), arrays["atss/labels"])
    pos = ref >= 0
    np.testing.assert_array_equal(np.asarray(out.pos_mask), pos)
    b_idx = np.arange(ref.shape[0])[:, None]
    expected_boxes = np.where(pos[..., None], arrays["atss/gt_boxes"][b_idx, np.maximum(ref, 0)], 0)
    np.testing.assert_array_equal(np.asarray(out.bbox_targets), expected_boxes)
    assert meta["num_positive"] > 20 and not pos[1].any()  # image 1 has no gts


def test_padding_and_registry(golden):
    meta, arrays = golden
    boxes, labels, mask = arrays["atss/gt_boxes"], arrays["atss/gt_labels"], arrays["atss/gt_mask"]
    # Garbage in padded rows and more padding must change nothing.
    pad = 5
    boxes2 = np.concatenate([boxes, np.full((boxes.shape[0], pad, 4), 30.0, np.float32)], 1)
    boxes2[~np.concatenate([mask, np.zeros((mask.shape[0], pad), bool)], 1)] = [10, 10, 50, 50]
    labels2 = np.concatenate([labels, np.full((labels.shape[0], pad), 3)], 1)
    mask2 = np.concatenate([mask, np.zeros((mask.shape[0], pad), bool)], 1)
    out = _assign(meta, arrays, boxes2, labels2, mask2)
    np.testing.assert_array_equal(np.asarray(out.assigned_gt), arrays["atss/assigned_gt"])
    assert ASSIGNERS.get("ATSSAssigner") is assign
