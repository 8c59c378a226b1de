"""Detection datasets in the formats NanoDet reads, all turned into the same records.

Every dataset exposes ``records`` (:class:`ImageRecord`: xyxy float32 pixels, labels
``0..C-1`` in ``class_names`` order, crowd/ignore boxes apart), ``class_names``,
``cat_ids`` and ``coco``, a pycocotools ground truth (built in memory for formats other
than COCO json) so that COCO evaluation works for each. ``raw_images()`` gives every
object as written, before NanoDet's filters, for ``nanodet_jax.data.check``.

Formats (``config.data.<split>.name``): ``CocoDataset`` (json + image folder),
``XMLDataset`` (Pascal VOC folder), ``YoloDataset`` (one txt per image), ``TFDSDataset``
(a prepared TFDS array_record directory, see :mod:`nanodet_jax.data.tfds_dataset`).
"""

from __future__ import annotations

import logging
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nanodet_jax import paths
from nanodet_jax.data.coco import AnnotationError, CocoDetection, ImageReadError
from nanodet_jax.data.image_size import image_size
from nanodet_jax.data.raw import Box, RawAnnotation, RawDataset, RawImage

log = logging.getLogger("nanodet_jax")

# NanoDet's YoloDataset looks for the image of ``a.txt`` with these suffixes, in order.
YOLO_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tiff")


def _files(folder: str, suffix: str) -> list[str]:
    """Paths (relative to ``folder``) of the files with ``suffix``, sorted: NanoDet walks
    in os.walk order, which is filesystem-dependent; sorting makes image ids stable."""
    if not paths.isdir(folder):
        raise FileNotFoundError(f"{folder}: annotation folder not found")
    return sorted(rel for rel in paths.walk_files(folder) if rel.endswith(suffix))


class _WarnOnce:
    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, key: str, message: str) -> None:
        if key not in self.seen:
            self.seen.add(key)
            log.warning(message)


def _xml_number(obj: ET.Element, tag: str, where: str) -> float:
    node = obj.find(tag)
    try:
        value = float(node.text)  # NanoDet: int(text); identical for integer text
        if math.isfinite(value):  # float() reads "nan" / "inf": they would reach training
            return value
    except (AttributeError, TypeError, ValueError):
        pass
    text = None if node is None else node.text
    raise AnnotationError(f"{where}: <{tag}> is missing or not a finite number ({text!r})")


class XMLDataset(RawDataset):
    """Pascal VOC: ``ann_dir`` of ``.xml`` files naming images in ``img_dir``.

    As NanoDet's XMLDataset: ids are 1.. in file order; objects named outside
    ``class_names`` are dropped (warned once per name); bndbox coordinates are used as
    written (no -1); a box with negative size is dropped, else its corner is clamped at 0
    and its size at the image size. NanoDet ignores ``<difficult>`` (difficult objects are
    ordinary boxes): ``difficult="keep"``; ``"ignore"`` makes them ignore boxes instead.
    """

    def __init__(
        self, img_dir: str, ann_dir: str, class_names: Sequence[str], difficult: str = "keep"
    ):
        if difficult not in ("keep", "ignore"):
            raise ValueError(f"difficult={difficult!r}: expected 'keep' or 'ignore'")
        self.img_dir, self.ann_file = img_dir, ann_dir
        self.class_names = list(class_names)
        index = {n: i for i, n in enumerate(self.class_names)}
        warn = _WarnOnce()
        raw = []
        for idx, rel in enumerate(_files(ann_dir, ".xml")):
            xml_path = paths.join(ann_dir, rel)
            raw.append(self._parse(xml_path, idx + 1, index, difficult, warn))
        self._finish(raw)

    def _parse(self, xml_path: str, image_id: int, index: Mapping[str, int], difficult: str,
               warn: _WarnOnce) -> RawImage:  # fmt: skip
        try:
            with paths.open_file(xml_path, "rb") as f:  # bytes: the XML declares its encoding
                root = ET.parse(f).getroot()
        except ET.ParseError as e:  # also a cut, empty or byte-damaged file
            raise AnnotationError(f"{xml_path}: malformed XML ({e})") from e
        file_name = (root.findtext("filename") or "").strip()
        if not file_name:
            raise AnnotationError(f"{xml_path}: no <filename>")
        path = paths.join(self.img_dir, file_name)
        size = root.find("size")
        try:
            width, height = int(size.findtext("width")), int(size.findtext("height"))
            if width <= 0 or height <= 0:
                raise ValueError
        except (AttributeError, TypeError, ValueError):
            # No usable <size>: take it from the image (NanoDet would fail here).
            try:
                width, height = image_size(path)
            except ImageReadError as e:
                raise AnnotationError(f"{xml_path}: no valid <size> and {e}") from e
        anns = []
        for k, obj in enumerate(root.findall("object")):
            where = f"{xml_path}: object {k}"
            name = (obj.findtext("name") or "").strip()
            label = index.get(name, -1)
            if label < 0:
                warn(
                    name, f"{xml_path}: class {name!r} is not in class_names; its boxes are skipped"
                )
            bnd = obj.find("bndbox")
            if bnd is None:
                raise AnnotationError(f"{where}: no <bndbox>")
            x1, y1, x2, y2 = (_xml_number(bnd, t, where) for t in ("xmin", "ymin", "xmax", "ymax"))
            is_difficult = (obj.findtext("difficult") or "0").strip() == "1"
            anns.append(
                RawAnnotation(
                    box=(x1, y1, x2, y2), label=label, class_name=name,
                    kept_box=_nanodet_clamp(x1, y1, x2 - x1, y2 - y1, width, height),
                    ignore=is_difficult and difficult == "ignore",
                )
            )  # fmt: skip
        return RawImage(image_id, file_name, path, width, height, anns, xml_path)


