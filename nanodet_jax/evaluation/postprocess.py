"""Decoding of the raw head output and NanoDet's multi-class NMS, jittable with static shapes.

:func:`multiclass_nms` returns exactly the detections of NanoDet's ``multiclass_nms``
followed by torchvision's CPU ``nms`` (same boxes, scores, labels and order), padded to
``max_num`` rows. The reference works as follows, and every step is reproduced:

* candidates are all ``(prior, class)`` pairs with ``score > score_thr`` (compared in
  float32), ordered prior-major / class-minor (flat index ``prior * C + class``);
* class separation adds ``label * (max_coordinate + 1)`` to every candidate box, where
  the maximum runs over all candidates' coordinates; the offset changes how the IoU
  rounds in float32, so it is applied exactly as the reference does;
* greedy NMS visits candidates by descending score with a stable sort and drops every
  later box whose float32 IoU ``inter / (area_i + area_j - inter)`` with a kept box is
  greater than ``iou_thr`` (torchvision compares the float32 IoU with the threshold as a
  double);
* the kept list, in visiting order, is cut to ``max_num``.

Only the best ``nms_pre`` candidates enter NMS. The result can then differ from the
unbounded reference only if more than ``nms_pre`` candidates passed the threshold and
fewer than ``max_num`` boxes were kept: ``truncated`` flags exactly that case.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nanodet_jax.box_ops import (
    DEFAULT_STRIDES,
    center_priors,
    distance2bbox,
    distribution_to_distance,
)


class Detections(NamedTuple):
    """Fixed-size NMS output; rows at and after ``num_dets`` are padding (label -1)."""

    boxes: jax.Array  # [..., max_num, 4] float32, xyxy in input pixels
    scores: jax.Array  # [..., max_num] float32
    labels: jax.Array  # [..., max_num] int32
    num_dets: jax.Array  # [...] int32
    truncated: jax.Array  # [...] bool: nms_pre may have changed the result


def decode(
    raw: jax.Array,
    input_hw: tuple[int, int],
    num_classes: int,
    reg_max: int,
    strides: Sequence[int] = DEFAULT_STRIDES,
) -> tuple[jax.Array, jax.Array]:
    """Raw head output ``[B, P, C + 4 * (reg_max + 1)]`` -> boxes ``[B, P, 4]``, scores.

    Boxes are clipped to the ``input_hw = (H, W)`` canvas; scores ``[B, P, C]`` are the
    class sigmoids.
    """
    priors = center_priors(input_hw, strides)
    if raw.shape[-2] != priors.shape[0]:
        raise ValueError(f"{raw.shape[-2]} priors in raw, {priors.shape[0]} for {input_hw}")
    if raw.shape[-1] != num_classes + 4 * (reg_max + 1):
        raise ValueError(f"last dim {raw.shape[-1]} != {num_classes} + 4 * ({reg_max} + 1)")
    priors = jnp.asarray(priors)
    distances = distribution_to_distance(raw[..., num_classes:], reg_max) * priors[:, 2:3]
    boxes = distance2bbox(priors[:, :2], distances, max_shape=tuple(input_hw))
    return boxes, jax.nn.sigmoid(raw[..., :num_classes])


def _opaque(x: jax.Array, zero: jax.Array) -> jax.Array:
    """``x`` unchanged, but hidden from the compiler's floating-point rewrites.

    XLA (CPU and GPU) lets LLVM/ptxas contract ``a * b + c`` into one FMA, which skips
    the rounding of the product; the reference rounds it, and a one-ulp change of a box
    offset or an area can flip an IoU comparison. Or-ing the bits with a zero the
    compiler cannot prove to be zero (derived from run-time data) forces the rounded
    product to be materialised. ``tests/evaluation/test_postprocess.py`` checks the result bitwise.
    """
    bits = lax.bitcast_convert_type(x, jnp.int32) | zero
    return lax.bitcast_convert_type(bits, jnp.float32)


def _largest_f32_at_most(value: float) -> np.float32:
    """For float32 ``x``: ``x > value`` (exact, as C++ float-vs-double) iff ``x > result``."""
    t = np.float32(value)
    if float(t) > value:
        t = np.nextafter(t, np.float32(-np.inf))
    return t


class _Candidates(NamedTuple):
    scores: jax.Array  # [K] best-first, -inf past num_cand
    priors: jax.Array  # [K] int32
    labels: jax.Array  # [K] int32
    nms_boxes: jax.Array  # [K, 4] class-offset boxes
    areas: jax.Array  # [K] areas of the offset boxes
    num_cand: jax.Array  # int32, candidates above the score threshold (all, not only K)
    zero: jax.Array  # int32 run-time zero for _opaque


def _candidates(boxes: jax.Array, scores: jax.Array, score_thr: float, nms_pre: int) -> _Candidates:
    num_priors, num_classes = scores.shape
    flat = scores.reshape(-1)
    valid = flat > np.float32(score_thr)
    num_cand = jnp.sum(valid, dtype=jnp.int32)
    zero = (num_cand < 0).astype(jnp.int32)  # never true, but not provably so

    # A stable descending sort of the candidates in flat-index order is a sort by
    # (-score, flat index); top_k breaks ties towards the lower index, so its first K
    # entries are exactly the reference's first K visits.
    k = min(nms_pre, flat.shape[0])
    top_scores, top_idx = lax.top_k(jnp.where(valid, flat, -jnp.inf), k)
    priors = top_idx // num_classes
    labels = top_idx % num_classes

    has_cand = jnp.any(valid.reshape(num_priors, num_classes), axis=1)
    max_coord = jnp.max(jnp.where(has_cand[:, None], boxes, -jnp.inf))
    max_coord = jnp.where(num_cand > 0, max_coord, 0.0)
    offsets = _opaque(labels.astype(jnp.float32) * (max_coord + 1.0), zero)
    nms_boxes = boxes[priors] + offsets[:, None]
    areas = _opaque((nms_boxes[:, 2] - nms_boxes[:, 0]) * (nms_boxes[:, 3] - nms_boxes[:, 1]), zero)
    return _Candidates(top_scores, priors, labels, nms_boxes, areas, num_cand, zero)


def _iou_with(c: _Candidates, j: jax.Array) -> jax.Array:
    """Float32 IoU of candidate ``j`` with every candidate, with torchvision's rounding."""
    b = c.nms_boxes
    bj = b[j]
    w = jnp.maximum(jnp.minimum(bj[2], b[:, 2]) - jnp.maximum(bj[0], b[:, 0]), 0.0)
    h = jnp.maximum(jnp.minimum(bj[3], b[:, 3]) - jnp.maximum(bj[1], b[:, 1]), 0.0)
    inter = _opaque(w * h, c.zero)
    return inter / ((c.areas[j] + c.areas) - inter)


