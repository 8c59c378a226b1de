"""The path layer (nanodet_jax/paths.py): local paths and gs:// URLs through the same calls.

``gs://`` here is a stand-in: fsspec's ``gcs`` protocol registered as a folder of the test's
tmp dir (fsspec's DirFileSystem), so epath takes its real fsspec route, with URLs, listing
and scheme-less walk roots as gcsfs gives them, without a network. Anything that reached
``os`` / ``open`` / ``cv2.imread`` with such a URL would find no file.
"""

from __future__ import annotations

import importlib
import json
import logging
import os

import cv2
import fsspec
import numpy as np
import pytest
from etils.epath import backend, gpath
from fsspec.implementations.dirfs import DirFileSystem

from nanodet_jax import paths

fsspec_registry = importlib.import_module("fsspec.registry")  # the module, not the mapping


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """``gs://bucket/...`` stored under ``tmp_path / "gcs"``; returns ``gs://bucket``."""
    root = tmp_path / "gcs"
    root.mkdir()

    class FakeGCS(DirFileSystem):
        protocol = ("gs", "gcs")

        def __init__(self, *args, **kwargs):
            super().__init__(path=str(root), fs=fsspec.filesystem("file"))

        @classmethod
        def _strip_protocol(cls, path):
            path = fsspec.utils.stringify_path(path)
            for prefix in ("gs://", "gcs://"):
                path = path.removeprefix(prefix)
            return path.rstrip("/")

    def reset():
        backend.fsspec_backend._get_filesystem.cache_clear()
        paths._backend_problem.cache_clear()
        fsspec.AbstractFileSystem.clear_instance_cache()

    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # fsspec, not gfile
    for protocol in ("gs", "gcs"):  # fsspec's registry of classes, restored afterwards
        monkeypatch.setitem(fsspec_registry._registry, protocol, FakeGCS)
    reset()
    (root / "bucket").mkdir()
    yield "gs://bucket"
    monkeypatch.undo()
    reset()


@pytest.fixture(params=["local", "gs"])
def base(request, tmp_path):
    """The same tests on a local folder and on the fake bucket."""
    if request.param == "local":
        return str(tmp_path / "local")
    return request.getfixturevalue("fake_gcs") + "/run"


def test_is_remote_join_abspath():
    assert paths.is_remote("gs://b/x") and paths.is_remote("s3://b")
    assert not paths.is_remote("/data/x") and not paths.is_remote("rel/x")
    assert paths.join("gs://b", "a", "c.json") == "gs://b/a/c.json"
    assert paths.abspath("gs://b/a") == "gs://b/a"
    assert paths.abspath("rel") == os.path.join(os.getcwd(), "rel")


def test_read_write_list(base):
    sub = paths.join(base, "a", "b")
    paths.makedirs(sub)
    paths.makedirs(sub)  # exists: fine
    paths.write_text(paths.join(sub, "x.json"), '{"k": 1}')
    paths.write_bytes(paths.join(base, "a", "y.bin"), b"\x00\xff")
    assert paths.isdir(sub) and not paths.isfile(sub)
    assert paths.isfile(paths.join(sub, "x.json")) and paths.exists(paths.join(sub, "x.json"))
    assert not paths.exists(paths.join(base, "nope"))
    assert json.loads(paths.read_text(paths.join(sub, "x.json"))) == {"k": 1}
    assert paths.read_bytes(paths.join(base, "a", "y.bin")) == b"\x00\xff"
    assert sorted(paths.listdir(paths.join(base, "a"))) == ["b", "y.bin"]
    assert paths.glob(paths.join(base, "a", "*.bin")) == [paths.join(base, "a", "y.bin")]
    assert sorted(paths.walk_files(base)) == ["a/b/x.json", "a/y.bin"]
    with paths.open_file(paths.join(base, "a", "y.bin"), "rb") as f:  # seekable
        assert f.seek(0, 2) == 2 and f.seek(1) == 1 and f.read() == b"\xff"
    files = [paths.join(sub, "x.json"), paths.join(sub, "gone.json"), paths.join(base, "z", "q")]
    assert paths.missing_files(files) == files[1:]
    paths.remove(paths.join(sub, "x.json"))
    assert not paths.exists(paths.join(sub, "x.json"))
    paths.rmtree(paths.join(base, "a"))
    assert not paths.exists(paths.join(base, "a"))


