"""Write a COCO annotation file restricted to some classes (other annotations dropped,
images kept), e.g. to fine-tune a COCO model on a 3-class subset:

    python tools/coco_subset.py --ann instances_train2017.json --classes person,car,chair \
        --out train_3cls.json
"""

from __future__ import annotations

import argparse
import json


def subset(coco: dict, names: list[str]) -> dict:
    by_name = {c["name"]: c for c in coco["categories"]}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise SystemExit(f"unknown classes {missing}; available: {sorted(by_name)}")
    keep = {by_name[n]["id"] for n in names}
    return {
        **{k: v for k, v in coco.items() if k not in ("categories", "annotations")},
        "categories": [c for c in coco["categories"] if c["id"] in keep],
        "annotations": [a for a in coco["annotations"] if a["category_id"] in keep],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ann", required=True)
    p.add_argument("--classes", required=True, help="comma-separated class names")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    with open(args.ann) as f:
        coco = json.load(f)
    out = subset(coco, [n.strip() for n in args.classes.split(",")])
    with open(args.out, "w") as f:
        json.dump(out, f)
    print(f"{args.out}: {len(out['images'])} images, {len(out['annotations'])} annotations, "
          f"classes {[c['name'] for c in out['categories']]}")  # fmt: skip


if __name__ == "__main__":
    main()
