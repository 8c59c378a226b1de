"""COCO-format detection datasets (annotation json + image folder), read as NanoDet reads them.

Labels are the positions of the category ids in sorted order; crowd (or
``ignore``) boxes become ignore boxes; annotations with area <= 0 or a side
< 1 pixel are dropped, as NanoDet's CocoDataset does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
from collections.abc import Sequence
from typing import Any, Protocol

import cv2
import numpy as np

from nanodet_jax import paths
from nanodet_jax.data.image_integrity import truncation_problem_bytes
from nanodet_jax.errors import UserError

log = logging.getLogger("nanodet_jax")


class ImageReadError(OSError, UserError):
    """An image file is missing, cut short or cannot be decoded; the message names it."""


class AnnotationError(UserError, ValueError):
    """An annotation file (COCO json, VOC xml, YOLO txt) that cannot be read as written;
    the message names the file and the record. A ValueError too, as before."""


def _number(value: Any) -> bool:
    """A finite int or float (not a bool, not a string): NaN / inf would reach training."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_list(ann_file: str, data: dict, key: str) -> list:
    items = data.get(key, [])
    if not isinstance(items, list) or not all(isinstance(v, dict) for v in items):
        raise AnnotationError(f"{ann_file}: {key!r} must be a list of objects")
    return items


def check_coco_json(ann_file: str, data: Any) -> None:
    """An :class:`AnnotationError` naming the file and the record for every field this
    reader uses that would crash it later (a missing key, a string for a number) or pass
    NaN / inf on to training and evaluation. Checked before pycocotools indexes it."""
    if not isinstance(data, dict):
        raise AnnotationError(f"{ann_file}: not a COCO annotation object ({type(data).__name__})")
    for k, cat in enumerate(_check_list(ann_file, data, "categories")):
        if not _integer(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise AnnotationError(
                f"{ann_file}: categories[{k}] needs an integer 'id' and a string 'name' "
                f"(got id={cat.get('id')!r}, name={cat.get('name')!r})"
            )
    for k, img in enumerate(_check_list(ann_file, data, "images")):
        where = f"{ann_file}: images[{k}] (id {img.get('id')!r})"
        if not _integer(img.get("id")):
            raise AnnotationError(f"{where}: 'id' must be an integer")
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise AnnotationError(f"{where}: 'file_name' must be a file name")
        for key in ("width", "height"):
            value = img.get(key)
            if not _number(value) or value <= 0 or value != int(value):
                raise AnnotationError(f"{where}: {key!r} must be a positive integer, got {value!r}")
    for k, ann in enumerate(_check_list(ann_file, data, "annotations")):
        where = f"{ann_file}: annotations[{k}] (id {ann.get('id')!r})"
        for key in ("image_id", "category_id"):
            if not _integer(ann.get(key)):
                raise AnnotationError(f"{where}: {key!r} must be an integer, got {ann.get(key)!r}")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_number(v) for v in bbox):
            raise AnnotationError(f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h], "
                                  f"got {bbox!r}")  # fmt: skip
        if "area" in ann and not _number(ann["area"]):
            raise AnnotationError(f"{where}: 'area' must be a finite number, got {ann['area']!r}")


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    image_id: int
    path: str  # the image file; for records of a ``source``, a name for messages only
    width: int
    height: int
    boxes: np.ndarray  # [n, 4] float32 xyxy, pixels
    labels: np.ndarray  # [n] int32 in [0, num_classes)
    ignore_boxes: np.ndarray  # [m, 4] float32 xyxy (crowd regions)
    # Images that are not files (e.g. inside a TFDS array_record) are loaded by
    # ``source.load_image(source_index)``; None means "read ``path``".
    source: ImageSource | None = dataclasses.field(default=None, compare=False, repr=False)
    source_index: int = -1


class ImageSource(Protocol):
    """Random access to the images of a container dataset (thread-safe, deterministic)."""

    def load_image(self, index: int) -> np.ndarray:
        """BGR uint8 HWC image, or :class:`ImageReadError` naming the item."""
        ...


