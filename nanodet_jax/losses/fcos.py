"""FCOS's objective as torchvision's ``FCOSHead.compute_loss`` computes it, batched.

Terms (torchvision's dict keys), each a sum over the whole batch divided by
``max(1, positives in the batch)``:

* ``classification``: sigmoid focal loss (alpha 0.25, gamma 2) over every anchor and
  class, targets one-hot at the matched gt's class (background rows all zero);
* ``bbox_regression``: GIoU loss on positives between the decoded regression
  (``BoxLinearCoder(normalize_by_size=True)``: distances times the anchor size from the
  anchor centre) and the matched gt;
* ``bbox_ctrness``: BCE-with-logits on positives of the centerness logit against
  ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`` of the matched gt's distances.

The sums run over the batch axis inside the step, so under a sharded batch the positive
count is the global one, as torchvision's single-process count is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nanodet_jax.assigners.dynamic_soft_label import bce_with_logits

LOSS_TERMS = ("classification", "bbox_regression", "bbox_ctrness")
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0  # torchvision's sigmoid_focal_loss defaults
GIOU_EPS = 1e-7  # torchvision's generalized_box_iou_loss default
# Stands in for the boxes of background anchors, whose GIoU is masked out: a valid box
# keeps NaNs out of the masked lanes (a NaN there would still poison the gradient).
_SAFE_BOX = np.asarray([0.0, 0.0, 1.0, 1.0], np.float32)


def sigmoid_focal_loss(
    logits: jax.Array, targets: jax.Array, alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA
) -> jax.Array:
    """torchvision's ``sigmoid_focal_loss`` without reduction."""
    p = jax.nn.sigmoid(logits)
    ce = bce_with_logits(logits, targets)
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def generalized_box_iou_loss(
    boxes1: jax.Array, boxes2: jax.Array, eps: float = GIOU_EPS
) -> jax.Array:
    """torchvision's ``generalized_box_iou_loss`` without reduction: ``eps`` is added to
    the union and to the enclosing area (NanoDet's GIoU clamps them instead)."""
    x1, y1, x2, y2 = (boxes1[..., k] for k in range(4))
    x1g, y1g, x2g, y2g = (boxes2[..., k] for k in range(4))
    iw = jnp.minimum(x2, x2g) - jnp.maximum(x1, x1g)
    ih = jnp.minimum(y2, y2g) - jnp.maximum(y1, y1g)
    inter = jnp.where((iw > 0) & (ih > 0), iw * ih, 0.0)
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    iou = inter / (union + eps)
    enclose = (jnp.maximum(x2, x2g) - jnp.minimum(x1, x1g)) * (
        jnp.maximum(y2, y2g) - jnp.minimum(y1, y1g)
    )
    return 1 - (iou - (enclose - union) / (enclose + eps))


def fcos_losses(
    raw: dict[str, jax.Array],
    points: jax.Array,
    sizes: jax.Array,
    matched: jax.Array,
    gt_boxes: jax.Array,
    gt_classes: jax.Array,
) -> dict[str, jax.Array]:
    """The three terms from the head outputs (``cls_logits [B, N, C]``, ``bbox_regression
    [B, N, 4]``, ``bbox_ctrness [B, N, 1]``), the anchors (``points [N, 2]``, ``sizes
    [N]``), the matched gt index ``[B, N]`` (-1 = background), the padded gt boxes
    ``[B, M, 4]`` and their classes as logit indices ``[B, M]``."""
    logits = raw["cls_logits"]
    positive = matched >= 0
    take = jnp.maximum(matched, 0)
    boxes = jnp.take_along_axis(gt_boxes, take[..., None], axis=1)  # [B, N, 4]
    classes = jnp.take_along_axis(gt_classes, take, axis=1)
    onehot = jax.nn.one_hot(classes, logits.shape[-1], dtype=logits.dtype)
    onehot = onehot * positive[..., None].astype(logits.dtype)
    num_pos = jnp.maximum(jnp.sum(positive.astype(jnp.float32)), 1.0)
    loss_cls = jnp.sum(sigmoid_focal_loss(logits, onehot))

    size = sizes[None, :, None]
    centre = jnp.concatenate([points, points], -1)[None]  # (x, y, x, y)
    sign = np.asarray([-1.0, -1.0, 1.0, 1.0], np.float32)
    pred = centre + sign * (raw["bbox_regression"] * size)
    mask = positive[..., None]
    giou = generalized_box_iou_loss(
        jnp.where(mask, pred, _SAFE_BOX), jnp.where(mask, boxes, _SAFE_BOX)
    )
    loss_box = jnp.sum(jnp.where(positive, giou, 0.0))

    # BoxLinearCoder.encode: (l, t, r, b) over the anchor size; the ratios do not depend
    # on the scaling, but the rounding does, so it is kept.
    ltrb = sign * (jnp.where(mask, boxes, _SAFE_BOX) - centre) / size
    lr, tb = ltrb[..., 0::2], ltrb[..., 1::2]
    ratio = (jnp.min(lr, -1) / jnp.max(lr, -1)) * (jnp.min(tb, -1) / jnp.max(tb, -1))
    target = jnp.where(positive, jnp.sqrt(jnp.where(positive, ratio, 1.0)), 0.0)
    bce = bce_with_logits(raw["bbox_ctrness"][..., 0], target)
    loss_ctr = jnp.sum(jnp.where(positive, bce, 0.0))
    return {
        "classification": loss_cls / num_pos,
        "bbox_regression": loss_box / num_pos,
        "bbox_ctrness": loss_ctr / num_pos,
    }
