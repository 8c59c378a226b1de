"""The common form of every dataset format: images with their objects as written.

Each format's reader produces :class:`RawImage` s (every object, before NanoDet's
filters, which the dataset checker inspects); :func:`records_from_raw` applies NanoDet's
filters to make training records and :func:`coco_from_raw` the pycocotools ground truth.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from nanodet_jax.data.coco import ImageRecord, ImageSource

log = logging.getLogger("nanodet_jax")

Box = tuple[float, float, float, float]


@dataclasses.dataclass
class RawAnnotation:
    """One object as the annotation states it, before NanoDet's filters."""

    box: Box  # xyxy pixels as written (what the dataset checker inspects)
    label: int  # index into class_names; -1 = a class the config does not name
    class_name: str
    # The box NanoDet's reader of this format passes on (after its clamping), or None
    # when that reader drops the object while converting (negative width in VOC/YOLO).
    kept_box: Box | None
    ignore: bool = False
    area: float | None = None  # a stored area (COCO's mask area); None = box area


@dataclasses.dataclass
class RawImage:
    image_id: int
    file_name: str
    path: str
    width: int
    height: int
    annotations: list[RawAnnotation]
    origin: str  # the annotation file or container item, for messages
    source_index: int = -1


def kept_annotation(ann: RawAnnotation) -> tuple[Box, float] | None:
    """NanoDet's CocoDataset filter (coco.py get_img_annotation): drop unknown classes
    and boxes with area <= 0 or a side < 1 px. Returns (box, area) of a kept object."""
    if ann.kept_box is None or ann.label < 0:
        return None
    x1, y1, x2, y2 = ann.kept_box
    w, h = x2 - x1, y2 - y1
    area = w * h if ann.area is None else ann.area
    if area <= 0 or w < 1 or h < 1:
        return None
    return ann.kept_box, area


def records_from_raw(
    raw: Sequence[RawImage], source: ImageSource | None = None
) -> list[ImageRecord]:
    """Training/eval records, sorted by image id as NanoDet's datasets are."""
    records = []
    for img in sorted(raw, key=lambda r: r.image_id):
        boxes, labels, ignore = [], [], []
        for ann in img.annotations:
            kept = kept_annotation(ann)
            if kept is None:
                continue
            if ann.ignore:
                ignore.append(kept[0])
            else:
                boxes.append(kept[0])
                labels.append(ann.label)
        records.append(
            ImageRecord(
                image_id=img.image_id,
                path=img.path,
                width=img.width,
                height=img.height,
                boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                labels=np.asarray(labels, np.int32),
                ignore_boxes=np.asarray(ignore, np.float32).reshape(-1, 4),
                source=source,
                source_index=img.source_index,
            )
        )
    return records


def coco_from_raw(raw: Sequence[RawImage], class_names: Sequence[str]) -> Any:
    """An in-memory pycocotools COCO holding what NanoDet's converted ``coco_api`` holds:
    every known-class object its reader kept (category id = label + 1)."""
    from pycocotools.coco import COCO

    images, anns = [], []
    for img in sorted(raw, key=lambda r: r.image_id):
        images.append(
            {"id": img.image_id, "file_name": img.file_name, "width": img.width,
             "height": img.height}
        )  # fmt: skip
        for ann in img.annotations:
            if ann.kept_box is None or ann.label < 0:
                continue
            x1, y1, x2, y2 = (float(v) for v in ann.kept_box)
            area = (x2 - x1) * (y2 - y1) if ann.area is None else float(ann.area)
            anns.append(
                {"id": len(anns) + 1, "image_id": img.image_id, "category_id": ann.label + 1,
                 "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area, "iscrowd": int(ann.ignore)}
            )  # fmt: skip
    cats = [{"id": i + 1, "name": n, "supercategory": n} for i, n in enumerate(class_names)]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": cats}
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    return coco


class RawDataset:
    """Shared outputs of the formats that are converted to COCO in memory."""

    ann_file: str
    class_names: list[str]
    raw: list[RawImage]
    source: ImageSource | None = None

    def _finish(self, raw: list[RawImage]) -> None:
        self.raw = sorted(raw, key=lambda r: r.image_id)
        self.cat_ids = list(range(1, len(self.class_names) + 1))
        self.records = records_from_raw(self.raw, self.source)
        self._coco = None
        dropped = [(img, a) for img in self.raw for a in img.annotations
                   if kept_annotation(a) is None]  # fmt: skip
        if dropped:  # NanoDet drops them silently; a damaged file would lose boxes unseen
            unknown = sum(a.label < 0 for _, a in dropped)
            img, ann = dropped[0]
            log.warning(
                f"{self.ann_file}: {len(dropped)} objects skipped ({unknown} of a class not in "
                f"class_names, {len(dropped) - unknown} of zero/negative size or a side under "
                f"1 px; e.g. in {img.origin} the box {list(ann.box)}); nanodet-check-dataset "
                "lists them"
            )
        n = sum(len(r.boxes) for r in self.records)
        log.info(f"{self.ann_file}: {len(self.records)} images, {n} boxes")

    @property
    def coco(self) -> Any:
        if self._coco is None:  # only evaluation needs it
            self._coco = coco_from_raw(self.raw, self.class_names)
        return self._coco

    def raw_images(self) -> list[RawImage]:
        return self.raw

    def __len__(self) -> int:
        return len(self.records)
