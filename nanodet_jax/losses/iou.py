"""IoU-family box losses on aligned ``[..., 4]`` (x1, y1, x2, y2) boxes -> ``[...]``.

Each is NanoDet's per-box loss (``nanodet/model/loss/iou_loss.py``) with the defaults
of its loss class, which is what a config reaches: the eps values are the classes'
(``1e-6``), not the bare functions' (``1e-7``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from nanodet_jax.box_ops import bbox_overlaps

GIOU_EPS = 1e-6  # NanoDet's GIoULoss default, passed on to bbox_overlaps
IOU_EPS = 1e-6  # IoULoss: the IoU is clamped from below before the log
DIOU_EPS = 1e-6  # DIoULoss / CIoULoss: added to the union, the diagonal, the heights
BOUNDED_IOU_BETA = 0.2  # BoundedIoULoss: the smooth-L1 knee
BOUNDED_IOU_EPS = 1e-3  # BoundedIoULoss: added to every denominator


def giou_loss(pred: jax.Array, target: jax.Array, eps: float = GIOU_EPS) -> jax.Array:
    """``1 - GIoU`` of aligned boxes ``[..., 4]`` -> ``[...]``."""
    return 1.0 - bbox_overlaps(pred, target, mode="giou", is_aligned=True, eps=eps)


def iou_loss(pred: jax.Array, target: jax.Array, eps: float = IOU_EPS) -> jax.Array:
    """``-log(max(IoU, eps))``; the IoU's union is clamped at bbox_overlaps' own 1e-6."""
    return -jnp.log(jnp.maximum(bbox_overlaps(pred, target, is_aligned=True), eps))


def _iou_and_center_penalty(
    pred: jax.Array, target: jax.Array, eps: float
) -> tuple[jax.Array, jax.Array]:
    """IoU with ``eps`` added to the union, and DIoU's ``rho^2 / c^2`` (centre distance
    over the enclosing box's squared diagonal, ``eps`` added to the latter)."""
    lt = jnp.maximum(pred[..., :2], target[..., :2])
    rb = jnp.minimum(pred[..., 2:], target[..., 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    overlap = wh[..., 0] * wh[..., 1]
    area_p = (pred[..., 2] - pred[..., 0]) * (pred[..., 3] - pred[..., 1])
    area_t = (target[..., 2] - target[..., 0]) * (target[..., 3] - target[..., 1])
    ious = overlap / (area_p + area_t - overlap + eps)
    enclose = jnp.maximum(
        jnp.maximum(pred[..., 2:], target[..., 2:]) - jnp.minimum(pred[..., :2], target[..., :2]),
        0.0,
    )
    c2 = enclose[..., 0] ** 2 + enclose[..., 1] ** 2 + eps
    dx = (target[..., 0] + target[..., 2]) - (pred[..., 0] + pred[..., 2])
    dy = (target[..., 1] + target[..., 3]) - (pred[..., 1] + pred[..., 3])
    rho2 = dx**2 / 4 + dy**2 / 4
    return ious, rho2 / c2


def diou_loss(pred: jax.Array, target: jax.Array, eps: float = DIOU_EPS) -> jax.Array:
    """``1 - DIoU`` = ``1 - IoU + rho^2 / c^2``."""
    ious, penalty = _iou_and_center_penalty(pred, target, eps)
    return 1.0 - (ious - penalty)


def ciou_loss(pred: jax.Array, target: jax.Array, eps: float = DIOU_EPS) -> jax.Array:
    """``1 - CIoU``: DIoU plus the aspect term ``v^2 / (1 - IoU + v)``, with
    ``v = 4 / pi^2 (atan(w_t / h_t) - atan(w_p / h_p))^2`` (``eps`` added to heights).
    The trade-off factor is not detached, as in NanoDet."""
    ious, penalty = _iou_and_center_penalty(pred, target, eps)
    w1, h1 = pred[..., 2] - pred[..., 0], pred[..., 3] - pred[..., 1] + eps
    w2, h2 = target[..., 2] - target[..., 0], target[..., 3] - target[..., 1] + eps
    v = (4 / math.pi**2) * jnp.square(jnp.arctan(w2 / h2) - jnp.arctan(w1 / h1))
    return 1.0 - (ious - (penalty + v**2 / (1 - ious + v)))


def bounded_iou_loss(
    pred: jax.Array,
    target: jax.Array,
    beta: float = BOUNDED_IOU_BETA,
    eps: float = BOUNDED_IOU_EPS,
) -> jax.Array:
    """Bounded IoU loss: smooth-L1 (knee ``beta``) of the four bounded-IoU deficits of
    centre x / y and width / height, summed; the target is a constant."""
    target = jax.lax.stop_gradient(target)
    p_ctr = (pred[..., :2] + pred[..., 2:]) * 0.5
    p_wh = pred[..., 2:] - pred[..., :2]
    t_ctr = (target[..., :2] + target[..., 2:]) * 0.5
    t_wh = target[..., 2:] - target[..., :2]
    d = jnp.abs(t_ctr - p_ctr)
    loss_ctr = 1 - jnp.maximum((t_wh - 2 * d) / (t_wh + 2 * d + eps), 0.0)
    loss_wh = 1 - jnp.minimum(t_wh / (p_wh + eps), p_wh / (t_wh + eps))
    # NanoDet's order: dx, dy, dw, dh (the sum is exact in any order only up to rounding).
    comb = jnp.stack([loss_ctr[..., 0], loss_ctr[..., 1], loss_wh[..., 0], loss_wh[..., 1]], -1)
    smooth = jnp.where(comb < beta, 0.5 * comb * comb / beta, comb - 0.5 * beta)
    return jnp.sum(smooth, axis=-1)
