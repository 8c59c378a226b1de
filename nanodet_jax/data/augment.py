"""Training augmentation with the distributions of NanoDet's ``Pipeline`` (ShapeTransform +
color_aug_and_norm).

Geometry runs on the host: every random parameter is drawn (each one every time, as
ShapeTransform does), the 3x3 matrices are multiplied in NanoDet's order, the resize
matrix goes last, and one ``cv2.warpPerspective`` produces the uint8 image.

Colour runs on the device: the host only draws a few numbers per image
(:func:`sample_color_params`); :func:`color_augment_and_normalize` applies brightness,
contrast and saturation to the uint8 batch in float32 exactly as NanoDet does on the
host (no clipping; saturation through an HSV round trip that reproduces OpenCV's
float32 ``cvtColor``, out-of-range values included), then normalises.

Sampling is split from building (:func:`sample_warp_params` / :func:`warp_matrix`) so that
parity with the reference can be checked on injected draws (``tools/check_augment.py``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nanodet_jax.data import transforms
from nanodet_jax.data.transforms import minimum_dst_shape, resize_matrix, warp_boxes, warp_image

# Layout of the per-image colour parameters (float32 [COLOR_PARAMS]).
BRIGHTNESS, CONTRAST, SATURATION, SATURATION_ON = range(4)
COLOR_PARAMS = 4
# The draws NanoDet makes per image: 11 for the geometry, 6 for colour (flag + value x 3).
NUM_WARP_DRAWS = 11
NUM_COLOR_DRAWS = 6


@dataclasses.dataclass(frozen=True)
class WarpParams:
    """One draw of ShapeTransform's random parameters, in NanoDet's units."""

    perspective: tuple[float, float] = (0.0, 0.0)  # P[2,0], P[2,1]
    scale: float = 1.0
    stretch: tuple[float, float] = (1.0, 1.0)  # width, height factors
    rotation: float = 0.0  # degrees, cv2.getRotationMatrix2D's sign convention
    shear: tuple[float, float] = (0.0, 0.0)  # degrees (x, y)
    flip: bool = False
    translate: tuple[float, float] = (0.5, 0.5)  # image centre at this fraction of (w, h)


def _pair(v: Any) -> tuple[float, float]:
    a, b = v
    return float(a), float(b)


def warp_params_from_uniforms(u: Sequence[float], cfg: Mapping[str, Any]) -> WarpParams:
    """Map 11 U[0, 1) numbers to ShapeTransform's parameters (``a + (b - a) * u``, as
    Python's ``random.uniform``), in the order NanoDet draws them."""
    if len(u) != NUM_WARP_DRAWS:
        raise ValueError(f"need {NUM_WARP_DRAWS} uniforms, got {len(u)}")
    u = [float(x) for x in u]

    def uni(lo: float, hi: float, x: float) -> float:
        return lo + (hi - lo) * x

    persp = float(cfg.get("perspective", 0.0))
    scale = _pair(cfg.get("scale", (1, 1)))
    stretch = cfg.get("stretch", ((1, 1), (1, 1)))
    rot = float(cfg.get("rotation", 0.0))
    shear = float(cfg.get("shear", 0.0))
    flip = float(cfg.get("flip", 0.0))
    tr = float(cfg.get("translate", 0.0))
    return WarpParams(
        perspective=(uni(-persp, persp, u[0]), uni(-persp, persp, u[1])),
        scale=uni(*scale, u[2]),
        stretch=(uni(*_pair(stretch[0]), u[3]), uni(*_pair(stretch[1]), u[4])),
        rotation=uni(-rot, rot, u[5]),
        shear=(uni(-shear, shear, u[6]), uni(-shear, shear, u[7])),
        flip=u[8] < flip,
        translate=(uni(0.5 - tr, 0.5 + tr, u[9]), uni(0.5 - tr, 0.5 + tr, u[10])),
    )


def sample_warp_params(rng: np.random.Generator, cfg: Mapping[str, Any]) -> WarpParams:
    """Draw ShapeTransform's parameters; ``cfg`` is ``config.data.train.pipeline``."""
    return warp_params_from_uniforms(rng.random(NUM_WARP_DRAWS), cfg)


def output_wh(
    raw_wh: Sequence[int], input_wh: Sequence[int], keep_ratio: bool, divisible: int = 0
) -> tuple[int, int]:
    """Size of the warped image: the input size, or with keep_ratio NanoDet's minimum canvas."""
    if keep_ratio:
        return minimum_dst_shape(raw_wh, input_wh, divisible)
    return int(input_wh[0]), int(input_wh[1])


