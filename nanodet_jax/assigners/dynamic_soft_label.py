"""NanoDet-Plus's dynamic soft label assigner (DSLA), batched, jittable, with static shapes.

Ground truth arrives padded to ``M`` boxes per image with a boolean ``gt_mask``; padded
entries are neutralised up front and excluded from every mask, so they can never
influence a result. Each image is assigned independently (``jax.vmap``), so under
``jit`` with the batch sharded over devices no cross-device traffic is needed.

The decisions replicate NanoDet exactly, including its quirks:

* a prior is a *candidate* when its centre lies strictly inside ANY real gt box, and a
  candidate may then be matched to any gt, also one whose box does not contain it; a
  gt that contains no prior centre at all still gets matched (to candidates of other
  gts) as long as the image has at least one candidate;
* cost = sum over classes of ``BCE(logit, soft) * (soft - sigmoid(logit))**2`` with
  ``soft = onehot(gt label) * IoU``, plus ``iou_factor * -log(IoU + 1e-7)``;
* dynamic k per gt = ``max(1, int(sum of the top min(topk, #candidates) IoUs))``; each gt
  takes its k cheapest candidates; a prior taken by several gts goes to the argmin of
  its cost row over ALL real gts (first index on ties), even a gt that did not take it;
* images with no gts or no candidate prior are all background.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from nanodet_jax.box_ops import bbox2distance, bbox_overlaps
from nanodet_jax.precision import at_least_f32

IOU_COST_EPS = 1e-7  # NanoDet's -log(IoU + 1e-7)


class Assignment(NamedTuple):
    """Training targets per prior, all ``[B, P, ...]``; negatives hold the neutral values."""

    labels: jax.Array  # int32, gt class for positives, num_classes (background) otherwise
    label_scores: jax.Array  # float32, IoU(assigned gt, decoded box) for positives, else 0
    bbox_targets: jax.Array  # float32 [..., 4], assigned gt box (x1, y1, x2, y2), else 0
    dist_targets: jax.Array  # float32 [..., 4], gt distances / stride in [0, reg_max - 0.1]
    pos_mask: jax.Array  # bool
    assigned_gt: jax.Array  # int32 index into the padded gt list, -1 for negatives


def bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Elementwise BCE on logits, in PyTorch's form ``(1 - t) * x - log_sigmoid(x)``."""
    return (1.0 - targets) * logits - jax.nn.log_sigmoid(logits)


def _soft_focal_cost(logits: jax.Array, soft: jax.Array) -> jax.Array:
    return bce_with_logits(logits, soft) * jnp.square(soft - jax.nn.sigmoid(logits))


def _class_cost(
    cls_logits: jax.Array, gt_labels: jax.Array, ious: jax.Array, dense: bool
) -> jax.Array:
    """``[P, M]`` classification cost of matching prior p to gt m."""
    num_classes = cls_logits.shape[-1]
    if dense:  # NanoDet's literal [P, M, C] form; memory grows with P * M * C
        soft = jax.nn.one_hot(gt_labels, num_classes, dtype=ious.dtype)[None] * ious[..., None]
        return jnp.sum(_soft_focal_cost(cls_logits[:, None, :], soft), axis=-1)
    # Only the gt's own class has a non-zero soft label, so the sum over the other
    # classes is the all-zero-label sum minus that class's zero-label term: [P, C] + [P, M]
    # work instead of [P, M, C] (80 classes x 100 gts x 2000+ priors per image otherwise).
    zero_cost = _soft_focal_cost(cls_logits, jnp.zeros_like(cls_logits))
    own_logit = jnp.take(cls_logits, gt_labels, axis=1)
    own_zero = jnp.take(zero_cost, gt_labels, axis=1)
    own_soft = _soft_focal_cost(own_logit, ious)
    return (jnp.sum(zero_cost, axis=1, keepdims=True) - own_zero) + own_soft


def _sequential_sum(values: jax.Array) -> jax.Array:
    """Sum over the last axis strictly left to right.

    The dynamic k truncates this sum to an integer, so its rounding decides assignments
    at integer boundaries; PyTorch accumulates the (descending) top-k IoUs in order, a
    tree reduction could round differently.
    """
    total = values[..., 0]
    for i in range(1, values.shape[-1]):
        total = total + values[..., i]
    return total


