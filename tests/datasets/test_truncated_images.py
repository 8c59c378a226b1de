"""Truncated JPEG / PNG files: cv2 decodes a JPEG cut to a third of its bytes as a
half-grey image without failing, so ``data/image_integrity.py`` finds them from their end
markers; ``read_image`` and the TFDS decoder refuse them, the dataset check reports them
(decoding or not) and training skips them with a warning naming the file."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from nanodet_jax.cli import check_dataset
from nanodet_jax.config.defaults import nanodet_plus_config
from nanodet_jax.data.coco import CocoDetection, ImageReadError, read_image
from nanodet_jax.data.image_integrity import truncation_problem, truncation_problem_bytes
from nanodet_jax.data.pipeline import TrainLoader
from nanodet_jax.data.tfds_dataset import decode_image
from tests.conftest import config_path

CUT_JPEG, CUT_PNG = "truncated JPEG", "truncated PNG"


def _encode(ext: str) -> bytes:
    """A 64x48 image with detail in every row (a cut file then loses real content)."""
    y, x = np.mgrid[0:48, 0:64]
    img = np.stack([x * 4, y * 5, (x * y) % 256], -1).astype(np.uint8)
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("truncated")
    jpeg, png = _encode(".jpg"), _encode(".png")
    contents = {
        "full.jpg": jpeg,
        "cut.jpg": jpeg[: len(jpeg) // 3],
        "padded.jpg": jpeg + b"\x00" * 64,  # zero padding after the end marker
        # A camera trailer longer than the tail read: the slow path, still complete.
        "trailer.jpg": jpeg + b"MotionPhoto_Data" * 600,
        "full.png": png,
        "cut.png": png[: len(png) // 3],
    }
    for name, data in contents.items():
        (out / name).write_bytes(data)
    return {name: out / name for name in contents}


def test_end_markers_tell_cut_files_from_complete_ones(files):
    expected = {"cut.jpg": CUT_JPEG, "cut.png": CUT_PNG}
    for name, path in files.items():
        problem = truncation_problem(str(path))
        assert (problem or "").startswith(expected.get(name, "")), (name, problem)
        assert (problem is None) == (name not in expected), (name, problem)
        assert truncation_problem_bytes(path.read_bytes()) == problem, name
    # The premise: cv2 alone takes the cut JPEG for an image (it fails on the cut PNG).
    assert cv2.imread(str(files["cut.jpg"])).shape == (48, 64, 3)


def test_read_image_and_tfds_decode_refuse_cut_files(files):
    assert read_image(str(files["trailer.jpg"])).shape == (48, 64, 3)
    for name in ("cut.jpg", "cut.png"):
        with pytest.raises(ImageReadError, match=rf"^{files[name]}: truncated"):
            read_image(str(files[name]))
        with pytest.raises(ImageReadError, match=r"^item 7: truncated"):
            decode_image(files[name].read_bytes(), "item 7")


def _coco(tmp: Path, names: list[str]) -> Path:
    cats = [{"id": 1, "name": "circle"}]
    images = [{"id": i + 1, "file_name": n, "width": 64, "height": 48} for i, n in enumerate(names)]
    anns = [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [4, 4, 20, 20],
             "area": 400.0, "iscrowd": 0} for i in range(len(names))]  # fmt: skip
    path = tmp / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


@pytest.mark.parametrize("decode", [True, False])
def test_dataset_check_reports_truncated_files(files, tmp_path, capsys, decode):
    ann = _coco(tmp_path, ["full.jpg", "cut.jpg", "full.png", "cut.png"])
    code = check_dataset.main([
        "--config", config_path("nanodet_plus_m.py"), "--split", "train",
        "--config.class_names=['circle']", f"--config.data.train.ann_file={ann}",
        f"--config.data.train.img_dir={files['full.jpg'].parent}",
        *([] if decode else ["--no-decode"]),
    ])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 1, text
    assert "ERROR: broken images (missing, truncated or undecodable): 2" in text, text
    assert f"{files['cut.jpg']}: {CUT_JPEG}" in text, text
    assert f"{files['cut.png']}: {CUT_PNG}" in text, text


def test_training_skips_a_truncated_image_with_a_warning(files, tmp_path, caplog):
    ann = _coco(tmp_path, ["full.jpg", "cut.jpg"])
    records = CocoDetection(str(ann), str(files["full.jpg"].parent)).records
    records = [dataclasses.replace(records[1], image_id=5), records[0]]  # the cut one first
    pipeline = nanodet_plus_config().data.train.pipeline.to_dict()
    ld = TrainLoader(records, input_size=(64, 64), pipeline=pipeline, global_batch_size=2)
    with caplog.at_level(logging.WARNING, logger="nanodet_jax"):
        sample = ld.load_sample(0, 0, 32)
    assert int(sample["image_id"]) == records[1].image_id  # the complete stand-in
    assert [r.getMessage() for r in caplog.records] == [
        f"skipping unreadable training image {files['cut.jpg']}: {CUT_JPEG} "
        "(no end-of-image marker after its last scan)"
    ]
