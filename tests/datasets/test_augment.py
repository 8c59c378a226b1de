"""Training augmentation (torch-free): matrix algebra, boxes, OpenCV-exact HSV, distributions.

Parity with the PyTorch reference on the same draws is ``tools/check_augment.py``; its
``--record`` output ``tests/data/golden_augment.npz`` is the reference of
:func:`test_matrix_is_the_product_in_nanodet_order`.
"""

from __future__ import annotations

import functools
import json
import os

import cv2
import jax
import numpy as np
import pytest

from nanodet_jax.config.defaults import NORMALIZE, nanodet_plus_config
from nanodet_jax.data import augment
from tests.conftest import REPO
from tools import opencv_warp

PIPELINE = nanodet_plus_config().data.train.pipeline.to_dict()
EVERY_FACTOR = {**PIPELINE, "perspective": 0.001, "rotation": 20.0, "shear": 8.0}
GOLDEN_AUGMENT = os.path.join(REPO, "tests", "data", "golden_augment.npz")


@functools.cache
def golden_augment() -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(GOLDEN_AUGMENT) as z:
        arrays = {k: z[k] for k in z.files}
    return json.loads(str(arrays.pop("meta"))), arrays


def test_matrix_is_the_product_in_nanodet_order():
    """Matrices, boxes, warped and normalised images equal NanoDet's on the same draws.

    Golden: ``tests/data/golden_augment.npz``, written by
    ``python tools/check_augment.py /path/to/nanodet --record tests/data/golden_augment.npz``
    (seed 0): NanoDet's ``ShapeTransform`` and ``color_aug_and_norm`` fed the recorded
    U[0, 1) numbers through a scripted ``random``, on two seeded 40x56 / 36x64 images,
    for the shipped pipeline, every factor on (perspective, rotation, shear, translate)
    and a colour stress config, each with keep_ratio False and True (warped to at most
    48x64). Recorded here: the float64 matrices exactly, boxes and uint8 images exactly;
    normalised images to float32 rounding (XLA's reciprocal divide, OpenCV's FMA).
    """
    meta, g = golden_augment()
    assert len(meta["trials"]) == 12 and {t["config"] for t in meta["trials"]} == {
        "nanodet-plus",
        "all-factors",
        "colour-stress",
    }
    input_wh = tuple(meta["input_wh"])
    # This machine's warps of NanoDet's matrices: NanoDet's images exactly where OpenCV
    # rounds as where they were recorded, a few values off on other CPUs (opencv_warp.py).
    here = opencv_warp.warp_probe()
    same_warps = opencv_warp.fingerprint(here) == opencv_warp.recorded()
    normalised = 0
    for t, trial in enumerate(meta["trials"]):
        cfg, keep, key = meta["configs"][trial["config"]], trial["keep_ratio"], f"trial{t}"
        img, boxes = g[f"source{trial['source']}/image"], g[f"source{trial['source']}/boxes"]
        params = augment.warp_params_from_uniforms(g[f"{key}/u_warp"], cfg)
        out, warped, m = augment.shape_transform(img, boxes, params, input_wh, keep)
        msg = f"{key} ({trial})"
        np.testing.assert_allclose(m, g[f"{key}/matrix"], rtol=1e-12, atol=1e-12, err_msg=msg)
        np.testing.assert_allclose(warped, g[f"{key}/boxes"], rtol=0, atol=1e-4, err_msg=msg)
        assert out.shape == g[f"{key}/image"].shape, msg
        np.testing.assert_array_equal(out, here[t], err_msg=msg)
        d = np.abs(out.astype(np.int16) - g[f"{key}/image"])
        allowed = 0.0 if same_warps else 1e-3  # share of values off by 1
        assert d.max() <= (0 if same_warps else 1) and np.mean(d > 0) <= allowed, (msg, d.max())
        if f"{key}/normalised" in g:
            normalised += 1
            mean, std = (tuple(v) for v in cfg["normalize"])
            color = augment.color_params_from_uniforms(g[f"{key}/u_color"], cfg)
            assert np.all(color[[augment.CONTRAST, augment.SATURATION_ON]] != [1, 0]), msg
            ours = jax.jit(augment.color_augment_and_normalize, static_argnums=(2, 3))(
                g[f"{key}/image"][None], color[None], mean, std
            )
            atol = 3e-5 if trial["config"] == "colour-stress" else 5e-6
            np.testing.assert_allclose(
                np.asarray(ours)[0], g[f"{key}/normalised"], rtol=2e-6, atol=atol, err_msg=msg
            )
    assert normalised == 2


