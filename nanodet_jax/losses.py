"""NanoDet-Plus's training losses (GFL: quality focal, distribution focal, GIoU), in float32.

Every sum runs over the whole batch, normalisers included, so under ``jit`` with the
batch sharded over devices they are global sums. The assignment comes from the aux
head's detached predictions (the Assign Guidance Module) and is shared by both heads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nanodet_jax.assigner import Assignment, assign, bce_with_logits
from nanodet_jax.box_ops import bbox_overlaps, distance2bbox, distribution_to_distance

GIOU_EPS = 1e-6  # NanoDet's GIoULoss default, passed on to bbox_overlaps
LOSS_TERMS = ("loss_qfl", "loss_bbox", "loss_dfl")


def _pow(x: jax.Array, beta: float) -> jax.Array:
    return jnp.square(x) if beta == 2.0 else x**beta


def quality_focal_loss(
    cls_logits: jax.Array, labels: jax.Array, scores: jax.Array, beta: float = 2.0
) -> jax.Array:
    """Per-prior QFL summed over classes: ``[..., C]`` logits -> ``[...]``.

    Every class is pushed towards 0 with weight ``sigmoid**beta``; a positive's own class
    (``labels < C``) towards its IoU ``score`` with weight ``|score - sigmoid|**beta``.
    """
    num_classes = cls_logits.shape[-1]
    sig = jax.nn.sigmoid(cls_logits)
    negative = bce_with_logits(cls_logits, jnp.zeros_like(cls_logits)) * _pow(sig, beta)
    target = scores[..., None]
    positive = bce_with_logits(cls_logits, target) * _pow(jnp.abs(target - sig), beta)
    own_class = labels[..., None] == jnp.arange(num_classes)  # all False for background
    return jnp.sum(jnp.where(own_class, positive, negative), axis=-1)


def distribution_focal_loss(reg_logits: jax.Array, targets: jax.Array) -> jax.Array:
    """DFL: ``[..., reg_max + 1]`` logits, ``[...]`` targets in ``[0, reg_max)`` -> ``[...]``.

    Cross-entropy to the two integer bins around the target, each weighted by the
    target's distance to the other bin.
    """
    left = targets.astype(jnp.int32)  # truncation == floor: targets are >= 0
    right = left + 1
    weight_left = right.astype(jnp.float32) - targets
    weight_right = targets - left.astype(jnp.float32)
    log_probs = jax.nn.log_softmax(reg_logits, axis=-1)
    ce_left = -jnp.take_along_axis(log_probs, left[..., None], axis=-1)[..., 0]
    ce_right = -jnp.take_along_axis(log_probs, right[..., None], axis=-1)[..., 0]
    return ce_left * weight_left + ce_right * weight_right


def giou_loss(pred: jax.Array, target: jax.Array, eps: float = GIOU_EPS) -> jax.Array:
    """``1 - GIoU`` of aligned boxes ``[..., 4]`` -> ``[...]``."""
    return 1.0 - bbox_overlaps(pred, target, mode="giou", is_aligned=True, eps=eps)


def decode_predictions(
    raw: jax.Array, priors: jax.Array, num_classes: int, reg_max: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Split a head output ``[B, P, C + 4 (reg_max + 1)]`` into class logits, distribution
    logits ``[B, P, 4, reg_max + 1]`` and decoded boxes ``[B, P, 4]`` (input pixels)."""
    raw = raw.astype(jnp.float32)
    cls_logits = raw[..., :num_classes]
    reg_logits = raw[..., num_classes:]
    distances = distribution_to_distance(reg_logits, reg_max) * priors[:, 2:3]
    boxes = distance2bbox(priors[:, :2], distances)
    return cls_logits, reg_logits.reshape(*raw.shape[:-1], 4, reg_max + 1), boxes


def _cfg(cfg: Any, *keys: str) -> Any:
    for key in keys:
        cfg = cfg[key] if isinstance(cfg, Mapping) else getattr(cfg, key)
    return cfg


