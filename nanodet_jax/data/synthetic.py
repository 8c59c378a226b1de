"""A small deterministic COCO-format detection dataset of coloured shapes, for offline
quick starts and smoke tests (no download).

``python -m nanodet_jax.data.synthetic --out DIR [--train 512] [--val 128] [--size 320]``
writes ``DIR/{train,val}/*.jpg`` and ``DIR/annotations/instances_{train,val}.json`` with
three classes (circle, square, triangle). Objects are 24-120 px at size 320 (scaled with
``--size``), of saturated colours on textured backgrounds (noise, gradients, stripes,
blotches); some overlap (IoU <= 0.3), about one image in ten is empty. Boxes are tight:
the bounding box of each shape's full rasterised mask (later shapes may hide part of it).
Every image depends only on (seed, split, index), so the files are reproducible.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from nanodet_jax import paths

CLASSES = ("circle", "square", "triangle")
SPLITS = {"train": 1, "val": 2}  # part of each image's seed
BACKGROUNDS = ("noise", "gradient", "stripes", "blotches")
EMPTY_RATE = 0.1
MAX_OBJECTS = 6
MAX_IOU = 0.3


@dataclasses.dataclass
class SyntheticImage:
    image: np.ndarray  # uint8 BGR [h, w, 3]
    boxes: np.ndarray  # float32 [n, 4] xyxy, pixel edges (a pixel i spans [i, i+1))
    labels: np.ndarray  # int32 [n] index into CLASSES
    masks: np.ndarray  # bool [n, h, w], each shape's full rasterised area


def _colour(rng: np.random.Generator) -> np.ndarray:
    hsv = np.array([[[rng.integers(180), rng.integers(60, 256), rng.integers(70, 256)]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    a, b = _colour(rng) * 0.7, _colour(rng) * 0.7  # duller than the objects
    angle = rng.uniform(0, math.pi)
    xs = np.arange(w, dtype=np.float32)[None, :] * np.float32(math.cos(angle))
    ys = np.arange(h, dtype=np.float32)[:, None] * np.float32(math.sin(angle))
    if kind == "noise":
        t = np.full((h, w), 0.5, np.float32)
    elif kind == "gradient":
        along = xs + ys
        t = (along - along.min()) / max(float(np.ptp(along)), 1.0)
    elif kind == "stripes":
        t = 0.5 + 0.5 * np.sin((xs + ys) * np.float32(2 * math.pi / rng.uniform(8, 40)))
    else:  # low-frequency blotches: coarse random grid, upsampled
        coarse = rng.random((rng.integers(3, 9), rng.integers(3, 9)), dtype=np.float32)
        t = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    img = a + (b - a) * t[..., None]
    amp = int(rng.integers(6, 36))  # uniform grain (fast to draw, looks like sensor noise)
    img += rng.integers(-amp, amp + 1, (h, w, 3), dtype=np.int16)
    return img


def _shape_mask(rng: np.random.Generator, label: int, h: int, w: int, size: float):
    """A filled shape of about ``size`` px somewhere fully inside the image."""
    half = size / 2
    cx, cy = rng.uniform(half, w - half), rng.uniform(half, h - half)
    mask = np.zeros((h, w), np.uint8)
    if label == 0:
        cv2.circle(mask, (round(cx), round(cy)), max(round(half), 1), 1, thickness=-1)
    else:
        corners = 4 if label == 1 else 3
        # Circumradius so that the shape's extent is ~size (a square's diagonal is longer).
        radius = half * (math.sqrt(2) if corners == 4 else 2 / math.sqrt(3))
        radius = min(radius, cx, cy, w - cx, h - cy)
        start = rng.uniform(0, 2 * math.pi)
        pts = [
            (cx + radius * math.cos(start + 2 * math.pi * k / corners),
             cy + radius * math.sin(start + 2 * math.pi * k / corners))
            for k in range(corners)
        ]  # fmt: skip
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask.astype(bool)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def tight_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def render_image(rng: np.random.Generator, size: int = 320) -> SyntheticImage:
    """One image (size x size or size x 3/4 size) with its objects."""
    w = size
    h = size if rng.random() < 0.5 else round(size * 0.75)
    img = _background(rng, h, w)
    lo, hi = max(8.0, 24 * size / 320), min(120 * size / 320, 0.9 * min(h, w))
    count = 0 if rng.random() < EMPTY_RATE else int(rng.integers(1, MAX_OBJECTS + 1))
    boxes, labels, masks = [], [], []
    for _ in range(count):
        label = int(rng.integers(len(CLASSES)))
        for _try in range(20):  # re-place until it overlaps little enough
            mask = _shape_mask(rng, label, h, w, rng.uniform(lo, hi))
            if not mask.any():
                continue
            box = tight_box(mask)
            if all(_iou(box, other) <= MAX_IOU for other in boxes):
                break
        else:
            continue
        x1, y1, x2, y2 = (int(v) for v in box)
        crop, inside = img[y1:y2, x1:x2], mask[y1:y2, x1:x2, None]
        for _try in range(5):  # a colour that stands out from what is under the shape
            colour = _colour(rng)
            if np.abs(crop.mean(axis=(0, 1)) - colour).max() > 60:
                break
        # A little grain so that objects are not perfectly flat.
        grain = rng.integers(-8, 9, (y2 - y1, x2 - x1, 1), dtype=np.int16)
        crop[...] = np.where(inside, colour + grain, crop)
        boxes.append(box)
        labels.append(label)
        masks.append(mask)
    return SyntheticImage(
        image=np.clip(img, 0, 255).astype(np.uint8),
        boxes=np.array(boxes, np.float32).reshape(-1, 4),
        labels=np.array(labels, np.int32),
        masks=np.array(masks, bool).reshape(-1, h, w),
    )


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], index])


def write_split(out_dir: str, split: str, count: int, size: int, seed: int) -> str:
    """Write one split's JPEGs and COCO json; returns the json path."""
    img_dir = paths.join(out_dir, split)
    paths.makedirs(img_dir)
    paths.makedirs(paths.join(out_dir, "annotations"))

    def one(index: int) -> tuple[dict, list[dict]]:
        sample = render_image(image_rng(seed, split, index), size)
        image_id = index + 1
        name = f"{image_id:06d}.jpg"
        ok, data = cv2.imencode(".jpg", sample.image, [cv2.IMWRITE_JPEG_QUALITY, 92])
        if not ok:
            raise OSError(f"cannot encode {name}")
        paths.write_bytes(paths.join(img_dir, name), data.tobytes())
        h, w = sample.image.shape[:2]
        anns = []
        for box, label, mask in zip(sample.boxes, sample.labels, sample.masks):
            x1, y1, x2, y2 = (float(v) for v in box)
            anns.append({
                "image_id": image_id,
                "category_id": int(label) + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": float(mask.sum()),
                "iscrowd": 0,
            })  # fmt: skip
        return {"id": image_id, "file_name": name, "width": w, "height": h}, anns

    # cv2 drawing/encoding and numpy release the GIL: threads give a ~2x speed-up.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        results = list(pool.map(one, range(count)))
    images, annotations = [], []
    for info, anns in results:
        images.append(info)
        for ann in anns:
            annotations.append({**ann, "id": len(annotations) + 1})
    coco = {
        "info": {"description": f"nanodet_jax synthetic shapes, seed {seed}, size {size}"},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)
        ],
    }
    path = paths.join(out_dir, "annotations", f"instances_{split}.json")
    paths.write_text(path, json.dumps(coco))
    return path


def write_dataset(
    out_dir: str, num_train: int = 512, num_val: int = 128, size: int = 320, seed: int = 0
) -> dict[str, str]:
    """Write both splits; returns {split: annotation json path}."""
    if size < 64:
        raise ValueError(f"size {size} is too small for 24-120 px objects (scaled); use >= 64")
    return {
        split: write_split(out_dir, split, count, size, seed)
        for split, count in (("train", num_train), ("val", num_val))
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write the synthetic shapes dataset (COCO format).")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=512, help="training images")
    p.add_argument("--val", type=int, default=128, help="validation images")
    p.add_argument("--size", type=int, default=320, help="image width in pixels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    anns = write_dataset(args.out, args.train, args.val, args.size, args.seed)
    out = paths.abspath(args.out)
    print(f"wrote {args.train} train / {args.val} val images to {out}")
    print("train with e.g.:")
    print(
        f"  --config.data.train.img_dir={out}/train --config.data.train.ann_file={anns['train']}"
        f" --config.data.val.img_dir={out}/val --config.data.val.ann_file={anns['val']}"
        f' --config.class_names="{list(CLASSES)}"'
    )


if __name__ == "__main__":
    main()
