"""Prepare a COCO-json dataset as a *tfrecord* TFDS dataset, by TFDS (and TensorFlow) itself.

Runs in a separate environment with TensorFlow, never a dependency of nanodet-jax::

    python3 -m venv /work/tfvenv
    /work/tfvenv/bin/pip install tensorflow-cpu==2.21.0 tensorflow-datasets opencv-python-headless
    /work/tfvenv/bin/python tools/make_tfrecord_fixture.py --ann A.json --img-dir IMGS \
        --out OUT [--split val] [--num-shards 3]
    /work/tfvenv/bin/python tools/make_tfrecord_fixture.py --fixture   # the test fixture

The builder and features are ``nanodet_jax.data.tfds_export``'s (TFDS's ``coco/2017``
layout), with ``file_format="tfrecord"``, so the tfrecord and array_record versions of a
dataset differ only in the file format. ``--fixture`` writes ``tests/data/tfrecord/``: 8
synthetic 64 px images as COCO json (``source/``, one object marked crowd) and the same
images as a 3-shard tfrecord TFDS dataset (``tfds/``), read by
``tests/datasets/test_tfrecord.py`` without TensorFlow.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from nanodet_jax.data import synthetic, tfds_export  # noqa: E402  (no jax: TF's venv)

FIXTURE = os.path.join(REPO, "tests", "data", "tfrecord")
CROWD_ANN = 2  # this annotation of the fixture is marked crowd


def make_fixture(num_images: int = 8, num_shards: int = 3) -> None:
    src = os.path.join(FIXTURE, "source")
    shutil.rmtree(FIXTURE, ignore_errors=True)
    ann = synthetic.write_split(src, "train", num_images, size=64, seed=11)
    with open(ann) as f:
        coco = json.load(f)
    coco["annotations"][CROWD_ANN]["iscrowd"] = 1
    with open(ann, "w") as f:
        json.dump(coco, f)
    out = os.path.join(FIXTURE, "tfds")
    tfds_export.export_coco(ann, os.path.join(src, "train"), out, "train", "tfrecord", num_shards)
    shards = sorted(glob.glob(os.path.join(out, "*.tfrecord-*")))
    print(f"fixture: {len(coco['images'])} images in {len(shards)} shards under {FIXTURE}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixture", action="store_true", help="(re)write tests/data/tfrecord")
    p.add_argument("--ann", help="COCO annotation json")
    p.add_argument("--img-dir", help="folder of the images it names")
    p.add_argument("--out", help="output dataset directory")
    p.add_argument("--split", default="train")
    p.add_argument("--num-shards", type=int, default=None, help="default: TFDS's choice")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.fixture:
        make_fixture()
        return
    if not (args.ann and args.img_dir and args.out):
        p.error("give --ann, --img-dir and --out, or --fixture")
    out = tfds_export.export_coco(
        args.ann, args.img_dir, args.out, args.split, "tfrecord", args.num_shards
    )
    print(f"TFDS tfrecord dataset: {out} (config: name='TFDSDataset', img_dir='{out}', "
          f"split='{args.split}')")  # fmt: skip


if __name__ == "__main__":
    main()