def test_append_and_atomic_replace(base, monkeypatch):
    log = paths.join(base, "metrics.jsonl")
    paths.makedirs(base)
    paths.append_text(log, "1\n")  # created
    paths.append_text(log, "2\n")
    assert paths.read_text(log) == "1\n2\n"
    paths.write_atomic(log, "3\n")
    paths.write_atomic(paths.join(base, "c.png"), b"\x89PNG")
    assert (
        paths.read_text(log) == "3\n" and paths.read_bytes(paths.join(base, "c.png")) == b"\x89PNG"
    )
    assert sorted(paths.listdir(base)) == ["c.png", "metrics.jsonl"]  # no .tmp left
    if not paths.is_remote(base):
        # Local: the file changes only by the rename; a failure before it keeps the old one.
        def fail(*args):
            raise OSError("killed")

        monkeypatch.setattr(type(paths.as_path(log)), "replace", fail)
        with pytest.raises(OSError, match="killed"):
            paths.write_atomic(log, "4\n")
        assert paths.read_text(log) == "3\n"
        assert not [n for n in paths.listdir(base) if n.endswith(".tmp")]  # removed
    else:  # an object store has no append / rename: one whole upload instead
        with pytest.raises(ValueError, match="cannot append"):
            paths.open_file(log, "a")


def test_unsupported_scheme_and_missing_backend(monkeypatch):
    with pytest.raises(paths.RemotePathError, match="unsupported URL scheme ftp://"):
        paths.exists("ftp://host/x")

    def no_gcsfs(protocol):
        raise ImportError("Please install gcsfs")

    monkeypatch.setattr(fsspec, "get_filesystem_class", no_gcsfs)
    monkeypatch.setattr(paths.importlib.util, "find_spec", lambda name: None)
    paths._backend_problem.cache_clear()
    try:
        with pytest.raises(paths.RemotePathError, match=r"gs://b/x: gs:// paths need gcsfs"):
            paths.read_bytes("gs://b/x")
    finally:
        paths._backend_problem.cache_clear()


