"""TFDS tfrecord datasets read without TensorFlow: the committed fixture (prepared by TFDS
with TensorFlow, tools/make_tfrecord_fixture.py) matches its COCO-json source and the
TF-free array_record export of it; the record index and its cache; two processes load
disjoint samples covering the epoch; damaged records are named by file and byte offset."""

from __future__ import annotations

import logging
import os
import shutil
import sys

import numpy as np
import pytest

from nanodet_jax.config.defaults import nanodet_plus_config
from nanodet_jax.data import synthetic
from nanodet_jax.data.coco import load_image
from nanodet_jax.data.crc32c import crc32c, crc32c_numpy
from nanodet_jax.data.datasets import build_dataset
from nanodet_jax.data.pipeline import TrainLoader

pytest.importorskip("tensorflow_datasets", reason="needs tensorflow-datasets (the [tfds] extra)")

from nanodet_jax.data import tfrecord  # noqa: E402
from nanodet_jax.data.tfds_dataset import TFDSDataset  # noqa: E402
from tests import test_paths  # noqa: E402

fake_gcs = test_paths.fake_gcs  # the fake gs:// bucket fixture
FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "tfrecord")
CLASSES = list(synthetic.CLASSES)
NUM_IMAGES, NUM_SHARDS = 8, 3
TFDS_ATOL = 1e-3  # float32 normalised boxes, as in test_datasets.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The fixture copied (indexes are written beside the shards), its COCO source and the
    array_record export of that source."""
    from nanodet_jax.data import tfds_export

    root = tmp_path_factory.mktemp("tfrecord")
    shutil.copytree(FIXTURE, root / "fx")
    src = root / "fx" / "source"
    ann, img_dir = str(src / "annotations" / "instances_train.json"), str(src / "train")
    tfds_export.export_coco(ann, img_dir, str(root / "array_record"), "train")
    return {
        "root": root,
        "tfds": str(root / "fx" / "tfds"),
        "img_dir": img_dir,
        "coco": build_dataset(
            {"name": "CocoDataset", "ann_file": ann, "img_dir": img_dir}, CLASSES
        ),  # fmt: skip
        "tfrecord": TFDSDataset(str(root / "fx" / "tfds"), "train", CLASSES),
        "array_record": TFDSDataset(str(root / "array_record"), "train", CLASSES),
    }


def bytewise_crc32c(data: bytes) -> int:
    """The textbook bit-at-a-time CRC32C, to check the lane-parallel one against."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize("fn", [crc32c, crc32c_numpy], ids=["default", "numpy"])
def test_crc32c(fn):
    assert fn(b"123456789") == 0xE3069283  # the standard check value
    assert fn(b"") == 0 and fn(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4
    rng = np.random.default_rng(0)
    for n in (1, 3, 4, 63, 64, 65, 129, 1000, 4099):  # one lane, a few, odd counts
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert fn(data) == bytewise_crc32c(data), n


def test_tfrecord_matches_coco_and_array_record(data):
    ds, ref, arr = data["tfrecord"], data["coco"].records, data["array_record"]
    assert "tensorflow" not in sys.modules
    assert len(ds.source.open().files) == NUM_SHARDS and len(ds) == len(ref) == NUM_IMAGES
    assert sum(len(r.ignore_boxes) for r in ds.records) == 1  # the crowd object
    assert [r.image_id for r in ds.records] == [r.image_id for r in ref]
    for a, b in zip(ds.records, ref):
        assert (a.width, a.height) == (b.width, b.height)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_allclose(a.boxes, b.boxes, rtol=0, atol=TFDS_ATOL)
        np.testing.assert_allclose(a.ignore_boxes, b.ignore_boxes, rtol=0, atol=TFDS_ATOL)
        np.testing.assert_array_equal(load_image(a), load_image(b))
        with open(b.path, "rb") as f:  # the file's bytes, stored as they are
            assert ds.source.example(a.source_index)["image"] == f.read()
    # Same builder and features, other file format: the same examples, field by field.
    by_id = {int(arr.source.example(i)["image/id"]): i for i in range(len(arr))}
    for r in ds.records:
        x = ds.source.example(r.source_index)
        y = arr.source.example(by_id[r.image_id])
        assert x["image"] == y["image"] and x["image/filename"] == y["image/filename"]
        for key in ("bbox", "label", "is_crowd", "area", "id"):
            np.testing.assert_array_equal(x["objects"][key], y["objects"][key], err_msg=key)
    sliced = TFDSDataset(data["tfds"], "train[2:7]", CLASSES)
    assert len(sliced) == 5
    assert {r.image_id for r in sliced.records} < {r.image_id for r in ds.records}


def test_index_beside_or_in_cache_and_invalidated(data, tmp_path, monkeypatch):
    shutil.copytree(os.path.join(FIXTURE, "tfds"), tmp_path / "ds")
    shard = sorted(str(p) for p in (tmp_path / "ds").glob("*.tfrecord-*"))[0]
    scans = []
    scan = tfrecord.scan_shard
    monkeypatch.setattr(tfrecord, "scan_shard", lambda p: scans.append(p) or scan(p))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = tfrecord.shard_index(shard)
    assert os.path.isfile(shard + tfrecord.INDEX_SUFFIX) and len(first[0]) == 3
    assert not first[2] and tfrecord.shard_index(shard)[0].tolist() == first[0].tolist()
    assert len(scans) == 1  # the second call read the stored index
    os.utime(shard, ns=(1, 1))  # the shard changed: its index is stale
    tfrecord.shard_index(shard)
    assert len(scans) == 2
    # A read-only dataset folder (simulated: tests may run as root): the cache is used.
    os.remove(shard + tfrecord.INDEX_SUFFIX)
    write_atomic = tfrecord.paths.write_atomic

    def no_write_beside(path, data):
        if os.path.samefile(os.path.dirname(path), tmp_path / "ds"):
            raise PermissionError(path)
        return write_atomic(path, data)

    monkeypatch.setattr(tfrecord.paths, "write_atomic", no_write_beside)
    tfrecord.shard_index(shard)
    tfrecord.shard_index(shard)
    assert len(scans) == 3 and not os.path.exists(shard + tfrecord.INDEX_SUFFIX)
    assert len(list((tmp_path / "cache" / "nanodet_jax" / "tfrecord_index").iterdir())) == 1


def test_two_processes_read_disjoint_samples_covering_the_epoch(data):
    ds = data["tfrecord"]
    pipeline = nanodet_plus_config().data.train.pipeline.to_dict()
    loaders = [
        TrainLoader(
            ds.records,
            input_size=(64, 64),
            pipeline=pipeline,
            global_batch_size=4,
            seed=3,
            process_index=p,
            process_count=2,
        )  # fmt: skip
        for p in range(2)
    ]
    for epoch in range(2):
        seen = []
        for loader in loaders:
            steps = range(loader.steps_per_epoch)
            seen.append([int(i) for s in steps for i in loader.local_indices(epoch, s)])
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(NUM_IMAGES))
    batch = loaders[1].batch(0, 1)
    expected = [ds.records[i].image_id for i in loaders[1].local_indices(0, 1)]
    assert batch["image_id"].tolist() == expected
    # A process opens only the shards of the records it reads (indexes them lazily).
    fresh = TFDSDataset(data["tfds"], "train", CLASSES).source
    fresh._ds = None
    items = [ds.records[i].source_index for i in loaders[0].local_indices(0, 0)]
    for i in items:
        fresh.load_image(i)
    source = fresh.open()
    shards = {source.files[source.locate(i)[0]] for i in items}
    assert source.opened_files() == sorted(shards)


