"""Write a COCO-json detection dataset as a TFDS array_record dataset, without TensorFlow.

    python -m nanodet_jax.data.tfds_export --ann instances_train.json --img-dir train \
        --out data/my_tfds [--split train]

``OUT`` becomes a directory that ``tfds.builder_from_directory`` (and so
``TFDSDataset``) reads; exporting another split into the same ``OUT`` adds it (the
categories must be the same). Features follow TFDS's ``coco/2017``: ``image`` (the file's
encoded bytes, kept as they are), ``image/id``, ``image/filename``, ``objects/{bbox,
label, is_crowd, area, id}`` with ``bbox`` normalised (ymin, xmin, ymax, xmax) and
clipped to [0, 1] as TFDS requires, ``label`` = index of the category id in sorted order
(NanoDet's label convention). Boxes of negative size cannot be stored and are skipped.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np

from nanodet_jax.data.tfds_dataset import import_tfds

log = logging.getLogger("nanodet_jax")
DATASET_NAME = "nanodet_export"  # the builder's name; also in the shard file names


@functools.cache
def _builder_class() -> type:
    """Defined on first use: TFDS registers builder classes by name, once per process."""
    tfds = import_tfds()

    class NanodetExport(tfds.core.GeneratorBasedBuilder):
        name = DATASET_NAME
        VERSION = tfds.core.Version("1.0.0")
        # No source folder to look for checksum files in; TFDS's default lookup needs
        # the importlib_resources backport (undeclared for Python >= 3.9) for packages.
        code_path = None

        def __init__(self, *, class_names: list[str], split: str, examples: Any, **kwargs: Any):
            self._class_names, self._split, self._examples = class_names, split, examples
            super().__init__(**kwargs)

        def _info(self) -> Any:
            f = tfds.features
            # numpy dtypes only: a features dict with tf dtypes would import TensorFlow.
            objects = f.Sequence({
                "bbox": f.BBoxFeature(),
                "label": f.ClassLabel(names=self._class_names),
                "is_crowd": np.bool_,
                "area": np.float32,
                "id": np.int64,
            })  # fmt: skip
            features = f.FeaturesDict({
                "image": f.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "image/id": np.int64,
                "image/filename": f.Text(),
                "objects": objects,
            })  # fmt: skip
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager: Any) -> dict:
            return {self._split: self._generate_examples()}

        def _generate_examples(self) -> Iterator[tuple[int, dict]]:
            yield from self._examples()

    return NanodetExport


def _coco_examples(coco: dict, img_dir: str, ann_file: str) -> tuple[list[str], Any]:
    """(class names, a generator factory of (key, example)) from a COCO json dict."""
    tfds = import_tfds()
    cats = sorted(coco.get("categories", []), key=lambda c: c["id"])
    if not cats:
        raise ValueError(f"{ann_file}: defines no categories")
    cat2label = {c["id"]: i for i, c in enumerate(cats)}
    dup = sorted(
        i for i, n in Counter(img["id"] for img in coco.get("images", [])).items() if n > 1
    )
    if dup:
        raise ValueError(f"{ann_file}: duplicate image ids {dup[:10]}")
    by_image: dict[int, list[dict]] = {}
    for ann in coco.get("annotations", []):
        by_image.setdefault(ann["image_id"], []).append(ann)

    def examples() -> Iterator[tuple[int, dict]]:
        skipped = 0
        for info in sorted(coco["images"], key=lambda i: i["id"]):
            path = os.path.join(img_dir, info["file_name"])
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: image file not found (image id {info['id']})")
            with open(path, "rb") as f:
                data = f.read()
            w, h = float(info["width"]), float(info["height"])
            objects = []
            for ann in by_image.get(info["id"], []):
                x, y, bw, bh = (float(v) for v in ann["bbox"])
                if ann.get("category_id") not in cat2label or bw < 0 or bh < 0:
                    skipped += 1
                    continue
                clip = functools.partial(np.clip, a_min=0.0, a_max=1.0)
                bbox = tfds.features.BBox(
                    ymin=float(clip(y / h)), xmin=float(clip(x / w)),
                    ymax=float(clip((y + bh) / h)), xmax=float(clip((x + bw) / w)),
                )  # fmt: skip
                objects.append({
                    "bbox": bbox,
                    "label": cat2label[ann["category_id"]],
                    "is_crowd": bool(ann.get("iscrowd", 0)),
                    "area": float(ann.get("area", bw * bh)),
                    "id": int(ann.get("id", len(objects))),
                })  # fmt: skip
            example = {"image": data, "image/id": int(info["id"]),
                       "image/filename": info["file_name"], "objects": objects}  # fmt: skip
            yield int(info["id"]), example
        if skipped:
            log.warning(f"{ann_file}: skipped {skipped} annotations (unknown category or size < 0)")

    return [c["name"] for c in cats], examples


def _merge_into(version_dir: str, out_dir: str, split: str) -> None:
    """Move a freshly prepared split into ``out_dir``, adding it to its dataset_info."""
    if not os.path.isfile(os.path.join(out_dir, "dataset_info.json")):
        if os.path.isdir(out_dir) and os.listdir(out_dir):
            raise FileExistsError(f"{out_dir}: exists, is not empty and holds no TFDS dataset")
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        shutil.move(version_dir, out_dir)
        return
    with open(os.path.join(out_dir, "features.json")) as f:
        old_features = json.load(f)
    with open(os.path.join(version_dir, "features.json")) as f:
        if json.load(f) != old_features:
            raise ValueError(f"{out_dir}: holds a dataset with other features (categories)")
    with open(os.path.join(out_dir, "dataset_info.json")) as f:
        info = json.load(f)
    with open(os.path.join(version_dir, "dataset_info.json")) as f:
        new_splits = json.load(f)["splits"]
    prefix = f"{DATASET_NAME}-{split}."
    for name in os.listdir(out_dir):  # re-exporting a split replaces it
        if name.startswith(prefix):
            os.remove(os.path.join(out_dir, name))
    for name in os.listdir(version_dir):
        if name.startswith(prefix):
            shutil.move(os.path.join(version_dir, name), os.path.join(out_dir, name))
    info["splits"] = [s for s in info["splits"] if s["name"] != split] + new_splits
    with open(os.path.join(out_dir, "dataset_info.json"), "w") as f:
        json.dump(info, f, indent=2)


def export_coco(
    ann_file: str, img_dir: str, out_dir: str, split: str = "train",
    file_format: str = "array_record", num_shards: int | None = None,
) -> str:  # fmt: skip
    """Write split ``split`` of the COCO dataset into ``out_dir``; returns ``out_dir``.

    ``file_format="tfrecord"`` needs TensorFlow (TFDS writes tfrecord through it): only
    ``tools/make_tfrecord_fixture.py`` uses it, in a separate environment."""
    tfds = import_tfds()
    with open(ann_file) as f:
        coco = json.load(f)
    class_names, examples = _coco_examples(coco, img_dir, ann_file)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    # Prepared beside out_dir (same filesystem, so the final moves are renames).
    tmp = tempfile.mkdtemp(prefix=".tfds_export-", dir=os.path.dirname(out_dir))
    try:
        builder = _builder_class()(
            class_names=class_names, split=split, examples=examples,
            data_dir=tmp, file_format=file_format,
        )  # fmt: skip
        config = tfds.download.DownloadConfig(num_shards=num_shards) if num_shards else None
        builder.download_and_prepare(download_config=config)
        _merge_into(str(builder.data_dir), out_dir, split)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = tfds.builder_from_directory(out_dir).info.splits[split].num_examples
    log.info(f"wrote {n} examples of split {split!r} to {out_dir}")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """``nanodet-tfds-export``: user errors as one line, status 2 (as every entry point)."""
    from nanodet_jax.cli.common import entry_point  # the CLI layer, imported on use

    entry_point(_main)(argv)


def _main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write a COCO-json dataset as TFDS array_record.")
    p.add_argument("--ann", required=True, help="COCO annotation json")
    p.add_argument("--img-dir", required=True, help="folder of the images it names")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--split", default="train", help="split name (default: train)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    import_tfds().disable_progress_bar()
    out = export_coco(args.ann, args.img_dir, args.out, args.split)
    print(
        f"TFDS dataset: {out} (config: name='TFDSDataset', img_dir='{out}', split='{args.split}')"
    )


if __name__ == "__main__":
    main()
