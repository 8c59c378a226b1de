"""ATSS (adaptive training sample selection), as NanoDet's legacy GFL heads use it:
batched, jittable, with static shapes.

NanoDet's ``GFLHead`` assigns on *grid cells*: per feature-map cell a square of side
``octave_base_scale * stride`` centred on the cell centre ``((j + 0.5) s, (i + 0.5) s)``,
levels concatenated in stride order, row-major inside a level (:func:`grid_cells`).

Per image and gt (padded gts are neutralised and masked out of every decision):

1. on each level the ``min(topk, cells on the level)`` cells whose centres are closest
   (Euclidean) to the gt centre are candidates;
2. threshold = mean + unbiased std of the candidates' IoUs (anchor box vs gt);
3. a candidate is positive for the gt when its IoU >= threshold and its centre lies
   more than 0.01 inside the gt on all four sides;
4. a cell positive for several gts goes to the one with the highest IoU (the first on
   ties, as ``torch.max`` picks).

One difference is deliberate: when distances tie at the k-th place of a level, the
lower cell index is taken. PyTorch's ``topk`` leaves that choice to ``std::nth_element``
(no stable order; it depends on the whole column), so no tie rule reproduces it in
general; every other tie (equal IoUs, duplicate gts, the threshold) matches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nanodet_jax.assigners.dynamic_soft_label import small_top_k
from nanodet_jax.box_ops import bbox_overlaps, level_sizes

NOT_POSITIVE = -1e8  # NanoDet's -INF for (cell, gt) pairs that are not positive
INSIDE_MARGIN = 0.01  # a positive's centre must be this far inside the gt


class ATSSAssignment(NamedTuple):
    """Per cell ``[B, P]``: negatives hold ``labels == num_classes`` and ``assigned_gt == -1``."""

    labels: jax.Array  # int32
    bbox_targets: jax.Array  # float32 [..., 4], the assigned gt box, 0 for negatives
    pos_mask: jax.Array  # bool
    assigned_gt: jax.Array  # int32 index into the padded gt list


def cell_centers(input_hw: tuple[int, int], strides: Sequence[int]) -> np.ndarray:
    """``[P, 4]`` = ``(x, y, stride, stride)`` at cell centres ``((j + 0.5) s, (i + 0.5) s)``
    (GFLHead's decode and loss priors), levels in ``strides`` order, row-major."""
    per_level = []
    for (h, w), s in zip(level_sizes(input_hw, strides), strides):
        ys, xs = np.meshgrid(
            (np.arange(h, dtype=np.float32) + 0.5) * np.float32(s),
            (np.arange(w, dtype=np.float32) + 0.5) * np.float32(s),
            indexing="ij",
        )
        stride = np.full(h * w, s, dtype=np.float32)
        per_level.append(np.stack([xs.reshape(-1), ys.reshape(-1), stride, stride], axis=-1))
    return np.concatenate(per_level, axis=0).astype(np.float32)


def grid_cells(
    input_hw: tuple[int, int], strides: Sequence[int], octave_base_scale: float
) -> tuple[np.ndarray, tuple[int, ...]]:
    """GFLHead's grid-cell anchors ``[P, 4]`` (x1, y1, x2, y2) and the cells per level."""
    centers = cell_centers(input_hw, strides)
    half = np.float32(0.5) * (centers[:, 2:3] * np.float32(octave_base_scale))
    boxes = np.concatenate([centers[:, :2] - half, centers[:, :2] + half], axis=-1)
    counts = tuple(h * w for h, w in level_sizes(input_hw, strides))
    return boxes.astype(np.float32), counts


def _sequential_sum(values: jax.Array) -> jax.Array:
    # Left to right over the last axis: the threshold decides positives by ">=", so
    # the sum's rounding should not depend on a tree reduction's shape.
    total = values[..., 0]
    for i in range(1, values.shape[-1]):
        total = total + values[..., i]
    return total


def _assign_image(
    anchors: jax.Array,
    gt_boxes: jax.Array,
    gt_labels: jax.Array,
    gt_mask: jax.Array,
    *,
    level_counts: tuple[int, ...],
    topk: int,
    num_classes: int,
) -> ATSSAssignment:
    num_gts = gt_boxes.shape[0]
    gt_boxes = jnp.where(gt_mask[:, None], gt_boxes, 0.0).astype(jnp.float32)
    gt_labels = jnp.where(gt_mask, gt_labels, 0).astype(jnp.int32)

    overlaps = bbox_overlaps(anchors, gt_boxes)  # [P, M]
    gt_centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2.0
    cell_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2.0
    diff = cell_ctr[:, None, :] - gt_centers[None, :, :]
    distances = jnp.sqrt(jnp.sum(jnp.square(diff), axis=-1))  # [P, M]

    # Candidates per gt, level by level: [M, K] cell indices, K = sum of per-level k.
    candidates, start = [], 0
    for count in level_counts:
        k = min(topk, count)
        _, idx = small_top_k(-distances[start : start + count].T, k)
        candidates.append(idx + start)
        start += count
    cand = jnp.concatenate(candidates, axis=1)  # [M, K]
    cand_ious = jnp.take_along_axis(overlaps.T, cand, axis=1)  # [M, K]
    num_cand = cand.shape[1]
    mean = _sequential_sum(cand_ious) / num_cand
    std = jnp.sqrt(_sequential_sum(jnp.square(cand_ious - mean[:, None])) / (num_cand - 1))
    is_pos = cand_ious >= (mean + std)[:, None]

    ctr = cell_ctr[cand]  # [M, K, 2]
    box = gt_boxes[:, None, :]
    margins = jnp.concatenate([ctr - box[..., :2], box[..., 2:] - ctr], axis=-1)
    is_pos &= (jnp.min(margins, axis=-1) > INSIDE_MARGIN) & gt_mask[:, None]

    # Scatter the positives into a [P, M] IoU table (the rest NOT_POSITIVE); candidate
    # cells of one gt are distinct, so no two writes hit the same entry.
    gt_index = jnp.broadcast_to(jnp.arange(num_gts)[:, None], cand.shape)
    positive = jnp.zeros(overlaps.shape, bool).at[cand, gt_index].set(is_pos)
    table = jnp.where(positive, overlaps, NOT_POSITIVE)
    assigned = jnp.argmax(table, axis=1).astype(jnp.int32)  # first maximum on ties
    pos = jnp.max(table, axis=1) != NOT_POSITIVE
    return ATSSAssignment(
        labels=jnp.where(pos, gt_labels[assigned], num_classes).astype(jnp.int32),
        bbox_targets=jnp.where(pos[:, None], gt_boxes[assigned], 0.0),
        pos_mask=pos,
        assigned_gt=jnp.where(pos, assigned, -1).astype(jnp.int32),
    )


def assign(
    anchors: jax.Array,
    level_counts: Sequence[int],
    gt_boxes: jax.Array,
    gt_labels: jax.Array,
    gt_mask: jax.Array,
    num_classes: int,
    topk: int = 9,
) -> ATSSAssignment:
    """ATSS assignment of a batch.

    Args:
        anchors: ``[P, 4]`` grid-cell boxes shared by the batch (:func:`grid_cells`).
        level_counts: cells per level (static), summing to ``P``.
        gt_boxes: ``[B, M, 4]``, gt_labels: ``[B, M]`` int, gt_mask: ``[B, M]`` bool;
            ground truth padded to ``M`` per image.
        num_classes: the background label of negatives.
        topk: candidates per level and gt (NanoDet's legacy heads: 9).

    The assignment depends on geometry only and carries no gradient.
    """
    level_counts = tuple(int(c) for c in level_counts)
    if sum(level_counts) != anchors.shape[0]:
        raise ValueError(f"level counts {level_counts} do not add up to {anchors.shape[0]}")
    anchors = jnp.asarray(anchors, jnp.float32)
    fn = jax.vmap(
        lambda b, lab, m: _assign_image(
            anchors, b, lab, m, level_counts=level_counts, topk=topk, num_classes=num_classes
        )
    )
    return fn(
        lax.stop_gradient(jnp.asarray(gt_boxes)), jnp.asarray(gt_labels), gt_mask.astype(bool)
    )
