"""Check a detection dataset before training on it: ``nanodet-check-dataset``.

    nanodet-check-dataset --config configs/quickstart.py [--split train|val|both] \
        [--no-decode] [--config.data.train.img_dir=...]

Reads the dataset in whatever format ``config.data.<split>.name`` names and reports:
image count, boxes per class, images without boxes, broken images (missing, truncated
JPEG / PNG, undecodable), boxes outside the image or degenerate, annotations of unknown
classes, duplicate image ids and file names, image sizes that differ from the annotation.
Exits 1 when the dataset would not train correctly (errors), 0 when there are at most
warnings.
"""

from __future__ import annotations

import argparse
import logging
import sys

from nanodet_jax.cli import common as cli
from nanodet_jax.data.check import check_dataset


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="config file, e.g. configs/quickstart.py")
    p.add_argument("--split", choices=("train", "val", "both"), default="both")
    p.add_argument("--no-decode", action="store_true", help="read image headers only (fast)")
    p.add_argument("--threads", type=int, default=2, help="image decoding threads")
    args, overrides = p.parse_known_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    config = cli.read_config(args.config, overrides)
    roles = ("train", "val") if args.split == "both" else (args.split,)
    errors = 0
    for role in roles:
        split_cfg = config.data[role]
        report = check_dataset(
            split_cfg, config.get("class_names"), role, not args.no_decode, args.threads
        )
        print(report.format())
        errors += report.errors
    print(f"{errors} errors" + (": this dataset would not train correctly" if errors else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