def read_image(path: str) -> np.ndarray:
    """BGR uint8 HWC image, or :class:`ImageReadError` naming the file and the problem
    (missing, truncated JPEG / PNG, undecodable). The bytes come through the path layer
    (a ``gs://`` image too) and are decoded in memory: the same pixels as ``cv2.imread``,
    EXIF orientation included."""
    try:
        data = paths.read_bytes(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ImageReadError(f"{path}: image file not found") from None
    return decode_image(data, path)


def imdecode(data: bytes) -> np.ndarray | None:
    """``cv2.imread``'s result for a file holding ``data`` (None if undecodable)."""
    # imdecode asserts on an empty buffer, where imread returns None.
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None


def decode_image(data: bytes, name: str) -> np.ndarray:
    """:func:`read_image` of encoded bytes; ``name`` is the file the messages name."""
    # Before decoding: cv2 decodes a cut JPEG as a half-grey image without failing.
    problem = truncation_problem_bytes(data)
    if problem is not None:
        raise ImageReadError(f"{name}: {problem}")
    img = imdecode(data)
    if img is None:
        raise ImageReadError(f"{name}: cannot decode image (corrupt or not an image)")
    return img


def require_image_files(records: Sequence[ImageRecord], ann_file: str) -> None:
    """Evaluation is over the whole annotation file, as NanoDet's (a mAP over the rest
    would compare with nothing): a :class:`UserError` naming the first missing files.
    One stat per image (remotely one listing per folder), cheap enough to run before a
    model is built; a truncated or undecodable image is found when decoded (an
    :class:`ImageReadError` naming it)."""
    missing = paths.missing_files([r.path for r in records if r.source is None])
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(
            f"{len(missing)} of the {len(records)} images of {ann_file} not found: "
            f"{', '.join(missing[:3])}{more} (nanodet-check-dataset --split val lists every "
            "broken image)"
        )


def load_image(record: ImageRecord) -> np.ndarray:
    """The record's BGR uint8 image, from its file or its container source."""
    if record.source is not None:
        return record.source.load_image(record.source_index)
    return read_image(record.path)


class CocoDetection:
    """Records of a COCO-format dataset, sorted by image id (NanoDet's order)."""

    def __init__(self, ann_file: str, img_dir: str):
        from pycocotools.coco import COCO

        if not paths.isfile(ann_file):
            raise FileNotFoundError(f"{ann_file}: annotation file not found")
        if not paths.isdir(img_dir):
            raise FileNotFoundError(f"{img_dir}: image folder not found")
        try:
            with paths.open_file(ann_file) as f:
                data = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:  # cut, zero-length, damaged bytes
            raise AnnotationError(f"{ann_file}: not a valid COCO annotation file ({e})") from e
        check_coco_json(ann_file, data)
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()
        self.ann_file = ann_file
        self.img_dir = img_dir
        self.cat_ids = sorted(self.coco.getCatIds())
        if not self.cat_ids:
            raise AnnotationError(f"{ann_file}: defines no categories")
        self.cat2label = {cat_id: i for i, cat_id in enumerate(self.cat_ids)}
        self.class_names = [c["name"] for c in self.coco.loadCats(self.cat_ids)]
        self.dropped: dict[str, list[Any]] = {}  # reason -> annotation ids NanoDet drops
        self.records = [self._record(img_id) for img_id in sorted(self.coco.imgs)]
        for reason, ids in self.dropped.items():  # NanoDet drops them silently
            log.warning(
                f"{ann_file}: {len(ids)} annotations skipped ({reason}; e.g. annotation id "
                f"{ids[0]!r}); nanodet-check-dataset lists them"
            )

    def _record(self, img_id: int) -> ImageRecord:
        info = self.coco.imgs[img_id]
        boxes, labels, ignore = [], [], []
        for ann in self.coco.loadAnns(self.coco.getAnnIds(imgIds=[img_id])):
            x, y, w, h = ann["bbox"]
            if ann.get("area", w * h) <= 0 or w < 1 or h < 1:
                self.dropped.setdefault("zero/negative area or a side under 1 px", []).append(
                    ann.get("id")
                )
                continue
            if ann["category_id"] not in self.cat2label:
                self.dropped.setdefault("category_id not in categories", []).append(ann.get("id"))
                continue
            box = [x, y, x + w, y + h]
            if ann.get("iscrowd", False) or ann.get("ignore", False):
                ignore.append(box)
            else:
                boxes.append(box)
                labels.append(self.cat2label[ann["category_id"]])
        return ImageRecord(
            image_id=img_id,
            path=paths.join(self.img_dir, info["file_name"]),
            width=int(info["width"]),
            height=int(info["height"]),
            boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
            labels=np.asarray(labels, np.int32),
            ignore_boxes=np.asarray(ignore, np.float32).reshape(-1, 4),
        )

    def __len__(self) -> int:
        return len(self.records)