def warp_matrix(
    params: WarpParams, raw_wh: Sequence[int], dst_wh: Sequence[int], keep_ratio: bool
) -> np.ndarray:
    """ShapeTransform's matrix: Resize @ T @ F @ Sh @ R @ Str @ Scl @ P @ C.

    The product is accumulated left-multiplying one factor at a time from the centring
    matrix, as NanoDet does, so that float64 rounding matches too. ``dst_wh`` is the
    warped image's size (see :func:`output_wh`).
    """
    width, height = raw_wh
    m = np.eye(3)
    m[0, 2], m[1, 2] = -width / 2, -height / 2  # image centre to the origin

    persp = np.eye(3)
    persp[2, 0], persp[2, 1] = params.perspective
    m = persp @ m

    scale = np.eye(3)
    scale[0, 0] *= params.scale
    scale[1, 1] *= params.scale
    m = scale @ m

    stretch = np.eye(3)
    stretch[0, 0] *= params.stretch[0]
    stretch[1, 1] *= params.stretch[1]
    m = stretch @ m

    # cv2.getRotationMatrix2D about the origin with scale 1 (angle in degrees, CCW on screen).
    rad = params.rotation * (math.pi / 180)
    cos, sin = math.cos(rad), math.sin(rad)
    rot = np.eye(3)
    rot[:2, :2] = [[cos, sin], [-sin, cos]]
    m = rot @ m

    shear = np.eye(3)
    shear[0, 1] = math.tan(params.shear[0] * math.pi / 180)
    shear[1, 0] = math.tan(params.shear[1] * math.pi / 180)
    m = shear @ m

    flip = np.eye(3)
    if params.flip:
        flip[0, 0] = -1
    m = flip @ m

    move = np.eye(3)
    move[0, 2] = params.translate[0] * width
    move[1, 2] = params.translate[1] * height
    m = move @ m
    return resize_matrix(raw_wh, dst_wh, keep_ratio) @ m


