"""``python -m nanodet_jax.data.check``: each planted fault is reported by file or image id
and fails the check; a clean dataset passes."""

from __future__ import annotations

import copy
import json
import os

import cv2
import numpy as np
import pytest

from nanodet_jax.cli import check_dataset
from nanodet_jax.data import synthetic
from tests.conftest import REPO

CONFIG = os.path.join(REPO, "configs", "nanodet_plus_m.py")
CLASSES = f"--config.class_names={list(synthetic.CLASSES)}"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("check")
    paths = synthetic.write_dataset(str(out), num_train=6, num_val=0, size=64, seed=2)
    with open(paths["train"]) as f:
        coco = json.load(f)
    (out / "train" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return out, coco


def run(
    capsys, out, coco: dict, name: str, *extra: str, val: dict | None = None
) -> tuple[int, str]:
    """The check on ``coco`` as the train split (and ``val`` as the val split: ``--split both``)."""
    args = []
    for role, split in (("train", coco), ("val", val)):
        if split is not None:
            ann = out / f"{name}_{role}.json"
            ann.write_text(json.dumps(split))
            args += [f"--config.data.{role}.ann_file={ann}",
                     f"--config.data.{role}.img_dir={out / 'train'}"]  # fmt: skip
    which = "train" if val is None else "both"
    code = check_dataset.main(["--config", CONFIG, "--split", which, CLASSES, *args, *extra])
    return code, capsys.readouterr().out


def _add_image(coco: dict, file_name: str, image_id: int, size: tuple = (64, 64)) -> None:
    w, h = size
    coco["images"].append({"id": image_id, "file_name": file_name, "width": w, "height": h})


def _add_box(coco: dict, image_id: int, bbox: list, category_id: int = 1) -> None:
    n = len(coco["annotations"]) + 1
    ann = {"id": n, "image_id": image_id, "category_id": category_id, "bbox": bbox,
           "area": float(bbox[2] * bbox[3]), "iscrowd": 0}  # fmt: skip
    coco["annotations"].append(ann)


def test_clean_dataset_passes(base, capsys):
    out, coco = base
    code, text = run(capsys, out, coco, "clean")
    assert code == 0, text
    assert "6 images" in text and "| circle |" in text and "0 errors" in text


# fault name -> (edit of the COCO dict, the heading expected, what the message must name)
FAULTS = {
    "missing image": (lambda c: _add_image(c, "gone.jpg", 100), "broken images", "gone.jpg"),
    "corrupt jpeg": (lambda c: _add_image(c, "corrupt.jpg", 101), "broken images", "corrupt.jpg"),
    "box outside": (lambda c: _add_box(c, 2, [500, 500, 9, 9]), "outside the image", "image id 2"),
    "zero-area box": (lambda c: _add_box(c, 3, [5, 5, 0, 10]), "degenerate boxes", "image id 3"),
    "unknown class": (lambda c: _add_box(c, 4, [5, 5, 9, 9], 99), "unknown classes", "image id 4"),
    "duplicate id": (
        lambda c: c["images"].append({**c["images"][0], "file_name": "000002.jpg"}),
        "duplicate image ids",
        "image id 1",
    ),
    "size mismatch": (
        lambda c: c["images"][4].update(width=77),
        "image size differs",
        "000005.jpg",
    ),
}  # fmt: skip


@pytest.mark.parametrize("fault", list(FAULTS))
def test_planted_fault_fails(base, capsys, fault):
    out, coco = base
    edit, heading, named = FAULTS[fault]
    coco = copy.deepcopy(coco)
    edit(coco)
    code, text = run(capsys, out, coco, fault.replace(" ", "_"))
    assert code == 1, text
    lines = [line for line in text.splitlines() if named in line]
    assert any(heading in part for part in text.split("ERROR: ")[1:]), text
    assert lines, f"{named!r} not named in:\n{text}"


def _first_images(coco: dict, n: int) -> dict:
    """The first ``n`` images of ``coco`` and their annotations (a val split of the same files)."""
    ids = {img["id"] for img in coco["images"][:n]}
    return {**coco, "images": coco["images"][:n],
            "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}  # fmt: skip


def test_split_both_reports_each_split(base, capsys):
    out, coco = base
    val = _first_images(coco, 3)
    code, text = run(capsys, out, coco, "both_clean", val=val)
    assert code == 0, text
    train_part, val_part = text.split("== val: ")
    assert train_part.startswith("== train: 6 images") and "ERROR" not in train_part, text
    assert val_part.startswith("3 images") and "no problems found" in val_part, text
    assert text.rstrip().endswith("0 errors"), text
    # One fault in each split: each reported under its own split, both counted.
    bad_train, bad_val = copy.deepcopy(coco), copy.deepcopy(val)
    FAULTS["zero-area box"][0](bad_train)  # image id 3
    FAULTS["box outside"][0](bad_val)  # image id 2
    code, text = run(capsys, out, bad_train, "both_faulty", val=bad_val)
    assert code == 1, text
    train_part, val_part = text.split("== val: ")
    assert "ERROR: degenerate boxes (zero/negative area): 1" in train_part, text
    assert "ERROR: boxes outside the image: 1" in val_part and "image id 2" in val_part, text
    assert "outside" not in train_part and "degenerate" not in val_part, text
    assert text.rstrip().endswith("2 errors: this dataset would not train correctly"), text


def _check_train_split(dataset: str, ann, img_dir, capsys) -> tuple[int, str]:
    """Run the check command on a train split of format ``dataset``: (exit code, output)."""
    code = check_dataset.main(
        ["--config", CONFIG, "--split", "train", CLASSES, f"--config.data.train.name={dataset}",
         f"--config.data.train.ann_file={ann}", f"--config.data.train.img_dir={img_dir}"]
    )  # fmt: skip
    return code, capsys.readouterr().out


def test_voc_and_yolo_faults(base, capsys, tmp_path):
    out, _ = base
    img_dir = out / "train"
    xml = tmp_path / "xml"
    xml.mkdir()
    (xml / "a.xml").write_text(
        "<annotation><filename>000001.jpg</filename><object><name>hexagon</name><bndbox>"
        "<xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>"
    )
    code, text = _check_train_split("XMLDataset", xml, img_dir, capsys)
    assert code == 1 and "a.xml" in text and "'hexagon'" in text, text

    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "000001.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (labels / "nothere.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    cv2.imwrite(str(tmp_path / "unused.png"), np.zeros((4, 4, 3), np.uint8))
    code, text = _check_train_split("YoloDataset", labels, img_dir, capsys)
    assert code == 1 and "nothere.txt" in text and "1 images" in text, text
