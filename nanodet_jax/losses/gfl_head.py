"""The training objective of a GFL-style head (NanoDet-Plus's and its AGM's): the
assignment's targets against one head's raw output.

Every sum runs over the whole batch, normalisers included, so under ``jit`` with the
batch sharded over devices they are global sums. Each term is the loss its config
names (``loss_qfl.name`` etc., see ``nanodet_jax.losses``) times its ``loss_weight``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from nanodet_jax.assigners.dynamic_soft_label import Assignment
from nanodet_jax.box_ops import distance2bbox, distribution_to_distance
from nanodet_jax.losses import BOX_LOSSES, CLASSIFICATION_LOSSES, DISTRIBUTION_LOSSES
from nanodet_jax.precision import at_least_f32

LOSS_TERMS = ("loss_qfl", "loss_bbox", "loss_dfl")


def decode_predictions(
    raw: jax.Array, priors: jax.Array, num_classes: int, reg_max: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Split a head output ``[B, P, C + 4 (reg_max + 1)]`` into class logits, distribution
    logits ``[B, P, 4, reg_max + 1]`` and decoded boxes ``[B, P, 4]`` (input pixels)."""
    raw = at_least_f32(raw)
    cls_logits = raw[..., :num_classes]
    reg_logits = raw[..., num_classes:]
    distances = distribution_to_distance(reg_logits, reg_max) * priors[:, 2:3]
    boxes = distance2bbox(priors[:, :2], distances)
    return cls_logits, reg_logits.reshape(*raw.shape[:-1], 4, reg_max + 1), boxes


DEFAULT_NAMES = {
    "loss_qfl": "QualityFocalLoss",
    "loss_dfl": "DistributionFocalLoss",
    "loss_bbox": "GIoULoss",
}
REGISTRIES = {
    "loss_qfl": CLASSIFICATION_LOSSES,
    "loss_dfl": DISTRIBUTION_LOSSES,
    "loss_bbox": BOX_LOSSES,
}


def build_loss_terms(loss_cfg: Any) -> dict[str, tuple[Callable, float]]:
    """Each term's loss function (from its registry, by ``name``) and ``loss_weight``."""
    out = {}
    for term, registry in REGISTRIES.items():
        cfg = loss_cfg[term] if isinstance(loss_cfg, Mapping) else getattr(loss_cfg, term)
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        cfg.setdefault("name", DEFAULT_NAMES[term])
        out[term] = (registry.build(cfg, drop=("loss_weight",)), float(cfg.get("loss_weight", 1.0)))
    return out


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
    terms = build_loss_terms(loss_cfg)
    (qfl_fn, qfl_weight), (dfl_fn, dfl_weight), (bbox_fn, bbox_weight) = (
        terms[k] for k in ("loss_qfl", "loss_dfl", "loss_bbox")
    )
    pos = targets.pos_mask
    num_pos = jnp.sum(pos).astype(cls_logits.dtype)

    qfl = qfl_fn(cls_logits, targets.labels, targets.label_scores)
    loss_qfl = jnp.sum(qfl) / jnp.maximum(num_pos, 1.0)

    # Box terms are weighted by each positive's (detached) best class score, and
    # normalised by the sum of those weights.
    weights = jnp.where(pos, jax.lax.stop_gradient(jnp.max(jax.nn.sigmoid(cls_logits), -1)), 0.0)
    avg = jnp.maximum(jnp.sum(weights), 1.0)
    # Negatives are selected out (not multiplied by 0), so whatever their targets give
    # cannot reach the sums; both terms are exactly 0 when there is no positive, and
    # their gradient is finite (every division in the IoU losses is eps-clamped).
    box_loss = bbox_fn(boxes, targets.bbox_targets)
    loss_bbox = jnp.sum(jnp.where(pos, box_loss * weights, 0.0)) / avg
    dfl = dfl_fn(reg_logits, targets.dist_targets)  # [B, P, 4]
    loss_dfl = jnp.sum(jnp.where(pos[..., None], dfl * weights[..., None], 0.0)) / (4.0 * avg)

    return {
        "loss_qfl": qfl_weight * loss_qfl,
        "loss_bbox": bbox_weight * loss_bbox,
        "loss_dfl": dfl_weight * loss_dfl,
    }
