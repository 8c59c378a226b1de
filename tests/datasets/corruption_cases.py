"""Seeded damage for the corruption suite (tests/datasets/test_corruption.py).

A case is (format, target, kind, seed): ``target`` is an image (``jpg`` / ``png``) or the
annotation file(s) of the format; ``kind`` is byte damage (truncation at a random offset,
flipped bytes at random positions, a zero-length file) or, for annotations, semantic
damage (a string where a number is, NaN / inf coordinates, negative width / height, a box
outside the image, an unknown category / class, a missing key). Everything the damage
draws comes from ``numpy.random.default_rng([SEED, case fields])``: a case is the same
on every run and machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import xml.etree.ElementTree as ET
import zlib

import cv2
import numpy as np

from nanodet_jax.data import synthetic
from tests.datasets.test_datasets import write_voc, write_yolo

SEED = 1313
FORMATS = ("coco", "voc", "yolo")
IMAGE_EXTS = ("jpg", "png")
BYTE_KINDS = ("truncate", "flip", "zero")
SEMANTIC_KINDS = ("wrong_type", "nan", "inf", "negative_size", "outside", "unknown_id",
                  "missing_key")  # fmt: skip
NUM_IMAGES = 4
CLASSES = list(synthetic.CLASSES)


@dataclasses.dataclass(frozen=True)
class Case:
    fmt: str  # coco | voc | yolo
    target: str  # jpg | png (an image) | ann (the annotations)
    kind: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.fmt}-{self.target}-{self.kind}-{self.seed}"

    def rng(self) -> np.random.Generator:
        key = zlib.crc32(f"{self.fmt}/{self.target}/{self.kind}".encode())
        return np.random.default_rng([SEED, key, self.seed])


def all_cases(image_seeds: int, ann_seeds: int) -> list[Case]:
    """Seeds ``0..n-1`` of every (format, target, kind); seed 0 alone is the CI subset."""
    cases = []
    for fmt in FORMATS:
        for ext in IMAGE_EXTS:
            cases += [Case(fmt, ext, k, s) for k in BYTE_KINDS for s in range(image_seeds)]
        kinds = BYTE_KINDS + SEMANTIC_KINDS
        cases += [Case(fmt, "ann", k, s) for k in kinds for s in range(ann_seeds)]
    return cases


def write_base(out: str) -> dict:
    """The undamaged dataset: NUM_IMAGES synthetic images as JPEG and as PNG, their COCO
    dict; returns {"coco": dict, "jpg": folder, "png": folder}."""
    paths = synthetic.write_dataset(out, num_train=NUM_IMAGES, num_val=0, size=64, seed=5)
    with open(paths["train"]) as f:
        coco = json.load(f)
    png_dir = os.path.join(out, "png")
    os.makedirs(png_dir)
    for img in coco["images"]:
        decoded = cv2.imread(os.path.join(out, "train", img["file_name"]))
        stem = os.path.splitext(img["file_name"])[0]
        cv2.imwrite(os.path.join(png_dir, stem + ".png"), decoded)
    return {"coco": coco, "jpg": os.path.join(out, "train"), "png": png_dir}


def damage_bytes(data: bytes, kind: str, rng: np.random.Generator) -> bytes:
    if kind == "zero" or not data:
        return b""
    if kind == "truncate":
        return data[: int(rng.integers(0, len(data)))]
    out = bytearray(data)  # flip: 1-8 bytes at random positions, each changed
    for pos in rng.choice(len(out), size=min(len(out), int(rng.integers(1, 9))), replace=False):
        out[pos] ^= int(rng.integers(1, 256))
    return bytes(out)


@dataclasses.dataclass
class Prepared:
    split_cfg: dict  # what config.data.<split> would hold
    img_dir: str
    image_paths: list[str]  # every image, in file-name order
    damaged: str  # the damaged file's path
    original: bytes  # its bytes before the damage


def prepare(case: Case, base: dict, out: str) -> Prepared:
    """The case's dataset under ``out`` with its one damaged file."""
    rng = case.rng()
    ext = "png" if case.target == "png" else "jpg"
    coco = json.loads(json.dumps(base["coco"]))
    for img in coco["images"]:
        img["file_name"] = os.path.splitext(img["file_name"])[0] + "." + ext
    img_dir = os.path.join(out, "images")
    shutil.copytree(base[ext], img_dir)
    pick = int(rng.integers(NUM_IMAGES))
    ann_path = _write_annotations(case, coco, out, pick, rng)
    damaged = (
        ann_path
        if case.target == "ann"
        else os.path.join(img_dir, coco["images"][pick]["file_name"])
    )
    with open(damaged, "rb") as f:
        original = f.read()
    if case.kind in BYTE_KINDS:
        with open(damaged, "wb") as f:
            f.write(damage_bytes(original, case.kind, rng))
    cfg = {
        "coco": {"name": "CocoDataset", "ann_file": os.path.join(out, "ann.json")},
        "voc": {"name": "XMLDataset", "ann_file": os.path.join(out, "xml")},
        "yolo": {"name": "YoloDataset", "ann_file": os.path.join(out, "labels")},
    }[case.fmt]
    paths = sorted(os.path.join(img_dir, n) for n in os.listdir(img_dir))
    return Prepared({**cfg, "img_dir": img_dir}, img_dir, paths, damaged, original)