def test_identity_params_give_the_resize_matrix():
    from nanodet_jax.data.transforms import resize_matrix

    for keep in (False, True):
        dst = augment.output_wh((640, 480), (320, 320), keep)
        m = augment.warp_matrix(augment.WarpParams(), (640, 480), dst, keep)
        np.testing.assert_allclose(m, resize_matrix((640, 480), dst, keep), atol=1e-12)
    assert augment.output_wh((640, 480), (320, 320), True) == (320, 240)
    assert augment.output_wh((640, 480), (320, 320), True, divisible=32) == (320, 256)


def test_boxes_are_the_clipped_hull_of_the_warped_corners():
    rng = np.random.default_rng(0)
    img = np.zeros((480, 640, 3), np.uint8)
    boxes = np.array([[100, 80, 300, 260], [400, 300, 630, 470], [0, 0, 10, 10]], np.float32)
    for _ in range(20):
        p = augment.sample_warp_params(rng, EVERY_FACTOR)
        out, warped, m = augment.shape_transform(img, boxes, p, (320, 320), keep_ratio=False)
        assert out.shape == (320, 320, 3) and warped.dtype == np.float32
        # NanoDet keeps every box, even one pushed out of the image.
        assert warped.shape == boxes.shape
        for box, got in zip(boxes, warped):
            x1, y1, x2, y2 = box
            corners = np.array([[x1, y1, 1], [x2, y1, 1], [x1, y2, 1], [x2, y2, 1]])
            xy = corners @ m.T
            xy = xy[:, :2] / xy[:, 2:]
            hull = np.array([*xy.min(0), *xy.max(0)])
            hull[[0, 2]] = hull[[0, 2]].clip(0, 320)
            hull[[1, 3]] = hull[[1, 3]].clip(0, 320)
            np.testing.assert_allclose(got, hull, rtol=1e-5, atol=1e-3)


def test_image_content_follows_the_matrix():
    img = np.zeros((300, 400, 3), np.uint8)
    img[100:140, 250:290] = 255  # a bright square, centre (270, 120) in pixel-centre coords
    p = augment.WarpParams(scale=0.8, rotation=30.0, flip=True, translate=(0.4, 0.55))
    out, boxes, m = augment.shape_transform(
        img, np.array([[250, 100, 290, 140]], np.float32), p, (320, 320), keep_ratio=True
    )
    ys, xs = np.nonzero(out[..., 0] > 127)
    centre = m @ np.array([269.5, 119.5, 1.0])
    np.testing.assert_allclose([xs.mean(), ys.mean()], centre[:2] / centre[2], atol=0.6)
    x1, y1, x2, y2 = boxes[0]
    assert x1 - 1 <= xs.min() and xs.max() <= x2 + 1 and y1 - 1 <= ys.min() and ys.max() <= y2 + 1


def hsv_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "unit": rng.random((32, 64, 3), dtype=np.float32),
        # After brightness/contrast NanoDet feeds values outside [0, 1] to cvtColor.
        "out of range": (rng.random((32, 64, 3), dtype=np.float32) * 3 - 1),
        "ties": rng.integers(-2, 3, (32, 64, 3)).astype(np.float32) * np.float32(0.25),
        "odd width": rng.random((5, 13, 3), dtype=np.float32) * 2 - 0.5,
    }


@pytest.mark.parametrize("name", list(hsv_inputs()))
def test_hsv_matches_opencv_float32(name):
    x = hsv_inputs()[name].astype(np.float32)
    hsv = cv2.cvtColor(x, cv2.COLOR_BGR2HSV)
    ours = np.asarray(jax.jit(augment.bgr_to_hsv)(x))
    np.testing.assert_allclose(ours, hsv, rtol=0, atol=1e-4)  # H in degrees
    for alpha in (1.0, 0.3, 2.5):  # S > 1 after saturation
        scaled = hsv.copy()
        scaled[..., 1] *= np.float32(alpha)
        back = cv2.cvtColor(scaled, cv2.COLOR_HSV2BGR)
        ours_back = np.asarray(jax.jit(augment.hsv_to_bgr)(scaled))
        np.testing.assert_allclose(ours_back, back, rtol=0, atol=2e-6)