def head_losses(
    raw: jax.Array,
    priors: jax.Array,
    targets: Assignment,
    loss_cfg: Any,
    num_classes: int,
    reg_max: int,
) -> dict[str, jax.Array]:
    """NanoDet's ``_get_loss_from_assign`` for one head: ``loss_qfl``, ``loss_bbox``, ``loss_dfl``.

    ``loss_cfg`` is ``config.model.arch.head.loss`` (``loss_qfl.beta`` and each term's
    ``loss_weight``); mappings and attribute-style configs both work.
    """
    cls_logits, reg_logits, boxes = decode_predictions(raw, priors, num_classes, reg_max)
    pos = targets.pos_mask
    num_pos = jnp.sum(pos).astype(jnp.float32)

    qfl = quality_focal_loss(
        cls_logits, targets.labels, targets.label_scores, float(_cfg(loss_cfg, "loss_qfl", "beta"))
    )
    loss_qfl = jnp.sum(qfl) / jnp.maximum(num_pos, 1.0)

    # Box terms are weighted by each positive's (detached) best class score, and
    # normalised by the sum of those weights.
    weights = jnp.where(pos, jax.lax.stop_gradient(jnp.max(jax.nn.sigmoid(cls_logits), -1)), 0.0)
    avg = jnp.maximum(jnp.sum(weights), 1.0)
    # Negatives are selected out (not multiplied by 0), so whatever their targets give
    # cannot reach the sums; both terms are exactly 0 when there is no positive, and
    # their gradient is finite (every division in GIoU is eps-clamped).
    giou = giou_loss(boxes, targets.bbox_targets)
    loss_bbox = jnp.sum(jnp.where(pos, giou * weights, 0.0)) / avg
    dfl = distribution_focal_loss(reg_logits, targets.dist_targets)  # [B, P, 4]
    loss_dfl = jnp.sum(jnp.where(pos[..., None], dfl * weights[..., None], 0.0)) / (4.0 * avg)

    return {
        "loss_qfl": float(_cfg(loss_cfg, "loss_qfl", "loss_weight")) * loss_qfl,
        "loss_bbox": float(_cfg(loss_cfg, "loss_bbox", "loss_weight")) * loss_bbox,
        "loss_dfl": float(_cfg(loss_cfg, "loss_dfl", "loss_weight")) * loss_dfl,
    }


def assign_from_aux(
    aux_out: jax.Array,
    gt_boxes: jax.Array,
    gt_labels: jax.Array,
    gt_mask: jax.Array,
    priors: jax.Array,
    num_classes: int,
    reg_max: int,
    topk: int = 13,
    iou_factor: float = 3.0,
) -> Assignment:
    """The assignment NanoDet-Plus trains both heads with: the aux head's detached
    class logits and decoded boxes against the ground truth."""
    aux_cls, _, aux_boxes = decode_predictions(
        jax.lax.stop_gradient(aux_out), priors, num_classes, reg_max
    )
    return assign(
        aux_cls,
        priors,
        aux_boxes,
        gt_boxes,
        gt_labels,
        gt_mask,
        num_classes,
        reg_max,
        topk,
        iou_factor,
    )


def nanodet_plus_loss(
    head_out: jax.Array,
    aux_out: jax.Array,
    gt_boxes: jax.Array,
    gt_labels: jax.Array,
    gt_mask: jax.Array,
    priors: jax.Array | np.ndarray,
    loss_cfg: Any,
    num_classes: int,
    reg_max: int,
    topk: int = 13,
    iou_factor: float = 3.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total NanoDet-Plus loss and its terms (NanoDet's ``loss_states`` names).

    ``head_out``/``aux_out`` are the raw outputs of ``model.forward_train``; ground truth
    is padded to ``M`` boxes per image (``gt_mask`` marks real ones). Returns
    ``(total, terms)`` with terms ``loss_qfl, loss_bbox, loss_dfl`` and their ``aux_``
    versions; total = main-head terms + aux-head terms.
    """
    priors = jnp.asarray(priors, jnp.float32)
    targets = assign_from_aux(
        aux_out, gt_boxes, gt_labels, gt_mask, priors, num_classes, reg_max, topk, iou_factor
    )
    main = head_losses(head_out, priors, targets, loss_cfg, num_classes, reg_max)
    aux = head_losses(aux_out, priors, targets, loss_cfg, num_classes, reg_max)
    terms = {**main, **{f"aux_{k}": v for k, v in aux.items()}}
    total = sum(main[k] for k in LOSS_TERMS) + sum(aux[k] for k in LOSS_TERMS)
    return total, terms