def _image(seed: int, shape=(37, 53, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


def test_read_image_same_pixels_as_imread(tmp_path):
    """read_image decodes the layer's bytes with cv2.imdecode: the pixels of cv2.imread
    (EXIF orientation too), and a cut file is still caught before decoding."""
    from nanodet_jax.data.coco import ImageReadError, read_image
    from tests.datasets.test_datasets import _with_exif_orientation

    for name, params in [("a.jpg", []), ("b.png", []), ("c.bmp", []), ("rot.jpg", [])]:
        ok, data = cv2.imencode(os.path.splitext(name)[1], _image(len(name)), params)
        data = data.tobytes()
        if name == "rot.jpg":
            data = _with_exif_orientation(data, 6)
        (tmp_path / name).write_bytes(data)
        expected = cv2.imread(str(tmp_path / name), cv2.IMREAD_COLOR)
        got = read_image(str(tmp_path / name))
        assert got.dtype == np.uint8 and np.array_equal(got, expected), name
    assert read_image(str(tmp_path / "rot.jpg")).shape[:2] == (53, 37)
    cut = (tmp_path / "a.jpg").read_bytes()[:-300]
    (tmp_path / "cut.jpg").write_bytes(cut)
    with pytest.raises(ImageReadError, match="cut.jpg: truncated JPEG"):
        read_image(str(tmp_path / "cut.jpg"))
    with pytest.raises(ImageReadError, match="nope.jpg: image file not found"):
        read_image(str(tmp_path / "nope.jpg"))
    with pytest.raises(ImageReadError, match="image file not found"):
        read_image(str(tmp_path))  # a folder


def test_datasets_and_outputs_on_gs(fake_gcs, tmp_path, caplog, monkeypatch):
    """A COCO, a VOC and a YOLO dataset in the bucket load as their local copies do; the
    dataset check, eval results, predict outputs and the training log write into it."""
    from nanodet_jax.cli.predict import image_paths, predict_paths
    from nanodet_jax.data.check import check_dataset
    from nanodet_jax.data.coco import load_image, read_image, require_image_files
    from nanodet_jax.data.datasets import CocoDataset, XMLDataset, YoloDataset
    from nanodet_jax.data.synthetic import CLASSES, write_dataset
    from nanodet_jax.evaluation import coco_eval
    from nanodet_jax.training import loop
    from nanodet_jax.training.training_log import TrainingLog, evaluated_steps
    from nanodet_jax.weights import checkpoint
    from tests.datasets.test_corruption import StandIn

    data = fake_gcs + "/data"
    anns = write_dataset(data, num_train=3, num_val=0, size=64, seed=1)
    assert anns["train"] == data + "/annotations/instances_train.json"
    local = tmp_path / "gcs" / "bucket" / "data"  # the same bytes, read by os
    coco = CocoDataset(anns["train"], data + "/train")
    local_coco = CocoDataset(str(local / "annotations/instances_train.json"), str(local / "train"))
    assert [r.path for r in coco.records] == [f"{data}/train/{i:06d}.jpg" for i in (1, 2, 3)]
    require_image_files(coco.records, anns["train"])
    for rec, ref in zip(coco.records, local_coco.records):
        assert np.array_equal(load_image(rec), cv2.imread(ref.path))
        np.testing.assert_array_equal(rec.boxes, ref.boxes)

    # VOC xml and YOLO txt beside the images (one of them in a sub-folder).
    rec = coco.records[0]
    box = rec.boxes[0]
    corners = "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
    xml = (
        f"<annotation><filename>{os.path.basename(rec.path)}</filename><object>"
        f"<name>{CLASSES[rec.labels[0]]}</name><bndbox>{corners}</bndbox></object></annotation>"
    )
    paths.makedirs(data + "/xml/sub")
    paths.write_text(data + "/xml/sub/a.xml", xml)
    voc = XMLDataset(data + "/train", data + "/xml", CLASSES)
    assert voc.records[0].path == rec.path and (voc.records[0].width, voc.records[0].height) == (
        rec.width,
        rec.height,
    )  # fmt: skip  (no <size>: from the image header, remotely)
    np.testing.assert_array_equal(voc.records[0].boxes, [box])
    paths.makedirs(data + "/yolo")
    paths.write_text(data + "/yolo/000002.txt", "0 0.5 0.5 0.25 0.25\n")
    paths.write_text(data + "/yolo/missing.txt", "0 0.5 0.5 0.25 0.25\n")
    yolo = YoloDataset(data + "/train", data + "/yolo", CLASSES)
    assert [r.path for r in yolo.records] == [coco.records[1].path] and len(yolo.skipped) == 1

    split = {"name": "CocoDataset", "img_dir": data + "/train", "ann_file": anns["train"]}
    report = check_dataset(split, None, decode=False)
    assert report.images == 3 and not report.errors, report.format()

    out = fake_gcs + "/eval"
    coco_eval.write_results(out, [{"image_id": 1}], {"stats": {"AP": 0.5}, "per_class": {}})
    assert json.loads(paths.read_text(out + "/metrics.json"))["stats"] == {"AP": 0.5}

    images = image_paths([data + "/train"])
    assert images == [r.path for r in coco.records]
    paths.write_bytes(data + "/train/broken.jpg", b"\xff\xd8 cut")
    predict_paths(StandIn(), [*images, data + "/train/broken.jpg"], fake_gcs + "/pred")
    drawn = cv2.imdecode(
        np.frombuffer(paths.read_bytes(fake_gcs + "/pred/000001.jpg"), np.uint8), 1
    )
    assert drawn.shape == read_image(images[0]).shape
    assert len(json.loads(paths.read_text(fake_gcs + "/pred/predictions.json"))) == 3
    assert "broken.jpg" in paths.read_text(fake_gcs + "/pred/skipped.json")

    workdir = fake_gcs + "/workdir"
    from tensorboardX import record_writer

    monkeypatch.setattr(record_writer, "GCS_ENABLED", False)
    with caplog.at_level(logging.WARNING, logger="nanodet_jax"):
        history = TrainingLog(workdir, progress_bar=False)
    assert any("google-cloud-storage" in m for m in caplog.messages)
    values = {"loss": 1.0, "loss_qfl": 0.5, "lr": 0.1, "img_per_s": 1.0}
    history.log_train(1, 0, values)
    history.log_eval(2, 1, {"AP": 0.1, "AP50": 0.2})
    history.log_train(3, 1, values)
    history.resume_at(2)
    history.finish()
    assert evaluated_steps(workdir) == {2}
    lines = paths.read_text(workdir + "/metrics.jsonl").splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert paths.read_bytes(workdir + "/curves.png").startswith(b"\x89PNG")
    loop.record_samples(workdir, 0, 0, np.array([3, 1]))
    assert "[3, 1]" in paths.read_text(workdir + "/samples_p0.jsonl")
    assert loop.best_record(workdir) == -1.0  # no best/ yet
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        checkpoint.restore_weights(workdir + "/best", None)
    assert sorted(paths.listdir(workdir)) == ["curves.png", "metrics.jsonl", "samples_p0.jsonl"]