def shape_transform(
    img: np.ndarray,
    boxes: np.ndarray,
    params: WarpParams,
    input_wh: Sequence[int],
    keep_ratio: bool,
    divisible: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Warp a uint8 BGR image and its xyxy boxes: returns (image, boxes, matrix).

    Boxes are the clipped hull of their warped corners. Like NanoDet we keep boxes that
    end up degenerate (fully outside the image, clipped to zero width/height): the
    label assigner must cope with them, and dropping them would change which samples
    NanoDet trains on.
    """
    h, w = img.shape[:2]
    dst = output_wh((w, h), input_wh, keep_ratio, divisible)
    matrix = warp_matrix(params, (w, h), dst, keep_ratio)
    return warp_image(img, matrix, dst), warp_boxes(boxes, matrix, dst[0], dst[1]), matrix


# ----------------------------------------------------------------------------- colour


def color_params_from_draws(
    brightness: float | None, contrast: float | None, saturation: float | None
) -> np.ndarray:
    """Pack colour draws (None = that step skipped) into the float32 [COLOR_PARAMS] array.

    A skipped brightness/contrast becomes an exact identity (+0, *1). A skipped
    saturation needs its own flag: OpenCV's HSV round trip is not the identity for
    values outside [0, 1] (e.g. after brightness), so NanoDet's skip must skip it.
    """
    out = np.zeros(COLOR_PARAMS, np.float32)
    out[BRIGHTNESS] = 0.0 if brightness is None else brightness
    out[CONTRAST] = 1.0 if contrast is None else contrast
    out[SATURATION] = 1.0 if saturation is None else saturation
    out[SATURATION_ON] = saturation is not None
    return out


def color_ranges(cfg: Mapping[str, Any]) -> list[tuple[float, float] | None]:
    """(low, high) of brightness, contrast, saturation; None where ``cfg`` lacks the step."""
    out: list[tuple[float, float] | None] = []
    for key in ("brightness", "contrast", "saturation"):
        v = cfg.get(key)
        if v is None:
            out.append(None)
        elif key == "brightness":
            out.append((-float(v), float(v)))
        else:
            out.append(_pair(v))
    return out


def color_params_from_uniforms(u: Sequence[float], cfg: Mapping[str, Any]) -> np.ndarray:
    """6 U[0, 1) numbers -> colour params: per step a coin (apply when u >= 0.5, NanoDet's
    ``random.randint(0, 1)``) then a value ``lo + (hi - lo) * u``."""
    if len(u) != NUM_COLOR_DRAWS:
        raise ValueError(f"need {NUM_COLOR_DRAWS} uniforms, got {len(u)}")
    draws: list[float | None] = []
    for i, lo_hi in enumerate(color_ranges(cfg)):
        if lo_hi is None or float(u[2 * i]) < 0.5:
            draws.append(None)
        else:
            draws.append(lo_hi[0] + (lo_hi[1] - lo_hi[0]) * float(u[2 * i + 1]))
    return color_params_from_draws(*draws)


def sample_color_params(rng: np.random.Generator, cfg: Mapping[str, Any]) -> np.ndarray:
    """Draw one image's colour parameters (float32 [COLOR_PARAMS])."""
    return color_params_from_uniforms(rng.random(NUM_COLOR_DRAWS), cfg)


_EPS = np.float32(np.finfo(np.float32).eps)  # OpenCV's FLT_EPSILON


def bgr_to_hsv(x: jax.Array) -> jax.Array:
    """OpenCV's float32 BGR->HSV (H in degrees [0, 360), S = (max-min)/(|max|+eps), V = max).

    Follows the vectorised branch of OpenCV's RGB2HSV_f, which handles every value
    (negative or > 1 too): the hue offset is selected, not computed as ``h < 0 ? +360``.
    """
    b, g, r = x[..., 0], x[..., 1], x[..., 2]
    v = jnp.maximum(jnp.maximum(r, g), b)
    diff = v - jnp.minimum(jnp.minimum(r, g), b)
    s = diff / (jnp.abs(v) + _EPS)
    r_max, g_max = r == v, g == v
    num = jnp.where(r_max, g - b, jnp.where(g_max, b - r, r - g))
    offset = jnp.where(
        r_max,
        jnp.where(g < b, np.float32(360), np.float32(0)),
        jnp.where(g_max, np.float32(120), np.float32(240)),
    )
    h = num * (np.float32(60) / (diff + _EPS)) + offset
    return jnp.stack([h, s, v], axis=-1)


def hsv_to_bgr(x: jax.Array) -> jax.Array:
    """OpenCV's float32 HSV->BGR (H in degrees): the sector is ``trunc(h/60) mod 6``, and
    the channels pick from v, v(1-s), v(1-s f), v(1-s(1-f)) — no clamping of s or v."""
    h, s, v = x[..., 0], x[..., 1], x[..., 2]
    h = h * np.float32(6.0 / 360.0)
    whole = jnp.trunc(h)
    frac = h - whole
    sector = whole - jnp.trunc(whole * np.float32(1.0 / 6.0)) * np.float32(6)
    one = np.float32(1)
    t0, t1 = v, v * (one - s)
    t2, t3 = v * (one - s * frac), v * (one - s * (one - frac))
    # (b,g,r) per sector: 0 t1 t3 t0, 1 t1 t0 t2, 2 t3 t0 t1, 3 t0 t2 t1, 4 t0 t1 t3, 5 t2 t1 t0
    b = jnp.where(sector < 2, t1, jnp.where(sector == 2, t3, jnp.where(sector <= 4, t0, t2)))
    g = jnp.where(sector < 1, t3, jnp.where(sector <= 2, t0, jnp.where(sector == 3, t2, t1)))
    r = jnp.where(
        sector < 1,
        t0,
        jnp.where(sector == 1, t2, jnp.where(sector <= 3, t1, jnp.where(sector == 4, t3, t0))),
    )
    return jnp.stack([b, g, r], axis=-1)


def color_augment_and_normalize(
    images: jax.Array,
    color_params: jax.Array,
    mean: Sequence[float],
    std: Sequence[float],
    valid_hw: jax.Array | None = None,
) -> jax.Array:
    """NanoDet's color_aug_and_norm on a uint8 BGR NHWC batch, in float32 on the device.

    ``x = img/255``; ``x += brightness``; ``x *= contrast``; if flagged, S of HSV
    ``*= saturation``; then ``(x - mean/255) / (std/255)``. Nothing is clipped, as in
    NanoDet. ``valid_hw`` [B, 2] zeroes the padding after normalisation (NanoDet pads
    normalised images with 0).
    """
    p = color_params.astype(jnp.float32)[:, None, None, :]
    x = images.astype(jnp.float32) / np.float32(255)
    x = x + p[..., BRIGHTNESS : BRIGHTNESS + 1]
    x = x * p[..., CONTRAST : CONTRAST + 1]
    hsv = bgr_to_hsv(x)
    hsv = hsv.at[..., 1].multiply(p[..., SATURATION])
    x = jnp.where(p[..., SATURATION_ON : SATURATION_ON + 1] > 0, hsv_to_bgr(hsv), x)
    return transforms.standardize(x, mean, std, valid_hw)
