"""Our canvas resize (``nanodet_jax/data/canvas_resize.py``) against torchvision's
``GeneralizedRCNNTransform`` on real photos (torchvision via ``tools/torchvision_cpu.py``).

    python tools/check_canvas_resize.py [--data ../shared/data] [--images 20]
    python tools/check_canvas_resize.py --record tests/data/golden_canvas_resize.npz

Report: for COCO val photos at 800 / 1333, the max |difference| of the network input
(torchvision: RGB [0, 1] normalised, then resized and padded; ours: the float32 resize of
the 0-255 BGR pixels, normalised as the device does, channels reversed) over the valid
extent, whether its padding is zero and its size the same; beside it the same for
``cv2.resize(INTER_LINEAR)`` and for our resize rounded to uint8, the two shortcuts.

``--record`` writes the golden of ``tests/datasets/test_canvas_resize.py``: three small crops
of a real photo through the transform with mean 0 / std 1 (so its output is the bare
resize of the 0-255 values), downscaled, upscaled and clamped by ``max_size``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import cv2
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from nanodet_jax.data import canvas_resize  # noqa: E402
from tools.torchvision_cpu import import_torchvision  # noqa: E402

MEAN_RGB, STD_RGB = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The FCOS config's BGR 0-255 normalisation (configs/fcos_r50_fpn.py).
MEAN_BGR, STD_BGR = (103.53, 116.28, 123.675), (57.375, 57.12, 58.395)
# (name, crop (y0, y1, x0, x1) of the photo, min_size, max_size)
GOLDEN_CASES = (
    ("down", (100, 220, 200, 360), 45, 100),  # 160x120 -> 60x45
    ("up", (250, 280, 300, 340), 64, 128),  # 40x30 -> 85x64
    ("max", (300, 340, 100, 220), 64, 96),  # 120x40: max_size wins, 96x32
)


def torchvision_input(tv, torch, bgr: np.ndarray, min_size: int, max_size: int, mean, std):
    """GeneralizedRCNNTransform's batch (eval mode) of one BGR uint8 image, as HWC RGB.
    With the ImageNet mean the image is in [0, 1] (torchvision's input); else 0-255."""
    t = tv.models.detection.transform.GeneralizedRCNNTransform(min_size, max_size, mean, std)
    t.eval()
    rgb = torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1])).permute(2, 0, 1)
    with torch.no_grad():
        x = rgb.float() / 255 if mean == MEAN_RGB else rgb.float()
        batch, _ = t([x])
    return batch.tensors[0].permute(1, 2, 0).numpy(), tuple(batch.image_sizes[0])


def ours_normalised(resized_bgr: np.ndarray) -> np.ndarray:
    """The device's normalisation (transforms.standardize) in numpy, then BGR -> RGB."""
    x = resized_bgr.astype(np.float32) / np.float32(255)
    mean = np.asarray(MEAN_BGR, np.float32) / np.float32(255)
    std = np.asarray(STD_BGR, np.float32) / np.float32(255)
    return ((x - mean) / std)[..., ::-1]


def compare(tv, torch, path: str) -> dict:
    img = cv2.imread(path)
    spec = canvas_resize.from_config({"resize": {"min_size": 800, "max_size": 1333}}, "check")
    h, w = img.shape[:2]
    ref, (rh, rw) = torchvision_input(tv, torch, img, 800, 1333, MEAN_RGB, STD_RGB)
    ow, oh = spec.output_wh(w, h)
    ours = spec.resize(img)
    cv = cv2.resize(img.astype(np.float32), (ow, oh), interpolation=cv2.INTER_LINEAR)
    valid = ref[:rh, :rw]
    pad_h, pad_w = -(-rh // 32) * 32, -(-rw // 32) * 32
    return {
        "file": os.path.basename(path),
        "size_same": (rh, rw) == (oh, ow) and ref.shape[:2] == (pad_h, pad_w),
        "padding_zero": bool(np.all(ref[rh:] == 0) and np.all(ref[:, rw:] == 0)),
        "ours": float(np.abs(ours_normalised(ours) - valid).max()),
        "ours_uint8": float(np.abs(ours_normalised(np.round(ours)) - valid).max()),
        "cv2": float(np.abs(ours_normalised(cv) - valid).max()),
    }


def record(tv, torch, photo: str, out: str) -> None:
    img = cv2.imread(photo)
    arrays, meta = {}, []
    for name, (y0, y1, x0, x1), lo, hi in GOLDEN_CASES:
        crop = np.ascontiguousarray(img[y0:y1, x0:x1])
        ref, size = torchvision_input(tv, torch, crop, lo, hi, (0.0,) * 3, (1.0,) * 3)
        arrays[f"{name}_input"] = crop
        arrays[f"{name}_torchvision"] = ref[..., ::-1].astype(np.float32)  # back to BGR
        meta.append({"name": name, "min_size": lo, "max_size": hi, "image_size": size})
    source = os.path.relpath(photo, os.path.dirname(os.path.dirname(photo)))
    meta_all = {"cases": meta, "photo": source, "torchvision": tv.__version__}
    np.savez_compressed(out, meta=json.dumps(meta_all), **arrays)
    print(f"wrote {out} ({os.path.getsize(out) // 1024} KB)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=os.path.join(os.path.dirname(REPO), "shared", "data"))
    p.add_argument("--images", type=int, default=20, help="COCO val photos to compare")
    p.add_argument("--record", help="write the test golden here instead")
    args = p.parse_args(argv)
    import torch

    tv = import_torchvision()
    if args.record:
        record(tv, torch, os.path.join(args.data, "images", "bus.jpg"), args.record)
        return
    folder = os.path.join(args.data, "coco_tiny", "val2017")
    rows = [compare(tv, torch, os.path.join(folder, f))
            for f in sorted(os.listdir(folder))[: args.images]]  # fmt: skip
    for r in rows:
        print(json.dumps(r))
    for key in ("ours", "ours_uint8", "cv2"):
        print(f"{key:>10}: max |diff| {max(r[key] for r in rows):.3g} (normalised units)")
    print(f"sizes equal: {all(r['size_same'] for r in rows)}, "
          f"padding zero: {all(r['padding_zero'] for r in rows)}")  # fmt: skip


if __name__ == "__main__":
    main()
