"""Prepared TFDS detection datasets (array_record or tfrecord), read without TensorFlow.

``TFDSDataset(dir, split)`` reads ``tfds.builder_from_directory(dir)``: array_record
through ``as_data_source``, tfrecord (TFDS's default format) through
:class:`nanodet_jax.data.tfrecord.TFRecordSource` (both random access, TF-free).
Expected features, as TFDS's ``coco/2017``: ``image`` (encoded, or a uint8 array),
``objects/bbox`` (normalised ymin, xmin, ymax, xmax), ``objects/label``; optional
``objects/is_crowd`` (-> ignore boxes), ``objects/area``, ``image/id`` (default:
position + 1), ``image/filename``.
Labels are mapped to the config's ``class_names`` by name when the label feature has
names. Images are kept encoded and decoded by ``cv2.imdecode`` (BGR, like ``read_image``)
when a sample is loaded; the annotations are read once, up front (this reads the whole
split once, as the image bytes sit in the same records). A record that cannot be read
then (a damaged tfrecord record: file and byte offset) is skipped with a warning.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from nanodet_jax import paths
from nanodet_jax.data.coco import ImageReadError
from nanodet_jax.data.image_integrity import truncation_problem_bytes
from nanodet_jax.data.image_size import encoded_image_size
from nanodet_jax.data.raw import RawAnnotation, RawDataset, RawImage
from nanodet_jax.data.tfrecord import TFRecordSource
from nanodet_jax.errors import ConfigError

log = logging.getLogger("nanodet_jax")


def import_tfds() -> Any:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "TFDS datasets need tensorflow-datasets (not TensorFlow): "
            "pip install 'nanodet-jax[tfds]'"
        ) from e
    return tfds


def resolve_dataset_dir(path: str) -> str:
    """``path`` if it holds a prepared dataset, else the only one up to two levels below
    (``DIR/name/version``, TFDS's own layout)."""
    if paths.isfile(paths.join(path, "dataset_info.json")):
        return path
    root = paths.as_path(path)
    found = sorted(
        str(p) for pat in ("*/dataset_info.json", "*/*/dataset_info.json") for p in root.glob(pat)
    )
    if len(found) == 1:
        return found[0].rsplit("/", 1)[0]
    if not found:
        raise FileNotFoundError(f"{path}: no prepared TFDS dataset (dataset_info.json) found")
    dirs = [f.rsplit("/", 1)[0] for f in found]
    raise ValueError(f"{path}: several TFDS datasets below it, name one of {dirs}")


def pick_split(available: Sequence[str], split: str | None, role: str) -> str:
    if split:
        return split  # TFDS checks it (and accepts slices such as "train[:10%]")
    if len(available) == 1:
        return available[0]
    preferred = ("train",) if role == "train" else ("validation", "val", "test")
    for name in preferred:
        if name in available:
            return name
    raise ValueError(f"set the split (one of {sorted(available)}) in the dataset config")


def decode_image(value: Any, name: str) -> np.ndarray:
    """BGR uint8 from encoded bytes (cv2, as ``read_image``) or a TFDS RGB array."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        problem = truncation_problem_bytes(value)  # cv2 would decode it half grey
        if problem is not None:
            raise ImageReadError(f"{name}: {problem}")
        img = cv2.imdecode(np.frombuffer(value, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise ImageReadError(f"{name}: cannot decode image (corrupt or not an image)")
        return img
    arr = np.asarray(value)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise ImageReadError(f"{name}: image is {arr.dtype} {arr.shape}, expected uint8 HW[C]")
    if arr.ndim == 2 or arr.shape[-1] == 1:
        return cv2.cvtColor(arr.reshape(arr.shape[:2]), cv2.COLOR_GRAY2BGR)
    code = cv2.COLOR_RGBA2BGR if arr.shape[-1] == 4 else cv2.COLOR_RGB2BGR
    return cv2.cvtColor(arr, code)


def _norm(name: str) -> str:
    return name.lower().replace("_", " ").replace("-", " ").strip()


class TFDSImageSource:
    """The images of one split, opened lazily (once per process, shared by threads)."""

    def __init__(self, data_dir: str, split: str, encoded: bool):
        self.data_dir, self.split, self.encoded = data_dir, split, encoded
        self._ds: Any = None
        self._lock = threading.Lock()

    def open(self) -> Any:
        with self._lock:
            if self._ds is None:
                tfds = import_tfds()
                builder = tfds.builder_from_directory(self.data_dir)
                # Keep images encoded: cv2 decodes them exactly as it decodes files.
                decoders = {"image": tfds.decode.SkipDecoding()} if self.encoded else None
                file_format = builder.info.file_format
                if file_format == tfds.core.FileFormat.TFRECORD:
                    instructions = builder.info.splits[self.split].file_instructions
                    self._ds = TFRecordSource(instructions, builder.info.features, decoders)
                elif file_format == tfds.core.FileFormat.ARRAY_RECORD:
                    self._ds = builder.as_data_source(self.split, decoders=decoders)
                else:
                    raise ConfigError(
                        f"{self.data_dir}: file format {file_format.value!r} is not read; "
                        "prepare it as tfrecord or array_record"
                    )
        return self._ds

    def example(self, index: int) -> dict:
        """The decoded example (image kept encoded), or an ImageReadError naming it."""
        try:
            return self.open()[index]
        except ImageReadError:  # names its file and byte offset already
            raise
        except Exception as e:  # array_record / parsing errors carry no item name
            raise ImageReadError(f"{self.item_name(index)}: cannot read the item ({e})") from e

    def item_name(self, index: int) -> str:
        return f"{self.data_dir}[{self.split}][{index}]"

    def load_image(self, index: int) -> np.ndarray:
        return decode_image(self.example(index)["image"], self.item_name(index))

    def __getstate__(self) -> dict:  # picklable for worker processes: reopen there
        return {"data_dir": self.data_dir, "split": self.split, "encoded": self.encoded}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["data_dir"], state["split"], state["encoded"])


class TFDSDataset(RawDataset):
    def __init__(
        self,
        data_dir: str,
        split: str | None = None,
        class_names: Sequence[str] | None = None,
        role: str = "train",
    ):
        tfds = import_tfds()
        self.data_dir = resolve_dataset_dir(data_dir)
        builder = tfds.builder_from_directory(self.data_dir)
        features = builder.info.features
        for key in ("image", "objects"):
            if key not in features:
                raise ValueError(f"{self.data_dir}: no {key!r} feature (a detection dataset?)")
        objects = features["objects"]
        if "bbox" not in objects or "label" not in objects:
            raise ValueError(f"{self.data_dir}: 'objects' lacks 'bbox' or 'label'")
        self.split = pick_split(list(builder.info.splits), split, role)
        self.ann_file = f"{self.data_dir}[{self.split}]"
        tfds_names = list(getattr(objects["label"], "names", None) or [])
        self.class_names = list(class_names or tfds_names)
        if not self.class_names:
            raise ValueError(f"{self.data_dir}: the label feature has no names; set class_names")
        self._label_map = self._map_labels(tfds_names)
        self.tfds_names = tfds_names
        encoded = isinstance(features["image"], tfds.features.Image)
        self.source = TFDSImageSource(self.data_dir, self.split, encoded)
        raw, damaged = [], []
        for i in range(len(self.source.open())):
            try:
                raw.append(self._raw(i, self.source.example(i)))
            except ImageReadError as e:  # as a damaged image file: skipped, named
                damaged.append(str(e))
        if damaged:
            log.warning(
                f"{self.ann_file}: {len(damaged)} unreadable records skipped, e.g. {damaged[0]}"
            )
        self._finish(raw)

    def _map_labels(self, tfds_names: list[str]) -> dict[int, int]:
        """TFDS label -> config label (by name when TFDS has names, else the same int)."""
        if not tfds_names:
            return {i: i for i in range(len(self.class_names))}
        ours = {_norm(n): i for i, n in enumerate(self.class_names)}
        mapping = {k: ours[_norm(n)] for k, n in enumerate(tfds_names) if _norm(n) in ours}
        if not mapping:
            raise ValueError(
                f"{self.data_dir}: none of its classes {tfds_names[:5]}... is in class_names "
                f"{self.class_names[:5]}..."
            )
        if len(mapping) < len(tfds_names):
            missing = [n for n in tfds_names if _norm(n) not in ours]
            log.warning(f"{self.data_dir}: classes not in class_names are skipped: {missing[:10]}")
        return mapping

    def _raw(self, index: int, ex: dict) -> RawImage:
        name = self.source.item_name(index)
        image = ex["image"]
        if isinstance(image, (bytes, bytearray, memoryview)):
            width, height = encoded_image_size(bytes(image), name)
        else:
            height, width = np.asarray(image).shape[:2]
        file_name = ex.get("image/filename", b"")
        file_name = file_name.decode() if isinstance(file_name, bytes) else str(file_name)
        image_id = int(ex["image/id"]) if "image/id" in ex else index + 1
        objs = ex["objects"]
        bbox = np.asarray(objs["bbox"], np.float64).reshape(-1, 4)
        labels = np.asarray(objs["label"]).reshape(-1).astype(int)
        crowd = np.asarray(objs.get("is_crowd", np.zeros(len(labels))), bool).reshape(-1)
        areas = objs.get("area")
        anns = []
        for k, (ymin, xmin, ymax, xmax) in enumerate(bbox):
            # float32 like the records, so the COCO ground truth holds the same numbers.
            pix = np.float32([xmin * width, ymin * height, xmax * width, ymax * height])
            box = tuple(float(v) for v in pix)
            tfds_label = int(labels[k])
            label = self._label_map.get(tfds_label, -1)
            if label >= 0:
                cls = self.class_names[label]
            elif tfds_label < len(self.tfds_names):
                cls = self.tfds_names[tfds_label]
            else:
                cls = str(tfds_label)
            area = None if areas is None else float(np.asarray(areas).reshape(-1)[k])
            anns.append(RawAnnotation(box, label, cls, box, bool(crowd[k]), area))
        path = f"{name} {file_name}".strip()
        return RawImage(image_id, file_name, path, int(width), int(height), anns, name, index)