def small_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k`` for small ``k`` by repeated argmax (same values, ties to the lower index).

    XLA:CPU lowers ``top_k`` to a full sort (65 ms per training step here); ``k`` masked
    argmax passes over the [M, P] matrix cost a few milliseconds.
    """
    positions = jnp.arange(x.shape[-1])
    values, indices = [], []
    for _ in range(k):
        i = jnp.argmax(x, axis=-1)
        values.append(jnp.take_along_axis(x, i[..., None], axis=-1)[..., 0])
        indices.append(i)
        x = jnp.where(positions == i[..., None], -jnp.inf, x)
    return jnp.stack(values, axis=-1), jnp.stack(indices, axis=-1).astype(jnp.int32)


def _assign_image(
    cls_logits: jax.Array,
    priors: jax.Array,
    decoded_boxes: jax.Array,
    gt_boxes: jax.Array,
    gt_labels: jax.Array,
    gt_mask: jax.Array,
    *,
    num_classes: int,
    reg_max: int,
    topk: int,
    iou_factor: float,
    dense_class_cost: bool,
) -> Assignment:
    num_priors, num_gts = priors.shape[0], gt_boxes.shape[0]
    # Neutral values for padding, so garbage (even NaN) in padded rows cannot leak
    # through arithmetic that a mask later discards.
    gt_boxes = at_least_f32(jnp.where(gt_mask[:, None], gt_boxes, 0.0))
    gt_labels = jnp.where(gt_mask, gt_labels, 0).astype(jnp.int32)

    centers = priors[:, :2]
    deltas = jnp.concatenate(
        [centers[:, None, :] - gt_boxes[None, :, :2], gt_boxes[None, :, 2:] - centers[:, None, :]],
        axis=-1,
    )
    inside = (jnp.min(deltas, axis=-1) > 0) & gt_mask[None, :]
    candidate = jnp.any(inside, axis=1)  # [P]
    pair = candidate[:, None] & gt_mask[None, :]  # [P, M] entries of NanoDet's cost matrix

    ious = bbox_overlaps(decoded_boxes, gt_boxes)  # [P, M]
    cost = _class_cost(cls_logits, gt_labels, ious, dense_class_cost) + iou_factor * (
        -jnp.log(ious + IOU_COST_EPS)
    )
    cost = jnp.where(pair, cost, jnp.inf)

    # Dynamic k. Non-candidates get IoU 0: when there are fewer than topk candidates the
    # static top-k then adds exact zeros after the candidates' own (sorted) IoUs.
    width = min(topk, num_priors)
    top_ious, _ = small_top_k(jnp.where(pair, ious, 0.0).T, width)  # [M, width], descending
    dynamic_k = jnp.maximum(_sequential_sum(top_ious).astype(jnp.int32), 1)  # trunc, as int()
    dynamic_k = jnp.where(gt_mask, dynamic_k, 0)

    # Each gt takes its dynamic_k cheapest candidates; dynamic_k <= min(topk, #candidates)
    # because every IoU is <= 1, so a static top-k of width topk always covers them.
    _, cheapest = small_top_k(-cost.T, width)  # [M, width] prior indices
    take = jnp.arange(width)[None, :] < dynamic_k[:, None]
    gt_index = jnp.broadcast_to(jnp.arange(num_gts)[:, None], cheapest.shape)
    matching = jnp.zeros((num_priors, num_gts), bool).at[cheapest, gt_index].set(take)
    matching &= pair

    num_matches = jnp.sum(matching, axis=1)
    assigned = jnp.where(
        num_matches > 1,
        jnp.argmin(cost, axis=1),  # over all real gts; padded columns are +inf
        jnp.argmax(matching, axis=1),
    ).astype(jnp.int32)
    pos = num_matches > 0

    assigned_boxes = gt_boxes[assigned]
    label_scores = jnp.take_along_axis(ious, assigned[:, None], axis=1)[:, 0]
    dist = bbox2distance(centers, assigned_boxes) / priors[:, 2:3]
    dist = jnp.clip(dist, 0.0, reg_max - 0.1)
    return Assignment(
        labels=jnp.where(pos, gt_labels[assigned], num_classes).astype(jnp.int32),
        label_scores=jnp.where(pos, label_scores, 0.0),
        bbox_targets=jnp.where(pos[:, None], assigned_boxes, 0.0),
        dist_targets=jnp.where(pos[:, None], dist, 0.0),
        pos_mask=pos,
        assigned_gt=jnp.where(pos, assigned, -1).astype(jnp.int32),
    )


def assign(
    cls_logits: jax.Array,
    priors: jax.Array,
    decoded_boxes: jax.Array,
    gt_boxes: jax.Array,
    gt_labels: jax.Array,
    gt_mask: jax.Array,
    num_classes: int,
    reg_max: int,
    topk: int = 13,
    iou_factor: float = 3.0,
    dense_class_cost: bool = False,
) -> Assignment:
    """Dynamic soft label assignment of a batch.

    Args:
        cls_logits: ``[B, P, C]`` class logits (the predictions the cost is built on;
            NanoDet-Plus uses the aux head's, detached).
        priors: ``[P, 4]`` center priors ``(x, y, stride, stride)``.
        decoded_boxes: ``[B, P, 4]`` predicted boxes ``(x1, y1, x2, y2)``.
        gt_boxes: ``[B, M, 4]``, gt_labels: ``[B, M]`` int, gt_mask: ``[B, M]`` bool;
            ground truth padded to ``M`` per image, ``gt_mask`` marks real boxes.
        num_classes, reg_max: the head's; ``num_classes`` is the background label.
        topk, iou_factor: NanoDet's assigner settings (13, 3.0 by default).
        dense_class_cost: build the class cost as NanoDet does, over ``[P, M, C]``;
            the default factorised form needs ``[P, M]`` memory and gives the same
            cost up to float32 rounding.

    No gradient flows through the result (NanoDet assigns under ``torch.no_grad``): the
    IoU targets are constants of the losses.
    """
    if cls_logits.shape[-1] != num_classes:
        raise ValueError(f"cls_logits has {cls_logits.shape[-1]} classes, expected {num_classes}")
    fn = jax.vmap(
        lambda c, d, b, lab, m: _assign_image(
            c,
            priors,
            d,
            b,
            lab,
            m,
            num_classes=num_classes,
            reg_max=reg_max,
            topk=topk,
            iou_factor=iou_factor,
            dense_class_cost=dense_class_cost,
        )
    )
    return fn(
        lax.stop_gradient(at_least_f32(cls_logits)),
        lax.stop_gradient(at_least_f32(decoded_boxes)),
        lax.stop_gradient(gt_boxes),
        gt_labels,
        gt_mask.astype(bool),
    )