def _nanodet_clamp(x: float, y: float, w: float, h: float, width: int, height: int) -> Box | None:
    """NanoDet's VOC/YOLO conversion (xml_dataset.py L109-115, yolo.py L123-130): drop a
    box of negative size, else clamp the corner at 0 and the *size* at the image size."""
    if w < 0 or h < 0:
        return None
    x, y = max(x, 0), max(y, 0)
    return (x, y, x + min(w, width), y + min(h, height))


class YoloDataset(RawDataset):
    """YOLO txt: per image ``<ann_dir>/<stem>.txt`` with lines ``class cx cy w h``
    (normalised), image ``<img_dir>/<stem>.<png|jpg|jpeg|bmp|tiff>``.

    As NanoDet's YoloDataset: ids are 1.. in txt order; a txt without image is skipped
    (warned); ``x = round((cx - w/2) * W)``, ``w = round(w * W)`` (integer pixels, numpy
    rounding), then the VOC clamping; class ids >= len(class_names) are dropped. The
    image size comes from the image header (EXIF orientation applied, as cv2 decodes).
    """

    def __init__(self, img_dir: str, ann_dir: str, class_names: Sequence[str]):
        self.img_dir, self.ann_file = img_dir, ann_dir
        self.class_names = list(class_names)
        self.skipped: list[str] = []  # txt files whose image is missing or unreadable
        # Remote: one listing, not up to five stats (requests) per txt file.
        self._listed = set(paths.walk_files(img_dir)) if paths.is_remote(img_dir) else None
        raw = []
        for idx, rel in enumerate(_files(ann_dir, ".txt")):
            img = self._parse(paths.join(ann_dir, rel), rel, idx + 1)
            if img is not None:
                raw.append(img)
        self._finish(raw)

    def _find_image(self, rel_txt: str) -> str | None:
        stem = os.path.splitext(rel_txt)[0]
        for suffix in YOLO_IMAGE_SUFFIXES:
            name = stem + suffix
            if self._listed is not None:
                if name in self._listed:
                    return name
            elif paths.isfile(paths.join(self.img_dir, name)):
                return name
        return None

    def _parse(self, txt_path: str, rel: str, image_id: int) -> RawImage | None:
        file_name = self._find_image(rel)
        if file_name is None:
            self.skipped.append(
                f"{txt_path}: no image {os.path.splitext(rel)[0]}.* in {self.img_dir}"
            )
            log.warning(f"skipping {self.skipped[-1]}")
            return None
        path = paths.join(self.img_dir, file_name)
        try:
            width, height = image_size(path)
        except ImageReadError as e:
            self.skipped.append(f"{txt_path}: {e}")
            log.warning(f"skipping {self.skipped[-1]}")
            return None
        anns = []
        try:
            lines = paths.read_text(txt_path).splitlines()
        except UnicodeDecodeError as e:  # damaged bytes
            raise AnnotationError(f"{txt_path}: not a text file ({e})") from None
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                values = [float(t) for t in line.split()]
                # float() reads "nan" / "inf": int() of them would crash, NaN reach training
                if len(values) < 5 or not all(math.isfinite(v) for v in values):
                    raise ValueError
            except ValueError:
                raise AnnotationError(
                    f"{txt_path}:{n}: expected 'class cx cy w h' (finite numbers), got {line!r}"
                ) from None
            cls = int(values[0])
            cx, cy, bw, bh = values[1:5]
            # NanoDet: corner = centre - size/2, then both rounded to integer pixels.
            x, y = np.round(np.array([cx - bw * 0.5, cy - bh * 0.5]) * [width, height]).astype(int)
            w, h = np.round(np.array([bw, bh]) * [width, height]).astype(int)
            x, y, w, h = int(x), int(y), int(w), int(h)
            label = cls if 0 <= cls < len(self.class_names) else -1
            name = self.class_names[label] if label >= 0 else str(cls)
            anns.append(
                RawAnnotation(
                    box=(x, y, x + w, y + h), label=label, class_name=name,
                    kept_box=_nanodet_clamp(x, y, w, h, width, height),
                )
            )  # fmt: skip
        return RawImage(image_id, file_name, path, width, height, anns, txt_path)