def test_damaged_records_are_named_and_skipped(data, tmp_path, caplog):
    shutil.copytree(os.path.join(FIXTURE, "tfds"), tmp_path / "ds")
    shards = sorted(str(p) for p in (tmp_path / "ds").glob("*.tfrecord-*"))
    offsets = [tfrecord.scan_shard(s)[0] for s in shards]
    sizes = [len(o) for o in offsets]
    with open(shards[0], "r+b") as f:  # a byte of record 1's data flipped
        f.seek(int(offsets[0][1]) + 12 + 40)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    with open(shards[1], "r+b") as f:  # the length field of record 0 flipped
        f.seek(int(offsets[1][0]) + 2)
        f.write(b"\x7f")
    os.truncate(shards[2], os.path.getsize(shards[2]) - 7)  # the last record cut
    with caplog.at_level(logging.WARNING, logger="nanodet_jax"):
        ds = TFDSDataset(str(tmp_path / "ds"), "train", CLASSES)
    assert len(ds) == NUM_IMAGES - 1 - sizes[1] - 1
    assert f"{sizes[1] + 2} unreadable records skipped" in caplog.text
    source = ds.source.open()
    start = np.cumsum([0] + sizes)
    messages = {
        start[0] + 1: f"{shards[0]}: record 1 at byte {offsets[0][1]}: data checksum mismatch",
        start[1]: f"{shards[1]}: record 0 unreadable: record at byte {offsets[1][0]}: length "
        "checksum mismatch",
        start[2] + sizes[2] - 1: f"{shards[2]}: record {sizes[2] - 1} unreadable: record at "
        f"byte {offsets[2][-1]} cut short",
    }
    for index, message in messages.items():
        with pytest.raises(tfrecord.RecordReadError, match="^" + message.replace("[", r"\[")):
            ds.source.load_image(int(index))
    assert source.read_bytes(int(start[0]))  # the undamaged records still read


def test_remote_shards_read_through_the_path_layer(data, fake_gcs, tmp_path, monkeypatch):
    """A tfrecord dataset on ``gs://`` (the fake bucket of tests/test_paths.py): the same
    examples as the local copy, the shards read by seek + read, the index in the cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    shutil.copytree(  # without the indexes earlier tests wrote beside the local shards
        data["tfds"], tmp_path / "gcs" / "bucket" / "ds",
        ignore=shutil.ignore_patterns(f"*{tfrecord.INDEX_SUFFIX}"),
    )  # fmt: skip
    remote = TFDSDataset(f"{fake_gcs}/ds", "train", CLASSES)
    local = data["tfrecord"]
    assert len(remote) == len(local)
    assert all(f.startswith("gs://") for f in remote.source.open().files)
    for a, b in zip(remote.records, local.records):
        assert a.image_id == b.image_id
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(load_image(a), load_image(b))
    indexes = list((tmp_path / "cache").rglob(f"*{tfrecord.INDEX_SUFFIX}"))
    assert len(indexes) == NUM_SHARDS
    assert not list((tmp_path / "gcs").rglob(f"*{tfrecord.INDEX_SUFFIX}"))  # not in the bucket
