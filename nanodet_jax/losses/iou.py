"""IoU-family box losses on aligned ``[..., 4]`` (x1, y1, x2, y2) boxes -> ``[...]``."""

from __future__ import annotations

import jax

from nanodet_jax.box_ops import bbox_overlaps

GIOU_EPS = 1e-6  # NanoDet's GIoULoss default, passed on to bbox_overlaps


def giou_loss(pred: jax.Array, target: jax.Array, eps: float = GIOU_EPS) -> jax.Array:
    """``1 - GIoU`` of aligned boxes ``[..., 4]`` -> ``[...]``."""
    return 1.0 - bbox_overlaps(pred, target, mode="giou", is_aligned=True, eps=eps)
