"""The synthetic shapes dataset: deterministic files, loadable COCO json, tight boxes."""

from __future__ import annotations

import filecmp
import json
import os

import numpy as np

from nanodet_jax.data import synthetic
from nanodet_jax.data.coco import CocoDetection, read_image


def test_files_are_deterministic_and_load_with_coco_detection(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    paths = synthetic.write_dataset(a, num_train=10, num_val=4, size=96, seed=3)
    synthetic.write_dataset(b, num_train=10, num_val=4, size=96, seed=3)
    for split in ("train", "val"):
        names = sorted(os.listdir(os.path.join(a, split)))
        assert len(names) == {"train": 10, "val": 4}[split]
        dirs = os.path.join(a, split), os.path.join(b, split)
        _, mismatch, errors = filecmp.cmpfiles(*dirs, names, shallow=False)
        assert not mismatch and not errors
        rel = os.path.join("annotations", f"instances_{split}.json")
        assert filecmp.cmp(os.path.join(a, rel), os.path.join(b, rel), shallow=False)

    ds = CocoDetection(paths["train"], os.path.join(a, "train"))
    assert ds.class_names == list(synthetic.CLASSES) and len(ds) == 10
    for index, record in enumerate(ds.records):
        img = read_image(record.path)
        assert img.shape == (record.height, record.width, 3)
        # The json holds exactly the boxes of the rendered image.
        sample = synthetic.render_image(synthetic.image_rng(3, "train", index), 96)
        np.testing.assert_array_equal(record.boxes, sample.boxes)
        np.testing.assert_array_equal(record.labels, sample.labels)
    other = synthetic.write_dataset(str(tmp_path / "c"), num_train=10, num_val=0, size=96, seed=4)
    with open(other["train"]) as f, open(paths["train"]) as g:
        assert json.load(f)["annotations"] != json.load(g)["annotations"]


def test_boxes_are_tight_and_objects_sized_as_documented():
    empty = overlapping = 0
    for index in range(60):
        s = synthetic.render_image(synthetic.image_rng(0, "train", index), 320)
        h, w = s.image.shape[:2]
        assert w == 320 and h in (320, 240)
        empty += len(s.boxes) == 0
        for box, mask in zip(s.boxes, s.masks):
            x1, y1, x2, y2 = box.astype(int)
            ys, xs = np.nonzero(mask)
            # Every pixel of the shape inside the box, and the box touches the shape on each side.
            assert xs.min() == x1 and xs.max() == x2 - 1 and ys.min() == y1 and ys.max() == y2 - 1
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            assert 20 <= max(x2 - x1, y2 - y1) <= 175  # 24-120 px shapes (square diagonal)
        for i in range(len(s.boxes)):
            for j in range(i):
                overlapping += synthetic._iou(s.boxes[i], s.boxes[j]) > 0
        assert set(s.labels.tolist()) <= {0, 1, 2}
    assert 0 < empty < 20 and overlapping > 0


def test_visible_shape_pixels_differ_from_background():
    checked = 0
    for index in range(8):
        sample = synthetic.render_image(synthetic.image_rng(0, "val", index), 320)
        checked += _check_contrast(sample)
    assert checked >= 5


def _check_contrast(s: synthetic.SyntheticImage) -> int:
    checked = 0
    img = s.image.astype(np.float32)
    for k, mask in enumerate(s.masks):
        visible = mask & ~s.masks[k + 1 :].any(0)  # later shapes are drawn on top
        if visible.sum() < 50:
            continue
        ring = np.zeros_like(mask)
        x1, y1, x2, y2 = s.boxes[k].astype(int)
        ring[max(y1 - 3, 0) : y2 + 3, max(x1 - 3, 0) : x2 + 3] = True
        ring &= ~s.masks.any(0)
        if ring.sum() < 20:
            continue
        contrast = np.abs(img[visible].mean(0) - img[ring].mean(0)).max()
        assert contrast > 20
        checked += 1
    return checked
