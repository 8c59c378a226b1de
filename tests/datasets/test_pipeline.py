"""Training input pipeline: batch format, determinism and resume, multi-host split, box
buckets, unreadable images."""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import pytest

from nanodet_jax.config.defaults import nanodet_plus_config
from nanodet_jax.data import synthetic
from nanodet_jax.data.coco import CocoDetection
from nanodet_jax.data.pipeline import TrainLoader, box_bucket, train_loader_from_config

PIPELINE = nanodet_plus_config().data.train.pipeline.to_dict()
KEYS = {"images", "color", "gt_boxes", "gt_labels", "gt_mask", "valid_hw", "image_id"}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shapes"))
    paths = synthetic.write_dataset(out, num_train=26, num_val=0, size=96, seed=1)
    return CocoDetection(paths["train"], os.path.join(out, "train")).records


def loader(records, **kw) -> TrainLoader:
    args = dict(input_size=(64, 64), pipeline=PIPELINE, global_batch_size=8, seed=5)
    return TrainLoader(records, **{**args, **kw})


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batch_format(records):
    ld = loader(records)
    assert ld.steps_per_epoch == 3  # 26 // 8: the partial batch is dropped
    batch = ld.batch(0, 1)
    assert set(batch) == KEYS
    assert batch["images"].shape == (8, 64, 64, 3) and batch["images"].dtype == np.uint8
    assert batch["color"].shape == (8, 4) and batch["color"].dtype == np.float32
    assert batch["gt_boxes"].shape == (8, 32, 4) and batch["gt_boxes"].dtype == np.float32
    assert batch["gt_labels"].dtype == np.int32 and batch["gt_mask"].dtype == bool
    assert batch["valid_hw"].dtype == np.int32 and np.all(batch["valid_hw"] == 64)
    assert batch["image_id"].dtype == np.int64
    by_id = {r.image_id: r for r in records}
    expected_ids = [records[i].image_id for i in ld.local_indices(0, 1)]
    np.testing.assert_array_equal(batch["image_id"], expected_ids)
    for row in range(8):
        n = len(by_id[int(batch["image_id"][row])].boxes)
        assert batch["gt_mask"][row].sum() == n
        assert np.all(batch["gt_labels"][row, n:] == -1) and np.all(batch["gt_boxes"][row, n:] == 0)
        boxes = batch["gt_boxes"][row, :n]
        assert np.all(boxes >= 0) and np.all(boxes <= 64)


def test_threaded_epochs_are_deterministic_and_resumable(records):
    ld = loader(records, num_threads=2)
    epoch0 = list(ld.epoch(0))
    assert len(epoch0) == 3
    for step, batch in enumerate(epoch0):
        assert_same(batch, ld.batch(0, step))  # any batch can be recomputed
    # A fresh loader resumed at (0, 2) continues exactly like the uninterrupted run...
    resumed = list(loader(records, num_threads=1)(start_epoch=0, start_step=2, num_epochs=2))
    assert [(e, s) for e, s, _ in resumed] == [(0, 2), (1, 0), (1, 1), (1, 2)]
    assert_same(resumed[0][2], epoch0[2])
    assert_same(resumed[1][2], ld.batch(1, 0))
    # ...and epochs differ in order and in augmentation.
    ids0 = np.concatenate([b["image_id"] for b in epoch0])
    ids1 = np.concatenate([b["image_id"] for _, _, b in resumed[1:]])
    assert len(set(ids0.tolist())) == 24 and not np.array_equal(ids0, ids1)
    assert not np.array_equal(ld.batch(0, 0)["color"], loader(records, seed=6).batch(0, 0)["color"])


def test_processes_split_every_global_batch(records):
    single = loader(records)
    parts = [loader(records, process_index=p, process_count=2) for p in range(2)]
    for epoch in (0, 1):
        seen = [set(), set()]
        for step in range(single.steps_per_epoch):
            local = [p.batch(epoch, step) for p in parts]
            assert all(b["images"].shape[0] == 4 for b in local)
            joined = {k: np.concatenate([b[k] for b in local]) for k in local[0]}
            assert_same(joined, single.batch(epoch, step))
            for p, b in enumerate(local):
                seen[p] |= set(b["image_id"].tolist())
        assert not seen[0] & seen[1]
    with pytest.raises(ValueError, match="does not split"):
        loader(records, process_count=3)


def test_box_buckets_and_truncation(records, caplog):
    assert box_bucket(0, [32, 64]) == 32 and box_bucket(33, [64, 32]) == 64
    assert box_bucket(500, [32, 64]) == 64
    rec = records[3]
    many = dataclasses.replace(
        rec,
        boxes=np.tile(np.array([[10, 10, 40, 40]], np.float32), (40, 1)),
        labels=np.zeros(40, np.int32),
    )
    too_many = dataclasses.replace(
        many, boxes=np.tile(many.boxes, (5, 1)), labels=np.zeros(200, np.int32), image_id=999
    )
    ld = loader([many] + list(records[:7]), global_batch_size=8)
    assert ld.batch(0, 0)["gt_boxes"].shape[1] == 64
    ld = loader([too_many] + list(records[:7]), global_batch_size=8)
    with caplog.at_level(logging.WARNING, logger="nanodet_jax"):
        b = ld.batch(0, 0)
        ld.batch(1, 0)
    assert b["gt_boxes"].shape[1] == 128
    assert b["gt_mask"][list(b["image_id"]).index(999)].sum() == 128
    warnings = [r.message for r in caplog.records if "boxes, only the first" in r.message]
    assert len(warnings) == 1 and too_many.path in warnings[0]


def test_unreadable_images_are_replaced_deterministically(records, tmp_path, caplog):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not a jpeg")
    bad = list(records)
    bad[0] = dataclasses.replace(bad[0], path=str(tmp_path / "missing.jpg"), image_id=-1)
    bad[1] = dataclasses.replace(bad[1], path=str(garbage), image_id=-2)
    with caplog.at_level(logging.WARNING, logger="nanodet_jax"):
        first = list(loader(bad, num_threads=2).epoch(0))
        second = [loader(bad).batch(0, s) for s in range(3)]
    for a, b in zip(first, second):
        assert_same(a, b)
    ids = np.concatenate([b["image_id"] for b in first])
    assert len(ids) == 24 and ids.min() > 0  # the two bad samples were replaced
    text = "\n".join(r.message for r in caplog.records)
    assert "missing.jpg" in text and "garbage.jpg" in text


def test_keep_ratio_pads_to_the_canvas(records):
    ld = loader(records, keep_ratio=True)
    b = ld.batch(0, 0)
    assert b["images"].shape == (8, 64, 64, 3)
    for img, (h, w) in zip(b["images"], b["valid_hw"]):
        assert (h, w) in ((64, 64), (48, 64))  # 96x96 or 96x72 images, scaled to fit
        assert not img[h:].any() and not img[:, w:].any()


def test_from_config(records):
    config = nanodet_plus_config(input_size=64)
    config.device.workers = 1
    ld = train_loader_from_config(records, config, global_batch_size=8)
    assert ld.buckets == (32, 64, 128) and ld.num_threads == 1 and ld.input_wh == (64, 64)
    assert next(ld(num_epochs=1))[2]["images"].shape == (8, 64, 64, 3)