def _greedy(
    iou_row: Callable[[jax.Array], jax.Array],
    active: jax.Array,
    iou_thr: float,
    max_num: int,
) -> tuple[jax.Array, jax.Array]:
    """Greedy NMS over best-first candidates; returns (kept positions [max_num], count).

    One iteration per *kept* box (at most ``max_num``): the next kept box is the first
    candidate neither kept nor suppressed yet, which is the one the reference's visit
    loop would keep next. Each iteration costs one IoU row, O(K).
    """
    thr = _largest_f32_at_most(iou_thr)
    positions = jnp.arange(active.shape[0])

    def cond(state):
        count, remaining, _ = state
        return (count < max_num) & jnp.any(remaining)

    def body(state):
        count, remaining, keep = state
        j = jnp.argmax(remaining).astype(jnp.int32)  # first remaining candidate
        keep = keep.at[count].set(j)
        # NaN IoUs (two empty boxes) never suppress, as in the reference; j itself is
        # retired explicitly for the same reason.
        remaining = remaining & ~(iou_row(j) > thr) & (positions != j)
        return count + 1, remaining, keep

    init = (jnp.int32(0), active, jnp.zeros((max_num,), jnp.int32))
    count, _, keep = lax.while_loop(cond, body, init)
    return keep, count


def multiclass_nms(
    boxes: jax.Array,
    scores: jax.Array,
    score_thr: float = 0.05,
    iou_thr: float = 0.6,
    max_num: int = 100,
    nms_pre: int = 2000,
) -> Detections:
    """NanoDet's class-aware NMS for one image: ``boxes [P, 4]``, ``scores [P, C]``.

    Jittable and vmappable (the thresholds and sizes are static Python numbers).
    Returns :class:`Detections` with ``max_num`` rows in descending-score order.
    """
    boxes = boxes.astype(jnp.float32)
    scores = scores.astype(jnp.float32)
    c = _candidates(boxes, scores, score_thr, nms_pre)
    active = jnp.arange(c.scores.shape[0]) < c.num_cand
    keep, count = _greedy(partial(_iou_with, c), active, iou_thr, max_num)

    filled = jnp.arange(max_num) < count
    det_boxes = jnp.where(filled[:, None], boxes[c.priors[keep]], 0.0)
    det_scores = jnp.where(filled, c.scores[keep], 0.0)
    det_labels = jnp.where(filled, c.labels[keep], -1).astype(jnp.int32)
    truncated = (c.num_cand > nms_pre) & (count < max_num)
    return Detections(det_boxes, det_scores, det_labels, count, truncated)