class CocoDataset(CocoDetection):
    """COCO json + image folder (see :class:`CocoDetection`). Class names come from the
    json's categories, as in NanoDet; config names that differ are warned about."""

    def __init__(self, ann_file: str, img_dir: str, class_names: Sequence[str] | None = None):
        super().__init__(ann_file, img_dir)
        if class_names is not None and list(class_names) != self.class_names:
            log.warning(
                f"{ann_file}: categories {self.class_names[:5]}... differ from the config's "
                f"class_names {list(class_names)[:5]}...; labels follow the json (sorted ids)"
            )

    def raw_images(self) -> list[RawImage]:
        """Every image entry (duplicates included) with all its annotations."""
        by_image: dict[Any, list[dict]] = {}
        for ann in self.coco.dataset.get("annotations", []):
            by_image.setdefault(ann.get("image_id"), []).append(ann)
        raw = []
        for info in self.coco.dataset.get("images", []):
            anns = []
            for ann in by_image.get(info.get("id"), []):
                x, y, w, h = (float(v) for v in ann["bbox"])
                label = self.cat2label.get(ann.get("category_id"), -1)
                name = (
                    self.class_names[label]
                    if label >= 0
                    else f"category_id={ann.get('category_id')}"
                )
                box = (x, y, x + w, y + h)
                ignore = bool(ann.get("iscrowd", False) or ann.get("ignore", False))
                anns.append(RawAnnotation(box, label, name, box, ignore, ann.get("area", w * h)))
            raw.append(
                RawImage(info.get("id"), info.get("file_name", ""),
                         paths.join(self.img_dir, info.get("file_name", "")),
                         int(info.get("width", 0)), int(info.get("height", 0)), anns,
                         self.ann_file)
            )  # fmt: skip
        return raw


DATASET_NAMES = {
    "CocoDataset": "coco", "CocoDetection": "coco", "coco": "coco",
    "XMLDataset": "xml", "xml_dataset": "xml",
    "YoloDataset": "yolo", "yolo": "yolo",
    "TFDSDataset": "tfds", "tfds": "tfds",
}  # fmt: skip


def _get(cfg: Mapping[str, Any], *keys: str) -> Any:
    """The first of ``keys`` the split config sets (NanoDet's names are aliases)."""
    for key in keys:
        value = cfg.get(key)
        if value not in (None, ""):
            return value
    raise KeyError(f"dataset config needs one of {keys}")


def build_dataset(
    split_cfg: Mapping[str, Any], class_names: Sequence[str] | None, role: str = "train"
) -> Any:
    """The dataset a ``config.data.<split>`` names. ``class_names``: the config's
    (``split_cfg.class_names`` wins, as in NanoDet's per-split key). ``role`` ("train" or
    "val") picks a TFDS split when the config gives none."""
    name = split_cfg.get("name", "CocoDataset")
    kind = DATASET_NAMES.get(name)
    if kind is None:
        raise ValueError(f"unknown dataset name {name!r}; expected one of {sorted(DATASET_NAMES)}")
    names = split_cfg.get("class_names") or class_names
    if kind == "coco":
        return CocoDataset(
            _get(split_cfg, "ann_file", "ann_path"), _get(split_cfg, "img_dir", "img_path"), names
        )
    if kind == "tfds":
        from nanodet_jax.data.tfds_dataset import TFDSDataset

        return TFDSDataset(
            _get(split_cfg, "data_dir", "img_dir", "img_path"),
            split_cfg.get("split") or None,
            names,
            role,
        )
    if not names:
        raise ValueError(f"{name} needs class_names in the config")
    img_dir = _get(split_cfg, "img_dir", "img_path")
    ann_dir = _get(split_cfg, "ann_dir", "ann_file", "ann_path")
    if kind == "xml":
        return XMLDataset(img_dir, ann_dir, names, split_cfg.get("difficult", "keep"))
    return YoloDataset(img_dir, ann_dir, names)
