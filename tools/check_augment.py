"""Parity of our training augmentation with NanoDet's ShapeTransform + color_aug_and_norm.

Usage: ``python tools/check_augment.py /path/to/nanodet [--data DIR] [--trials 24]``

``--record tests/data/golden_augment.npz`` instead writes a small seeded fixture for
``tests/datasets/test_augment.py`` (see :func:`record`).

Both sides consume the same random numbers: we draw U[0, 1) numbers with numpy, build
our parameters from them, and hand the same numbers to the reference through a stand-in
for its module-level ``random`` (``uniform(a, b) = a + (b - a) * u`` and
``randint(a, b) = a + int(u * (b - a + 1))``, CPython's formulas). Reported: max |diff|
of the 3x3 matrix, the warped uint8 image, the warped boxes, and the final normalised
float image (ours computed in jnp from the uint8 warp, as in training).
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from nanodet_jax import runtime  # noqa: E402
from nanodet_jax.config.defaults import nanodet_plus_config  # noqa: E402
from nanodet_jax.data import augment  # noqa: E402
from tools.reference import load_reference  # noqa: E402

# The shipped config (no perspective/rotation/shear), every factor on, and a colour
# stress test driving values far outside [0, 1] before the HSV round trip.
CONFIGS = {
    "nanodet-plus": {},
    "all-factors": {"perspective": 0.0008, "rotation": 15.0, "shear": 6.0, "translate": 0.25},
    "colour-stress": {"brightness": 0.9, "contrast": [0.2, 3.0], "saturation": [0.0, 4.0]},
}


class ScriptedRandom(random.Random):
    """``random.Random`` whose ``random()`` returns preset numbers, in order."""

    def __init__(self, values):
        super().__init__(0)
        self.values = list(values)

    def random(self):
        if not self.values:
            raise RuntimeError("the reference drew more numbers than scripted")
        return self.values.pop(0)

    def uniform(self, a, b):
        return a + (b - a) * self.random()

    def randint(self, a, b):
        return a + int(self.random() * (b - a + 1))


def load_samples(data_dir: str | None, n: int, rng: np.random.Generator):
    """(image, boxes) pairs: coco_tiny images with their boxes, else random images/boxes."""
    from nanodet_jax.data.coco import CocoDetection, read_image

    ann = data_dir and os.path.join(data_dir, "annotations", "instances_train2017.json")
    if ann and os.path.isfile(ann):
        records = CocoDetection(ann, os.path.join(data_dir, "train2017")).records[:n]
        return [(read_image(r.path), r.boxes) for r in records], "coco_tiny train2017"
    out = []
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(200, 640, 2))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        xy = rng.uniform(0, 1, (5, 4)) * [w, h, w, h]
        boxes = np.concatenate([xy[:, :2].clip(max=xy[:, 2:]), xy[:, 2:]], 1).astype(np.float32)
        out.append((img, boxes))
    return out, "random images"


def color_script(u: np.ndarray, cfg: dict) -> list[float]:
    """The numbers color_aug_and_norm consumes: a coin per step, a value only when it applies."""
    script = []
    for i, lo_hi in enumerate(augment.color_ranges(cfg)):
        if lo_hi is None:
            continue
        script.append(float(u[2 * i]))
        if u[2 * i] >= 0.5:
            script.append(float(u[2 * i + 1]))
    return script


def run(ref_path: str, data_dir: str | None, trials: int, seed: int) -> dict:
    import jax
    import jax.numpy as jnp

    ref = load_reference(ref_path)
    warp_mod = ref.module("nanodet.data.transform.warp")
    color_mod = ref.module("nanodet.data.transform.color")
    rng = np.random.default_rng(seed)
    samples, source = load_samples(data_dir, trials, rng)
    base = nanodet_plus_config().data.train.to_dict()
    color_fn = jax.jit(augment.color_augment_and_normalize, static_argnums=(2, 3))
    report = {"source": source, "trials": len(samples)}
    for name, override in CONFIGS.items():
        cfg = {**copy.deepcopy(base["pipeline"]), **override}
        mean, std = (tuple(v) for v in cfg["normalize"])
        worst = dict.fromkeys(("matrix", "image", "boxes", "normalised"), 0.0)
        for t, (img, boxes) in enumerate(samples):
            keep_ratio = bool(t % 2)  # both resize modes
            input_wh = tuple(base["input_size"])
            u_warp = rng.random(augment.NUM_WARP_DRAWS)
            u_color = rng.random(augment.NUM_COLOR_DRAWS)
            if t % 4 == 0:  # make sure every colour step runs in some trials
                u_color[0::2] = 0.75

            params = augment.warp_params_from_uniforms(u_warp, cfg)
            our_img, our_boxes, our_m = augment.shape_transform(
                img, boxes, params, input_wh, keep_ratio
            )
            color = augment.color_params_from_uniforms(u_color, cfg)
            our_norm = np.asarray(
                color_fn(jnp.asarray(our_img[None]), jnp.asarray(color[None]), mean, std)
            )[0]

            warp_mod.random = fake = ScriptedRandom(u_warp)
            shape = warp_mod.ShapeTransform(keep_ratio, **cfg)
            meta = shape({"img": img.copy(), "gt_bboxes": boxes.copy()}, input_wh)
            assert not fake.values, "reference drew fewer numbers than scripted"
            color_mod.random = fake = ScriptedRandom(color_script(u_color, cfg))
            ref_img = meta["img"].copy()
            meta = color_mod.color_aug_and_norm(meta, cfg)
            assert not fake.values, "reference drew fewer colour numbers than scripted"

            worst["matrix"] = max(worst["matrix"], float(np.abs(meta["warp_matrix"] - our_m).max()))
            d_img = np.abs(ref_img.astype(np.int16) - our_img.astype(np.int16)).max()
            worst["image"] = max(worst["image"], float(d_img))
            if len(boxes):
                d_box = float(np.abs(meta["gt_bboxes"] - our_boxes).max())
                worst["boxes"] = max(worst["boxes"], d_box)
            d_norm = float(np.abs(meta["img"] - our_norm).max())
            worst["normalised"] = max(worst["normalised"], d_norm)
        report[name] = worst
    return report


# ----------------------------------------------------------------- golden fixture

GOLDEN_INPUT_WH = (64, 48)  # warped images are at most 48x64
GOLDEN_SOURCES = ((40, 56), (36, 64))  # (h, w) of the seeded random source images


def golden_sources(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """Small random uint8 images (smoothed, so bilinear sampling matters) and boxes."""
    import cv2

    out = []
    for h, w in GOLDEN_SOURCES:
        img = cv2.resize(rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8), (w, h))
        img = np.clip(img.astype(np.int16) + rng.integers(-20, 21, img.shape), 0, 255)
        xy = rng.uniform(0, 1, (5, 4)) * [w, h, w, h]
        boxes = np.concatenate([xy[:, :2].clip(max=xy[:, 2:]), xy[:, 2:]], 1)
        out.append((img.astype(np.uint8), boxes.astype(np.float32)))
    return out


def record(ref_path: str, path: str, seed: int) -> dict:
    """NanoDet's ShapeTransform + color_aug_and_norm on scripted draws, written to ``path``.

    Trials: every config of :data:`CONFIGS` x keep_ratio (False, True) x both source
    images. Per trial ``t``: ``trial{t}/u_warp`` [11], ``u_color`` [6] (the uniforms),
    NanoDet's ``matrix`` [3, 3] (float64), warped ``boxes`` [5, 4] and warped uint8
    ``image``; for the keep_ratio=False trials of the first image also the normalised
    colour-augmented float32 ``normalised`` (all colour steps on; not for
    ``all-factors``, whose colour config is the shipped one). ``meta`` (JSON) holds each
    trial's config name, keep_ratio and source index, and the full pipeline config of
    each name.
    Returns the worst differences of our code against the recording.
    """
    import json

    import jax.numpy as jnp

    ref = load_reference(ref_path)
    warp_mod = ref.module("nanodet.data.transform.warp")
    color_mod = ref.module("nanodet.data.transform.color")
    rng = np.random.default_rng(seed)
    sources = golden_sources(rng)
    base = nanodet_plus_config().data.train.to_dict()["pipeline"]
    configs = {name: {**copy.deepcopy(base), **o} for name, o in CONFIGS.items()}
    arrays: dict[str, np.ndarray] = {f"source{i}/image": im for i, (im, _) in enumerate(sources)}
    arrays.update({f"source{i}/boxes": b for i, (_, b) in enumerate(sources)})
    meta = {"tool": "tools/check_augment.py --record", "seed": seed, "configs": configs}
    meta["input_wh"], meta["trials"] = list(GOLDEN_INPUT_WH), []
    worst = dict.fromkeys(("matrix", "image", "boxes", "normalised"), 0.0)
    for name, cfg in configs.items():
        mean, std = (tuple(v) for v in cfg["normalize"])
        for keep_ratio in (False, True):
            for src, (img, boxes) in enumerate(sources):
                t = len(meta["trials"])
                u_warp = rng.random(augment.NUM_WARP_DRAWS)
                u_color = rng.random(augment.NUM_COLOR_DRAWS)
                u_color[0::2] = 0.75 if src == 0 else u_color[0::2]  # all colour steps on
                warp_mod.random = fake = ScriptedRandom(u_warp)
                shape = warp_mod.ShapeTransform(keep_ratio, **cfg)
                meta_t = shape({"img": img.copy(), "gt_bboxes": boxes.copy()}, GOLDEN_INPUT_WH)
                assert not fake.values, "reference drew fewer numbers than scripted"
                key = f"trial{t}"
                arrays[f"{key}/u_warp"], arrays[f"{key}/u_color"] = u_warp, u_color
                arrays[f"{key}/matrix"] = meta_t["warp_matrix"]
                arrays[f"{key}/boxes"] = meta_t["gt_bboxes"].astype(np.float32)
                arrays[f"{key}/image"] = meta_t["img"].copy()
                entry = {"config": name, "keep_ratio": keep_ratio, "source": src}
                params = augment.warp_params_from_uniforms(u_warp, cfg)
                our_img, our_boxes, our_m = augment.shape_transform(
                    img, boxes, params, GOLDEN_INPUT_WH, keep_ratio
                )
                worst["matrix"] = max(
                    worst["matrix"], float(np.abs(our_m - meta_t["warp_matrix"]).max())
                )
                d_img = np.abs(our_img.astype(int) - meta_t["img"].astype(int)).max()
                worst["image"] = max(worst["image"], float(d_img))
                d_box = float(np.abs(our_boxes - meta_t["gt_bboxes"]).max())
                worst["boxes"] = max(worst["boxes"], d_box)
                if src == 0 and not keep_ratio and name != "all-factors":  # same colour cfg
                    color_mod.random = fake = ScriptedRandom(color_script(u_color, cfg))
                    normed = color_mod.color_aug_and_norm(meta_t, cfg)["img"]
                    assert not fake.values, "reference drew fewer colour numbers than scripted"
                    arrays[f"{key}/normalised"] = normed.astype(np.float32)
                    color = augment.color_params_from_uniforms(u_color, cfg)
                    ours = augment.color_augment_and_normalize(
                        jnp.asarray(arrays[f"{key}/image"][None]),
                        jnp.asarray(color[None]),
                        mean,
                        std,
                    )
                    d_norm = float(np.abs(np.asarray(ours)[0] - normed).max())
                    worst["normalised"] = max(worst["normalised"], d_norm)
                meta["trials"].append(entry)
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(path, **arrays)
    print(f"wrote {path} ({os.path.getsize(path)} bytes, {len(meta['trials'])} trials)")
    return worst


def main() -> None:
    runtime.configure_xla()  # the entry points' XLA settings, before any computation
    default_data = os.path.join(os.path.dirname(REPO), "shared", "data", "coco_tiny")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ref_path", help="RangiLyu/nanodet checkout")
    p.add_argument("--data", default=default_data, help="coco_tiny folder (else random images)")
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--record",
        metavar="NPZ",
        help="write the golden fixture (e.g. "
        "tests/data/golden_augment.npz) instead of the parity report",
    )
    args = p.parse_args()
    if args.record:
        worst = record(args.ref_path, args.record, args.seed)
        print(
            "ours vs recording, max |diff|: " + ", ".join(f"{k} {v:.3g}" for k, v in worst.items())
        )
        return
    report = run(args.ref_path, args.data, args.trials, args.seed)
    print(f"{report['trials']} trials per config on {report['source']} (keep_ratio alternating)")
    print(f"{'config':<14} {'matrix':>10} {'image':>6} {'boxes':>10} {'normalised':>11}")
    for name in CONFIGS:
        w = report[name]
        print(
            f"{name:<14} {w['matrix']:>10.3g} {w['image']:>6.0f} {w['boxes']:>10.3g}"
            f" {w['normalised']:>11.3g}"
        )


if __name__ == "__main__":
    main()