def batched_multiclass_nms(
    boxes: jax.Array,
    scores: jax.Array,
    score_thr: float = 0.05,
    iou_thr: float = 0.6,
    max_num: int = 100,
    nms_pre: int = 2000,
) -> Detections:
    """:func:`multiclass_nms` over a batch: ``boxes [B, P, 4]``, ``scores [B, P, C]``."""
    nms = partial(
        multiclass_nms, score_thr=score_thr, iou_thr=iou_thr, max_num=max_num, nms_pre=nms_pre
    )
    return jax.vmap(nms)(boxes, scores)


def postprocess(
    raw: jax.Array,
    input_hw: tuple[int, int],
    num_classes: int,
    reg_max: int,
    strides: Sequence[int] = DEFAULT_STRIDES,
    score_thr: float = 0.05,
    iou_thr: float = 0.6,
    max_num: int = 100,
    nms_pre: int = 2000,
) -> Detections:
    """Raw head output ``[B, P, ...]`` -> batched :class:`Detections` in input-canvas pixels.

    Everything but ``raw`` is static; e.g.
    ``jax.jit(postprocess, static_argnums=range(1, 9))``.
    """
    boxes, scores = decode(raw, input_hw, num_classes, reg_max, strides)
    return batched_multiclass_nms(boxes, scores, score_thr, iou_thr, max_num, nms_pre)


def to_numpy_detections(
    det_boxes: jax.Array | np.ndarray,
    det_scores: jax.Array | np.ndarray,
    det_labels: jax.Array | np.ndarray,
    num_dets: jax.Array | np.ndarray,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Host-side: per image ``(boxes [n, 4], scores [n], labels [n])``, padding dropped.

    Accepts batched arrays (leading batch dim) or a single image's unbatched output.
    """
    det_boxes, det_scores, det_labels, num_dets = (
        np.asarray(a) for a in (det_boxes, det_scores, det_labels, num_dets)
    )
    if num_dets.ndim == 0:
        det_boxes, det_scores, det_labels, num_dets = (
            a[None] for a in (det_boxes, det_scores, det_labels, num_dets)
        )
    return [
        (det_boxes[i, :n], det_scores[i, :n], det_labels[i, :n])
        for i, n in enumerate(num_dets.astype(int).tolist())
    ]
