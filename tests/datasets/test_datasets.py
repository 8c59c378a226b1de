"""Dataset formats: the same synthetic images and boxes written as COCO json, Pascal VOC
xml, YOLO txt and TFDS array_record give the same records and the same training batches;
NanoDet's VOC/YOLO conventions; header image sizes; the TF-free TFDS export round trip."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pickle
import struct
import sys

import cv2
import numpy as np
import pytest

from nanodet_jax.config.defaults import nanodet_plus_config
from nanodet_jax.data import synthetic
from nanodet_jax.data.coco import ImageReadError, load_image
from nanodet_jax.data.datasets import XMLDataset, YoloDataset, build_dataset
from nanodet_jax.data.image_size import encoded_image_size, image_size
from nanodet_jax.data.pipeline import TrainLoader

CLASSES = list(synthetic.CLASSES)
CROWD_ANN = 3  # this annotation is marked crowd: an ignore box in COCO, VOC, TFDS
# TFDS stores boxes normalised as float32: x/W then *W is off by <= 2^-24 * W relative,
# about 2e-5 px at 96 px; 1e-3 px bounds it with margin (and is far below any real effect).
TFDS_ATOL = 1e-3
HAVE_TFDS = importlib.util.find_spec("tensorflow_datasets") is not None


def write_voc(coco: dict, xml_dir: str, crowd_as_difficult: bool = True) -> None:
    os.makedirs(xml_dir, exist_ok=True)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    for img in coco["images"]:
        objs = []
        for ann in coco["annotations"]:
            if ann["image_id"] != img["id"]:
                continue
            x, y, w, h = (int(v) for v in ann["bbox"])  # synthetic boxes are whole pixels
            difficult = int(bool(ann["iscrowd"]) and crowd_as_difficult)
            objs.append(
                f"<object><name>{names[ann['category_id']]}</name><difficult>{difficult}"
                f"</difficult><bndbox><xmin>{x}</xmin><ymin>{y}</ymin><xmax>{x + w}</xmax>"
                f"<ymax>{y + h}</ymax></bndbox></object>"
            )
        xml = (
            f"<annotation><filename>{img['file_name']}</filename><size><width>{img['width']}"
            f"</width><height>{img['height']}</height><depth>3</depth></size>"
            + "".join(objs) + "</annotation>"
        )  # fmt: skip
        stem = os.path.splitext(img["file_name"])[0]
        with open(os.path.join(xml_dir, stem + ".xml"), "w") as f:
            f.write(xml)


def write_yolo(coco: dict, txt_dir: str) -> None:
    """YOLO has no crowd/ignore notion: crowd objects are left out."""
    os.makedirs(txt_dir, exist_ok=True)
    for img in coco["images"]:
        w_img, h_img = img["width"], img["height"]
        lines = []
        for ann in coco["annotations"]:
            if ann["image_id"] == img["id"] and not ann["iscrowd"]:
                x, y, w, h = ann["bbox"]
                cx, cy = (x + w / 2) / w_img, (y + h / 2) / h_img
                # 6 decimals, as YOLO tools write: error <= 5e-7 * 96 px, far inside the
                # 0.5 px margin of NanoDet's integer rounding, so whole-pixel boxes return
                # exactly (asserted below with no tolerance).
                lines.append(
                    f"{ann['category_id'] - 1} {cx:.6f} {cy:.6f} {w / w_img:.6f} {h / h_img:.6f}"
                )
        stem = os.path.splitext(img["file_name"])[0]
        with open(os.path.join(txt_dir, stem + ".txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """{format: dataset} for the same 12 images."""
    out = str(tmp_path_factory.mktemp("formats"))
    paths = synthetic.write_dataset(out, num_train=12, num_val=0, size=96, seed=3)
    img_dir = os.path.join(out, "train")
    with open(paths["train"]) as f:
        coco = json.load(f)
    coco["annotations"][CROWD_ANN]["iscrowd"] = 1
    ann_file = os.path.join(out, "crowd.json")
    with open(ann_file, "w") as f:
        json.dump(coco, f)
    write_voc(coco, os.path.join(out, "xml"))
    write_yolo(coco, os.path.join(out, "labels"))
    cfgs = {
        "coco": {"name": "CocoDataset", "ann_file": ann_file, "img_dir": img_dir},
        "voc": {"name": "XMLDataset", "ann_file": f"{out}/xml", "img_dir": img_dir,
                "difficult": "ignore"},
        "yolo": {"name": "YoloDataset", "ann_file": f"{out}/labels", "img_dir": img_dir},
    }  # fmt: skip
    if HAVE_TFDS:  # the optional [tfds] extra; the other formats are compared without it
        from nanodet_jax.data import tfds_export

        tfds_export.main(["--ann", ann_file, "--img-dir", img_dir, "--out", f"{out}/tfds"])
        cfgs["tfds"] = {"name": "TFDSDataset", "img_dir": f"{out}/tfds", "split": "train"}
    return {k: build_dataset(cfg, CLASSES) for k, cfg in cfgs.items()}


@pytest.mark.skipif(not HAVE_TFDS, reason="needs tensorflow-datasets (the [tfds] extra)")
def test_tfds_round_trip(formats):
    ds = formats["tfds"]
    assert "tfds" in formats and ds.split == "train" and len(ds) == 12
    assert "tensorflow" not in sys.modules  # written and read without TensorFlow
    # Records of a TFDS source survive pickling (worker processes) and still load.
    record = pickle.loads(pickle.dumps(ds.records[5]))
    np.testing.assert_array_equal(load_image(record), load_image(formats["coco"].records[5]))
    with pytest.raises(ImageReadError, match=r"tfds\[train\]\[99\]"):
        ds.source.load_image(99)


def test_records_match_across_formats(formats):
    ref = formats["coco"].records
    assert len(ref) == 12 and sum(len(r.ignore_boxes) for r in ref) == 1
    for name, ds in formats.items():
        assert ds.class_names == CLASSES and len(ds.cat_ids) == 3, name
        assert [r.image_id for r in ds.records] == [r.image_id for r in ref], name
        for a, b in zip(ds.records, ref):
            assert (a.width, a.height) == (b.width, b.height), name
            np.testing.assert_array_equal(a.labels, b.labels, err_msg=name)
            if name == "tfds":
                np.testing.assert_allclose(a.boxes, b.boxes, rtol=0, atol=TFDS_ATOL)
            else:  # whole-pixel boxes: VOC ints and YOLO's rounded ints are exact
                np.testing.assert_array_equal(a.boxes, b.boxes, err_msg=name)
            if name != "yolo":
                np.testing.assert_allclose(a.ignore_boxes, b.ignore_boxes, atol=TFDS_ATOL)
            np.testing.assert_array_equal(load_image(a), load_image(b), err_msg=name)


def test_training_batches_match_across_formats(formats):
    pipeline = nanodet_plus_config().data.train.pipeline.to_dict()
    args = dict(input_size=(64, 64), pipeline=pipeline, global_batch_size=4, seed=7)
    batches = {
        name: [TrainLoader(ds.records, **args).batch(0, step) for step in range(2)]
        for name, ds in formats.items()
    }
    assert all(b["gt_mask"].sum() > 4 for b in batches["coco"])  # real boxes compared
    for name, got in batches.items():
        for step, (a, b) in enumerate(zip(got, batches["coco"])):
            for key in a:
                msg = f"{name} step {step} {key}"
                if key == "gt_boxes" and name == "tfds":
                    np.testing.assert_allclose(a[key], b[key], atol=TFDS_ATOL, err_msg=msg)
                else:
                    np.testing.assert_array_equal(a[key], b[key], err_msg=msg)


def test_coco_ground_truth_for_every_format(formats):
    from nanodet_jax.evaluation.coco_eval import coco_evaluate

    for name, ds in formats.items():
        dets = [
            {"image_id": r.image_id, "category_id": ds.cat_ids[int(lbl)], "score": 1.0,
             "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]}
            for r in ds.records for (x1, y1, x2, y2), lbl in zip(r.boxes, r.labels)
        ]  # fmt: skip
        stats = coco_evaluate(ds, dets)["stats"]
        assert stats["AP"] == pytest.approx(1.0), name


def _voc(tmp_path, objects: str, size: str = "<size><width>96</width><height>72</height></size>"):
    img_dir, xml_dir = tmp_path / "img", tmp_path / "xml"
    img_dir.mkdir(exist_ok=True)
    xml_dir.mkdir(exist_ok=True)
    cv2.imwrite(str(img_dir / "a.jpg"), np.zeros((72, 96, 3), np.uint8))
    (xml_dir / "a.xml").write_text(
        f"<annotation><filename>a.jpg</filename>{size}{objects}</annotation>"
    )
    return str(img_dir), str(xml_dir)


def _obj(name: str, box: tuple, difficult: int = 0) -> str:
    x1, y1, x2, y2 = box
    return (
        f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x1}"
        f"</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
    )


def test_voc_nanodet_semantics(tmp_path, caplog):
    objects = (
        _obj("square", (10, 10, 30, 40), difficult=1)
        + _obj("hexagon", (1, 1, 20, 20)) + _obj("hexagon", (2, 2, 20, 20))
        + _obj("circle", (-5, 4, 15, 24))  # corner clamped to 0, width kept (NanoDet)
        + _obj("circle", (50, 50, 40, 60))  # negative width: dropped
        + _obj("triangle", (0, 0, 200, 30))  # width clamped to the image width
    )  # fmt: skip
    img_dir, xml_dir = _voc(tmp_path, objects)
    with caplog.at_level(logging.WARNING, logger="nanodet_jax"):
        keep = XMLDataset(img_dir, xml_dir, CLASSES)
    assert sum("hexagon" in m for m in caplog.messages) == 1  # warned once per name
    [rec] = keep.records
    assert (rec.image_id, rec.width, rec.height) == (1, 96, 72)
    # NanoDet reads no <difficult>: a difficult object is an ordinary box.
    np.testing.assert_array_equal(rec.boxes, [[10, 10, 30, 40], [0, 4, 20, 24], [0, 0, 96, 30]])
    np.testing.assert_array_equal(rec.labels, [1, 0, 2])
    [rec] = XMLDataset(img_dir, xml_dir, CLASSES, difficult="ignore").records
    np.testing.assert_array_equal(rec.ignore_boxes, [[10, 10, 30, 40]])
    np.testing.assert_array_equal(rec.labels, [0, 2])
    raw = keep.raw_images()[0].annotations
    assert [a.label for a in raw] == [1, -1, -1, 0, 0, 2] and raw[4].kept_box is None


def test_voc_size_fallback_and_malformed(tmp_path):
    img_dir, xml_dir = _voc(tmp_path, _obj("circle", (1, 1, 9, 9)), size="")
    [rec] = XMLDataset(img_dir, xml_dir, CLASSES).records
    assert (rec.width, rec.height) == (96, 72)  # no <size>: read from the image
    bad = tmp_path / "xml" / "b.xml"
    bad.write_text("<annotation><filename>b.jpg</filename><object>")
    with pytest.raises(ValueError, match="b.xml: malformed XML"):
        XMLDataset(img_dir, xml_dir, CLASSES)
    bad.write_text(
        f"<annotation><filename>a.jpg</filename>{_obj('circle', (1, 'x', 2, 3))}</annotation>"
    )
    with pytest.raises(ValueError, match=r"b.xml: object 0: <ymin>"):
        XMLDataset(img_dir, xml_dir, CLASSES)


def test_yolo_nanodet_semantics(tmp_path, caplog):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((72, 96, 3), np.uint8))
    (tmp_path / "a.txt").write_text("1 0.5 0.5 0.25 0.5\n\n7 0.5 0.5 0.1 0.1\n0 0.05 0.5 0.2 0.2\n")
    (tmp_path / "classes.txt").write_text("circle\nsquare\ntriangle\n")  # no image: skipped
    with caplog.at_level(logging.WARNING, logger="nanodet_jax"):
        ds = YoloDataset(str(tmp_path), str(tmp_path), CLASSES)
    assert any("classes.txt" in m for m in caplog.messages) and len(ds.skipped) == 1
    [rec] = ds.records
    assert rec.image_id == 1 and (rec.width, rec.height) == (96, 72)
    # x = round((cx - w/2) * W), w = round(w * W); a negative corner is clamped to 0
    # with the width kept (NanoDet); class 7 is unknown and dropped.
    np.testing.assert_array_equal(rec.boxes, [[36, 18, 60, 54], [0, 29, 19, 43]])
    np.testing.assert_array_equal(rec.labels, [1, 0])
    (tmp_path / "a.txt").write_text("1 0.5 0.5\n")
    with pytest.raises(ValueError, match=r"a.txt:1: expected"):
        YoloDataset(str(tmp_path), str(tmp_path), CLASSES)


def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    tiff = (
        b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0)
    )
    app1 = b"Exif\x00\x00" + tiff + b"\x00\x00\x00\x00"
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".bmp", "rot.jpg", "prog.jpg"])
def test_image_size_matches_decoder(tmp_path, suffix):
    img = np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    path = str(tmp_path / f"x{suffix}")
    params = [cv2.IMWRITE_JPEG_PROGRESSIVE, 1] if suffix == "prog.jpg" else []
    ok, data = cv2.imencode("." + suffix.split(".")[-1], img, params)
    data = data.tobytes()
    if suffix == "rot.jpg":  # cv2 turns EXIF orientation 6 images by 90 degrees
        data = _with_exif_orientation(data, 6)
    with open(path, "wb") as f:
        f.write(data)
    h, w = cv2.imread(path, cv2.IMREAD_COLOR).shape[:2]
    assert image_size(path) == encoded_image_size(data, path) == (w, h)
    if suffix == "rot.jpg":
        assert (w, h) == (37, 53)


def test_build_dataset_errors():
    with pytest.raises(ValueError, match="unknown dataset name"):
        build_dataset({"name": "Nope"}, CLASSES)
    with pytest.raises(ValueError, match="needs class_names"):
        build_dataset({"name": "XMLDataset", "img_dir": "a", "ann_file": "b"}, None)
