"""Box geometry shared by decoding, post-processing, the label assigner and the losses.

Boxes are ``(x1, y1, x2, y2)`` in input-image pixels. Every array function is pure
``jax.numpy``, jittable and works over arbitrary leading batch dimensions; only
:func:`center_priors` is NumPy, because prior positions depend on static shapes only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_STRIDES: tuple[int, ...] = (8, 16, 32, 64)


def level_sizes(input_hw: tuple[int, int], strides: Sequence[int]) -> list[tuple[int, int]]:
    """Feature map ``(h, w)`` per stride: ``ceil(H / s)``, ``ceil(W / s)``.

    NanoDet computes the width as ``ceil(W) / s`` (a float) and passes it to
    ``torch.arange``, which yields ``ceil(W / s)`` elements for integer ``W``: the same
    count as the height rule.
    """
    height, width = (int(v) for v in input_hw)
    return [(math.ceil(height / s), math.ceil(width / s)) for s in strides]


def center_priors(
    input_hw: tuple[int, int], strides: Sequence[int] = DEFAULT_STRIDES
) -> np.ndarray:
    """NanoDet-Plus center priors ``[P, 4]`` = ``(x, y, stride, stride)``, float32.

    The prior of cell ``(i, j)`` sits at the cell's top-left corner ``(j * s, i * s)``
    (no half-cell offset), levels are concatenated in ``strides`` order and each level
    is row-major (y outer), matching the order of the flattened head output.
    """
    per_level = []
    for (h, w), s in zip(level_sizes(input_hw, strides), strides):
        ys, xs = np.meshgrid(
            np.arange(h, dtype=np.float32) * s, np.arange(w, dtype=np.float32) * s, indexing="ij"
        )
        stride = np.full(h * w, s, dtype=np.float32)
        per_level.append(np.stack([xs.reshape(-1), ys.reshape(-1), stride, stride], axis=-1))
    return np.concatenate(per_level, axis=0).astype(np.float32)


def distribution_to_distance(reg_logits: jax.Array, reg_max: int) -> jax.Array:
    """Expected distance per side from General-Distribution logits (NanoDet's ``Integral``).

    ``reg_logits [..., 4 * (reg_max + 1)]`` -> ``[..., 4]`` in units of the stride.
    """
    bins = reg_max + 1
    if reg_logits.shape[-1] != 4 * bins:
        raise ValueError(f"expected last dim {4 * bins}, got {reg_logits.shape[-1]}")
    logits = reg_logits.reshape(*reg_logits.shape[:-1], 4, bins)
    probs = jax.nn.softmax(logits, axis=-1)
    # Multiply-and-sum rather than a matmul: a dot may run in reduced precision (TF32)
    # on GPUs, and this reduction is tiny anyway.
    project = jnp.arange(bins, dtype=probs.dtype)
    return jnp.sum(probs * project, axis=-1)


def distance2bbox(
    points: jax.Array, distance: jax.Array, max_shape: tuple[int, int] | None = None
) -> jax.Array:
    """``(left, top, right, bottom)`` distances from ``points [..., 2]`` -> boxes ``[..., 4]``.

    With ``max_shape = (H, W)`` the x coordinates are clamped to ``[0, W]`` and the
    y coordinates to ``[0, H]``.
    """
    x1 = points[..., 0] - distance[..., 0]
    y1 = points[..., 1] - distance[..., 1]
    x2 = points[..., 0] + distance[..., 2]
    y2 = points[..., 1] + distance[..., 3]
    if max_shape is not None:
        height, width = max_shape
        x1 = jnp.clip(x1, 0, width)
        y1 = jnp.clip(y1, 0, height)
        x2 = jnp.clip(x2, 0, width)
        y2 = jnp.clip(y2, 0, height)
    return jnp.stack([x1, y1, x2, y2], axis=-1)


def bbox2distance(
    points: jax.Array, bbox: jax.Array, max_dis: float | None = None, eps: float = 0.1
) -> jax.Array:
    """Inverse of :func:`distance2bbox`: ``(left, top, right, bottom)`` ``[..., 4]``.

    With ``max_dis`` every distance is clamped to ``[0, max_dis - eps]`` so that a
    target never lands on the last distribution bin's upper edge.
    """
    left = points[..., 0] - bbox[..., 0]
    top = points[..., 1] - bbox[..., 1]
    right = bbox[..., 2] - points[..., 0]
    bottom = bbox[..., 3] - points[..., 1]
    dist = jnp.stack([left, top, right, bottom], axis=-1)
    if max_dis is not None:
        dist = jnp.clip(dist, 0, max_dis - eps)
    return dist


def bbox_overlaps(
    bboxes1: jax.Array,
    bboxes2: jax.Array,
    mode: str = "iou",
    is_aligned: bool = False,
    eps: float = 1e-6,
) -> jax.Array:
    """IoU / IoF / GIoU between ``bboxes1 [..., m, 4]`` and ``bboxes2 [..., n, 4]``.

    Returns ``[..., m, n]``, or ``[..., m]`` for ``is_aligned=True`` (then ``m == n``).
    The union (IoF: the area of ``bboxes1``) and the GIoU enclosing area are clamped
    from below at ``eps``, as NanoDet does, so empty boxes give 0 rather than NaN.
    """
    if mode not in ("iou", "iof", "giou"):
        raise ValueError(f"unsupported mode {mode!r}")
    if is_aligned and bboxes1.shape[-2] != bboxes2.shape[-2]:
        raise ValueError("is_aligned needs the same number of boxes on both sides")

    area1 = (bboxes1[..., 2] - bboxes1[..., 0]) * (bboxes1[..., 3] - bboxes1[..., 1])
    area2 = (bboxes2[..., 2] - bboxes2[..., 0]) * (bboxes2[..., 3] - bboxes2[..., 1])
    if is_aligned:
        b1, b2, a1, a2 = bboxes1, bboxes2, area1, area2
    else:  # broadcast to [..., m, n, 4] / [..., m, n]
        b1, b2 = bboxes1[..., :, None, :], bboxes2[..., None, :, :]
        a1, a2 = area1[..., :, None], area2[..., None, :]

    lt = jnp.maximum(b1[..., :2], b2[..., :2])
    rb = jnp.minimum(b1[..., 2:], b2[..., 2:])
    wh = jnp.maximum(rb - lt, 0)
    overlap = wh[..., 0] * wh[..., 1]
    union = a1 + a2 - overlap if mode in ("iou", "giou") else jnp.broadcast_to(a1, overlap.shape)
    union = jnp.maximum(union, eps)
    ious = overlap / union
    if mode != "giou":
        return ious

    enclosed_wh = jnp.maximum(
        jnp.maximum(b1[..., 2:], b2[..., 2:]) - jnp.minimum(b1[..., :2], b2[..., :2]), 0
    )
    enclose_area = jnp.maximum(enclosed_wh[..., 0] * enclosed_wh[..., 1], eps)
    return ious - (enclose_area - union) / enclose_area