def _write_annotations(case: Case, coco: dict, out: str, pick: int,
                       rng: np.random.Generator) -> str:  # fmt: skip
    """Write the format's annotations (semantically damaged for a semantic kind); returns
    the annotation file a damage targets (of image ``pick`` for VOC / YOLO)."""
    semantic = case.target == "ann" and case.kind in SEMANTIC_KINDS
    image = coco["images"][pick]
    stem = os.path.splitext(image["file_name"])[0]
    anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
    if semantic and not anns:  # damage needs an object: give the image one
        anns = [{"id": 900, "image_id": image["id"], "category_id": 1, "bbox": [8, 8, 20, 20],
                 "area": 400.0, "iscrowd": 0}]  # fmt: skip
        coco["annotations"] += anns
    ann = anns[int(rng.integers(len(anns)))] if anns else None
    if case.fmt == "coco":
        if semantic:
            _damage_coco(coco, image, ann, case.kind, rng)
        path = os.path.join(out, "ann.json")
        with open(path, "w") as f:
            json.dump(coco, f)  # NaN / Infinity are written as json's extension does
        return path
    if case.fmt == "voc":
        write_voc(coco, os.path.join(out, "xml"))
        path = os.path.join(out, "xml", stem + ".xml")
        if semantic:
            tree = ET.parse(path)
            _damage_voc(tree.getroot(), anns.index(ann), case.kind, rng)
            tree.write(path)
        return path
    write_yolo(coco, os.path.join(out, "labels"))
    path = os.path.join(out, "labels", stem + ".txt")
    if semantic:
        with open(path) as f:
            lines = f.read().splitlines()
        row = int(rng.integers(len(lines)))
        lines[row] = _damage_yolo(lines[row].split(), case.kind, rng)
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
    return path


def _damage_coco(coco: dict, image: dict, ann: dict, kind: str, rng: np.random.Generator) -> None:
    k = int(rng.integers(4))
    if kind == "wrong_type":
        choice = int(rng.integers(4))
        if choice == 0:
            ann["bbox"][k] = str(ann["bbox"][k])
        elif choice == 1:
            ann["bbox"] = "oops"
        elif choice == 2:
            image["width"] = str(image["width"])
        else:
            ann["category_id"] = str(ann["category_id"])
    elif kind in ("nan", "inf"):
        ann["bbox"][k] = float(kind) * (1 if rng.random() < 0.5 else -1)
    elif kind == "negative_size":
        ann["bbox"][2 + k % 2] = -float(rng.uniform(1, 30))
        if rng.random() < 0.5:
            ann.pop("area", None)  # else the stored area stays positive: w / h drop it
    elif kind == "outside":
        ann["bbox"][k % 2] = float(image["width" if k % 2 == 0 else "height"] + rng.uniform(1, 50))
    elif kind == "unknown_id":
        ann["category_id"] = int(rng.integers(50, 1000))
    else:  # missing_key
        key = ["bbox", "category_id", "image_id", "file_name", "width", "id"][int(rng.integers(6))]
        (image if key in ("file_name", "width", "id") else ann).pop(key)


def _damage_voc(root: ET.Element, index: int, kind: str, rng: np.random.Generator) -> None:
    obj = root.findall("object")[index]
    bnd = obj.find("bndbox")
    tag = ("xmin", "ymin", "xmax", "ymax")[int(rng.integers(4))]
    width = int(root.findtext("size/width"))
    if kind == "wrong_type":
        bnd.find(tag).text = ["abc", "", "12px"][int(rng.integers(3))]
    elif kind in ("nan", "inf"):
        bnd.find(tag).text = kind if rng.random() < 0.5 else "-" + kind
    elif kind == "negative_size":  # max below min
        lo, hi = ("xmin", "xmax") if rng.random() < 0.5 else ("ymin", "ymax")
        bnd.find(lo).text, bnd.find(hi).text = bnd.find(hi).text, bnd.find(lo).text
    elif kind == "outside":
        bnd.find("xmin").text = str(width + int(rng.integers(1, 50)))
        bnd.find("xmax").text = str(width + 60)
    elif kind == "unknown_id":
        obj.find("name").text = "giraffe"
    else:  # missing_key
        choice = int(rng.integers(3))
        if choice == 0:
            obj.remove(bnd)
        elif choice == 1:
            bnd.remove(bnd.find(tag))
        else:
            root.remove(root.find("filename"))


def _damage_yolo(tokens: list[str], kind: str, rng: np.random.Generator) -> str:
    k = int(rng.integers(1, 5))
    if kind == "wrong_type":
        tokens[int(rng.integers(5))] = ["abc", "0x1f", "1,5"][int(rng.integers(3))]
    elif kind in ("nan", "inf"):
        tokens[int(rng.integers(5))] = kind if rng.random() < 0.5 else "-" + kind
    elif kind == "negative_size":
        tokens[3 + k % 2] = f"{-rng.uniform(0.05, 0.5):.6f}"
    elif kind == "outside":
        tokens[1 + k % 2] = f"{rng.uniform(1.5, 3):.6f}"
    elif kind == "unknown_id":
        tokens[0] = str(int(rng.integers(len(CLASSES), 1000)))
    else:  # missing_key: a field fewer
        tokens = tokens[:4]
    return " ".join(tokens)