def nanodet_color(img: np.ndarray, b, c, s) -> np.ndarray:
    """NanoDet's color_aug_and_norm with given draws (None = skipped), on one uint8 image."""
    x = img.astype(np.float32) / 255
    if b is not None:
        x += np.float32(b)
    if c is not None:
        x *= np.float32(c)
    if s is not None:
        hsv = cv2.cvtColor(x, cv2.COLOR_BGR2HSV)
        hsv[..., 1] *= np.float32(s)
        x = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    mean, std = (np.asarray(v, np.float32) / 255 for v in NORMALIZE)
    return (x - mean) / std


def test_color_augment_matches_nanodet_formula():
    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, (6, 24, 40, 3), dtype=np.uint8)
    draws = [
        (None, None, None),
        (0.2, None, None),
        (None, 1.4, None),
        (None, None, 0.5),
        (-0.2, 0.6, 1.2),
        (0.9, 3.0, 4.0),  # far outside [0, 1] before the HSV round trip
    ]
    params = np.stack([augment.color_params_from_draws(*d) for d in draws])
    fn = jax.jit(augment.color_augment_and_normalize, static_argnums=(2, 3))
    ours = np.asarray(fn(imgs, params, *NORMALIZE))
    for i, d in enumerate(draws):
        # A few float32 ulps: XLA divides by a broadcast scalar as a multiply by its
        # reciprocal, and OpenCV's HSV->BGR uses FMA; S*4 on values ~5 amplifies both.
        atol = 3e-5 if i == len(draws) - 1 else 1e-5
        np.testing.assert_allclose(ours[i], nanodet_color(imgs[i], *d), rtol=2e-6, atol=atol)
    valid = np.array([[10, 40]] * 6, np.int32)
    padded = np.asarray(fn(imgs, params, *NORMALIZE, valid))
    assert np.all(padded[:, 10:] == 0)
    np.testing.assert_allclose(padded[:, :10], ours[:, :10], rtol=1e-6, atol=1e-6)


def test_warp_distributions():
    rng = np.random.default_rng(3)
    draws = [augment.sample_warp_params(rng, EVERY_FACTOR) for _ in range(4000)]
    flip_rate = np.mean([p.flip for p in draws])
    assert abs(flip_rate - 0.5) < 0.03
    scale = np.array([p.scale for p in draws])
    assert scale.min() >= 0.6 and scale.max() <= 1.4 and abs(scale.mean() - 1.0) < 0.02
    stretch = np.array([p.stretch for p in draws])
    assert stretch.min() >= 0.8 and stretch.max() <= 1.2
    trans = np.array([p.translate for p in draws])
    assert trans.min() >= 0.3 and trans.max() <= 0.7
    assert max(abs(p.rotation) for p in draws) <= 20 and max(abs(p.rotation) for p in draws) > 19
    assert max(max(map(abs, p.shear)) for p in draws) <= 8
    assert max(max(map(abs, p.perspective)) for p in draws) <= 0.001
    # The shipped config has rotation/shear/perspective 0: those stay exact identities.
    p = augment.sample_warp_params(rng, PIPELINE)
    assert p.rotation == 0 and p.shear == (0, 0) and p.perspective == (0, 0)


def test_color_distributions():
    rng = np.random.default_rng(4)
    c = np.stack([augment.sample_color_params(rng, PIPELINE) for _ in range(4000)])
    b, k, s, s_on = c.T
    for applied in (b != 0, k != 1, s_on > 0):
        assert abs(applied.mean() - 0.5) < 0.03
    assert np.abs(b).max() <= 0.2
    assert k.min() >= 0.6 and k.max() <= 1.4
    assert s[s_on > 0].min() >= 0.5 and s[s_on > 0].max() <= 1.2 and np.all(s[s_on == 0] == 1)
    assert c.dtype == np.float32 and c.shape[1] == augment.COLOR_PARAMS


def test_sampling_is_deterministic():
    a = augment.sample_warp_params(np.random.default_rng(7), PIPELINE)
    b = augment.sample_warp_params(np.random.default_rng(7), PIPELINE)
    assert a == b
