"""Image geometry and normalisation as NanoDet's data pipeline does them.

Every geometric change of an image is one 3x3 matrix applied with a single
``cv2.warpPerspective`` call, as in NanoDet: that call samples differently from
``cv2.resize`` (enough to move COCO mAP by ~0.002), so we keep it. Boxes go
through the same matrix; detections go back through its inverse.

Images leave the host as uint8 (BGR, HWC); normalisation runs on the device.
Training augmentation (random warp, colour) builds on these in :mod:`nanodet_jax.data.augment`.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np


def resize_matrix(raw_wh: Sequence[int], dst_wh: Sequence[int], keep_ratio: bool) -> np.ndarray:
    """The matrix taking raw image pixels to the network input (NanoDet's get_resize_matrix)."""
    r_w, r_h = raw_wh
    d_w, d_h = dst_wh
    scale = np.eye(3)
    if not keep_ratio:
        scale[0, 0] = d_w / r_w
        scale[1, 1] = d_h / r_h
        return scale
    # Scale to fit, centred: move the image centre to the origin, scale, move to the target centre.
    centre = np.eye(3)
    centre[0, 2], centre[1, 2] = -r_w / 2, -r_h / 2
    ratio = d_h / r_h if r_w / r_h < d_w / d_h else d_w / r_w
    scale[0, 0] = scale[1, 1] = ratio
    back = np.eye(3)
    back[0, 2], back[1, 2] = 0.5 * d_w, 0.5 * d_h
    return back @ scale @ centre


def minimum_dst_shape(
    src_wh: Sequence[int], dst_wh: Sequence[int], divisible: int = 0
) -> tuple[int, int]:
    """With keep_ratio, the smallest canvas (w, h) that holds the scaled image (NanoDet's rule)."""
    src_w, src_h = src_wh
    dst_w, dst_h = dst_wh
    ratio = dst_h / src_h if src_w / src_h < dst_w / dst_h else dst_w / src_w
    w, h = int(ratio * src_w), int(ratio * src_h)
    if divisible and divisible > 0:
        w = max(divisible, int((w + divisible - 1) // divisible * divisible))
        h = max(divisible, int((h + divisible - 1) // divisible * divisible))
    return w, h


def warp_boxes(boxes: np.ndarray, matrix: np.ndarray, width: float, height: float) -> np.ndarray:
    """Map xyxy boxes through ``matrix``: the box around the 4 warped corners, clipped."""
    n = len(boxes)
    if n == 0:
        return np.asarray(boxes, np.float32).reshape(0, 4)
    corners = np.ones((n * 4, 3))
    # Corners (x1,y1), (x2,y2), (x1,y2), (x2,y1) of every box.
    corners[:, :2] = np.asarray(boxes)[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(n * 4, 2)
    warped = corners @ matrix.T
    warped = (warped[:, :2] / warped[:, 2:3]).reshape(n, 8)
    xs, ys = warped[:, [0, 2, 4, 6]], warped[:, [1, 3, 5, 7]]
    out = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], axis=1)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
    return out.astype(np.float32)


def warp_image(img: np.ndarray, matrix: np.ndarray, dst_wh: Sequence[int]) -> np.ndarray:
    """NanoDet's warp: bilinear, constant-zero border."""
    return cv2.warpPerspective(img, matrix, dsize=(int(dst_wh[0]), int(dst_wh[1])))


def resize_for_inference(
    img: np.ndarray, input_wh: Sequence[int], keep_ratio: bool = False
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """The val pipeline's geometry: returns (warped uint8 image, matrix, its (w, h)).

    With keep_ratio the warped image is the minimum canvas that holds the scaled
    image; callers pad it (bottom/right) to the batch canvas.
    """
    h, w = img.shape[:2]
    dst = minimum_dst_shape((w, h), input_wh) if keep_ratio else tuple(input_wh)
    matrix = resize_matrix((w, h), dst, keep_ratio)
    return warp_image(img, matrix, dst), matrix, dst


def canvas_hw(input_wh: Sequence[int], divisible: int = 32) -> tuple[int, int]:
    """The static network input (h, w): the configured (w, h) rounded up to ``divisible``
    (NanoDet pads batches to multiples of 32)."""
    w, h = (int(v) for v in input_wh)
    return -(-h // divisible) * divisible, -(-w // divisible) * divisible


def place_on_canvas(img: np.ndarray, hw: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """Zero-pad (bottom/right) or crop an image to the canvas; returns it and the valid (h, w)."""
    ch, cw = hw
    h, w = min(img.shape[0], ch), min(img.shape[1], cw)
    if img.shape[:2] == (ch, cw):
        return img, (h, w)
    canvas = np.zeros((ch, cw, *img.shape[2:]), img.dtype)
    canvas[:h, :w] = img[:h, :w]
    return canvas, (h, w)


def standardize(
    x: jax.Array,
    mean: Sequence[float],
    std: Sequence[float],
    valid_hw: jax.Array | None = None,
) -> jax.Array:
    """``(x - mean/255) / (std/255)`` for images already scaled to [0, 1] (NanoDet's order).

    ``valid_hw`` [B, 2] marks each image's real extent inside a padded canvas; the
    padding becomes 0 after normalisation, as NanoDet's batch padding.
    """
    mean = np.asarray(mean, np.float32) / np.float32(255)
    std = np.asarray(std, np.float32) / np.float32(255)
    x = (x - mean) / std
    if valid_hw is not None:
        rows = jnp.arange(x.shape[1])[None, :, None] < valid_hw[:, 0, None, None]
        cols = jnp.arange(x.shape[2])[None, None, :] < valid_hw[:, 1, None, None]
        x = jnp.where((rows & cols)[..., None], x, np.float32(0))
    return x


def normalize(
    images: jax.Array,
    mean: Sequence[float],
    std: Sequence[float],
    valid_hw: jax.Array | None = None,
) -> jax.Array:
    """uint8 BGR NHWC -> float32 normalised as NanoDet's val pipeline (see :func:`standardize`)."""
    return standardize(images.astype(jnp.float32) / np.float32(255), mean, std, valid_hw)
