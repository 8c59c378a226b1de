"""The training objective of NanoDet's legacy GFL heads (``GFLHead.loss``, also used by
``NanoDetHead``): ATSS targets on grid cells against one head's raw output.

NanoDet computes the box terms per level in units of that level's stride (cell
centres, predicted and target boxes all divided by it), which matters for the
eps-clamped IoUs; so does this. Normalisers, over the whole batch:

* QFL: every cell, divided by ``sum over images of max(#positives, 1)``;
* box and DFL: positives weighted by their detached best class score, divided by the
  sum of those weights (DFL also by 4, its sides);
* a batch without any positive gives exactly 0 for all three terms (NanoDet returns
  constant zeros then), with zero gradient.

NanoDet's GFLHead always builds GIoULoss for ``loss_bbox``; here the config's name is
honoured (``nanodet_jax.losses.BOX_LOSSES``), which is the same for every legacy config.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nanodet_jax.assigners.atss import ATSSAssignment
from nanodet_jax.box_ops import (
    bbox2distance,
    bbox_overlaps,
    distance2bbox,
    distribution_to_distance,
)
from nanodet_jax.losses.gfl_head import build_loss_terms
from nanodet_jax.precision import at_least_f32


def legacy_gfl_losses(
    raw: jax.Array,
    cells: jax.Array,
    cell_strides: jax.Array,
    targets: ATSSAssignment,
    loss_cfg: Any,
    num_classes: int,
    reg_max: int,
) -> dict[str, jax.Array]:
    """``loss_qfl``, ``loss_bbox``, ``loss_dfl`` (NanoDet's names, loss weights applied).

    Args:
        raw: ``[B, P, C + 4 (reg_max + 1)]`` head output (class logits, then distribution
            logits already multiplied by GFLHead's per-level scale).
        cells: ``[P, 4]`` the grid cells the assignment was made on; cell_strides: ``[P]``.
        targets: the ATSS assignment of the batch.
        loss_cfg: ``model.arch.head.loss`` (names, ``beta``, ``loss_weight`` per term).
    """
    raw = at_least_f32(raw)
    terms = build_loss_terms(loss_cfg)
    (qfl_fn, qfl_w), (dfl_fn, dfl_w), (bbox_fn, bbox_w) = (
        terms[k] for k in ("loss_qfl", "loss_dfl", "loss_bbox")
    )
    cls_logits = raw[..., :num_classes]
    reg_logits = raw[..., num_classes:]
    stride = cell_strides[:, None]
    centers = ((cells[:, :2] + cells[:, 2:]) / 2) / stride  # NanoDet: cell centre / stride
    pred_boxes = distance2bbox(centers, distribution_to_distance(reg_logits, reg_max))
    target_boxes = targets.bbox_targets / stride
    pos = targets.pos_mask

    ious = bbox_overlaps(jax.lax.stop_gradient(pred_boxes), target_boxes, is_aligned=True)
    scores = jnp.where(pos, ious, 0.0)
    num_total = jnp.sum(jnp.maximum(jnp.sum(pos, axis=1), 1)).astype(jnp.float32)
    loss_qfl = jnp.sum(qfl_fn(cls_logits, targets.labels, scores)) / num_total

    weights = jnp.where(pos, jax.lax.stop_gradient(jnp.max(jax.nn.sigmoid(cls_logits), -1)), 0.0)
    avg = jnp.sum(weights)
    any_pos = avg > 0
    safe_avg = jnp.where(any_pos, avg, 1.0)  # keeps the unused branch (and its gradient) finite
    loss_bbox = jnp.sum(jnp.where(pos, bbox_fn(pred_boxes, target_boxes) * weights, 0.0))
    dist_targets = bbox2distance(centers, target_boxes, float(reg_max))
    dist_logits = reg_logits.reshape(*raw.shape[:-1], 4, reg_max + 1)
    dfl = dfl_fn(dist_logits, jnp.where(pos[..., None], dist_targets, 0.0))
    loss_dfl = jnp.sum(jnp.where(pos[..., None], dfl * weights[..., None], 0.0)) / 4.0
    zero = jnp.zeros((), jnp.float32)
    return {
        "loss_qfl": jnp.where(any_pos, qfl_w * loss_qfl, zero),
        "loss_bbox": jnp.where(any_pos, bbox_w * loss_bbox / safe_avg, zero),
        "loss_dfl": jnp.where(any_pos, dfl_w * loss_dfl / safe_avg, zero),
    }
