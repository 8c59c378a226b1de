"""Decode and multi-class NMS against NanoDet's recorded outputs and NumPy oracles.

The reference is ``tests/data/golden_nms.npz``, NanoDet's own outputs on small cases
(:func:`test_nms_matches_nanodet_golden`); the oracle serves the randomised tests.

The NMS oracle follows NanoDet's ``multiclass_nms`` / ``batched_nms`` and torchvision's
CPU ``nms`` kernel step by step, in float32 NumPy (NumPy never fuses a multiply into an
add): threshold in float32, masked-select candidate order, the class offset from the
maximum candidate coordinate, a stable descending sort, and greedy suppression with
the float32 IoU compared to the threshold in double precision.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanodet_jax.evaluation.postprocess import (
    _candidates,
    _iou_with,
    batched_multiclass_nms,
    decode,
    multiclass_nms,
    to_numpy_detections,
)
from tests.conftest import REPO

F32 = np.float32
GOLDEN_NMS = os.path.join(REPO, "tests", "data", "golden_nms.npz")
GOLDEN_CASES = (
    "decode-sparse decode-ties ties all-equal pairs-iou-0.6 offset-exact-0.6 exact-iou-0.6 "
    "exact-iou-0.5"
).split()


def reference_nms(boxes, scores, score_thr=0.05, iou_thr=0.6, max_num=100):
    boxes, scores = np.asarray(boxes, F32), np.asarray(scores, F32)
    prior_idx, labels = np.nonzero(scores > F32(score_thr))  # row-major = masked_select order
    if prior_idx.size == 0:
        return np.zeros((0, 4), F32), np.zeros((0,), F32), np.zeros((0,), np.int64)
    cand_boxes, cand_scores = boxes[prior_idx], scores[prior_idx, labels]
    offsets = labels.astype(F32) * (cand_boxes.max() + F32(1))
    nb = cand_boxes + offsets[:, None]
    areas = (nb[:, 2] - nb[:, 0]) * (nb[:, 3] - nb[:, 1])
    suppressed = np.zeros(len(cand_scores), bool)
    keep = []
    for i in np.argsort(-cand_scores, kind="stable"):
        if suppressed[i]:
            continue
        keep.append(i)
        w = np.maximum(F32(0), np.minimum(nb[i, 2], nb[:, 2]) - np.maximum(nb[i, 0], nb[:, 0]))
        h = np.maximum(F32(0), np.minimum(nb[i, 3], nb[:, 3]) - np.maximum(nb[i, 1], nb[:, 1]))
        inter = w * h
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = inter / (areas[i] + areas - inter)
        suppressed |= iou.astype(np.float64) > iou_thr
    keep = np.asarray(keep[:max_num], np.int64)
    return cand_boxes[keep], cand_scores[keep], labels[keep]


@functools.cache
def _nms_fn(score_thr=0.05, iou_thr=0.6, max_num=100, nms_pre=2000):
    return jax.jit(
        functools.partial(
            multiclass_nms, score_thr=score_thr, iou_thr=iou_thr, max_num=max_num, nms_pre=nms_pre
        )
    )


def _check_exact(boxes, scores, score_thr=0.05, iou_thr=0.6, max_num=100, nms_pre=2000):
    out = _nms_fn(score_thr, iou_thr, max_num, nms_pre)(boxes, scores)
    rb, rs, rl = reference_nms(boxes, scores, score_thr, iou_thr, max_num)
    n = int(out.num_dets)
    assert not bool(out.truncated)
    assert n == len(rs)
    np.testing.assert_array_equal(np.asarray(out.boxes[:n]), rb)
    np.testing.assert_array_equal(np.asarray(out.scores[:n]), rs)
    np.testing.assert_array_equal(np.asarray(out.labels[:n]), rl)
    # padding
    assert np.all(np.asarray(out.labels[n:]) == -1)
    assert np.all(np.asarray(out.scores[n:]) == 0) and np.all(np.asarray(out.boxes[n:]) == 0)
    return out


def _random_boxes(rng, n, size=320.0, min_wh=4.0, max_wh=120.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(min_wh, max_wh, (n, 2))
    return np.clip(np.concatenate([xy - wh / 2, xy + wh / 2], 1), 0, size).astype(F32)


def _clustered_boxes(rng, n, size=320.0):
    """Jittered copies of a few objects, so that many same-class pairs overlap."""
    centers = _random_boxes(rng, max(n // 20, 1), size, 20, 150)
    base = centers[rng.integers(0, len(centers), n)]
    jitter = rng.normal(0, 6, (n, 4))
    return np.clip(base + jitter, 0, size).astype(F32)


@pytest.mark.parametrize("seed", range(4))
def test_random_many_candidates(seed):
    rng = np.random.default_rng(seed)
    boxes = _clustered_boxes(rng, 600)
    scores = (1 / (1 + np.exp(-rng.normal(-3.5, 1.8, (600, 12))))).astype(F32)
    _check_exact(boxes, scores, nms_pre=600 * 12)
    _check_exact(boxes, scores, iou_thr=0.3, nms_pre=600 * 12)


def test_exact_score_ties():
    rng = np.random.default_rng(10)
    boxes = _clustered_boxes(rng, 400)
    # a handful of score levels: many exact ties, inside and across classes
    scores = (rng.integers(0, 8, (400, 6)) / 8).astype(F32)
    out = _check_exact(boxes, scores, nms_pre=2400)
    assert int(out.num_dets) == 100
    # batched top_k must break ties the same way (lower flat index first)
    batched = jax.jit(functools.partial(batched_multiclass_nms, nms_pre=500))(
        np.stack([boxes, boxes[::-1]]), np.stack([scores, scores[::-1]])
    )
    for i, (b, sc) in enumerate([(boxes, scores), (boxes[::-1], scores[::-1])]):
        single = _check_exact(b, sc, nms_pre=500)  # ties cut at nms_pre: still exact
        for got, want in zip(batched, single):
            np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(want))
    # identical scores everywhere: order is purely the candidate (flat index) order
    _check_exact(boxes, np.full((400, 6), 0.5, F32), nms_pre=2400)


def test_iou_at_threshold():
    # IoU 3/5: float32(0.6) = 0.6000000238 > 0.6, so torchvision (double compare) suppresses
    boxes = np.array([[0, 0, 4, 1], [1, 0, 5, 1]], F32)
    scores = np.array([[0.9], [0.8]], F32)
    out = _check_exact(boxes, scores)
    assert int(out.num_dets) == 1
    # IoU exactly 0.5 (representable): not greater than 0.5, both kept
    boxes = np.array([[0, 0, 3, 1], [1, 0, 4, 1]], F32)
    out = _check_exact(boxes, scores, iou_thr=0.5)
    assert int(out.num_dets) == 2


def test_iou_at_threshold_after_class_offsets():
    """Pairs whose IoU is exactly float32(0.6), or one spacing off, *after* the offset.

    Coordinates are built in the offset frame as multiples of the float32 spacing there,
    so widths, intersections and areas are exact and IoU = 3/5 exactly for the middle
    nudge. Any slip in the offset (wrong maximum coordinate, e.g. taken over the top
    ``nms_pre`` candidates only; a fused multiply-add) moves the boxes off that grid.
    The box holding the maximum coordinate scores lowest and falls outside ``nms_pre``.
    """
    rng = np.random.default_rng(3)
    n_pairs, num_classes, m = 300, 80, F32(999.37)
    offsets = np.arange(num_classes).astype(F32) * (m + F32(1))
    labels = rng.integers(1, num_classes, n_pairs)
    o = offsets[labels].astype(np.float64)
    spacing = np.spacing((o + float(m)).astype(F32)).astype(np.float64)
    u = rng.integers(100, 1000, n_pairs) * spacing
    height = rng.integers(400, 3000, n_pairs) * spacing
    x = np.round((o + rng.uniform(0, 0.9, n_pairs) * (float(m) - 6 * u)) / spacing) * spacing
    y = np.round((o + rng.uniform(0, 0.9, n_pairs) * (float(m) - height)) / spacing) * spacing
    nudge = rng.integers(-1, 2, n_pairs) * spacing
    first = np.stack([x, y, x + 4 * u, y + height], 1)
    second = np.stack([x + u + nudge, y, x + 5 * u + nudge, y + height], 1)
    framed = np.concatenate([first, second]).astype(F32)  # exact: multiples of spacing
    boxes = (framed - np.concatenate([o, o]).astype(F32)[:, None]).astype(F32)  # Sterbenz
    assert np.array_equal(boxes + np.concatenate([o, o]).astype(F32)[:, None], framed)

    scores = np.zeros((2 * n_pairs + 1, num_classes), F32)
    scores[np.arange(n_pairs), labels] = rng.uniform(0.6, 1, n_pairs)
    scores[n_pairs + np.arange(n_pairs), labels] = rng.uniform(0.1, 0.5, n_pairs)
    boxes = np.concatenate([boxes, np.array([[m - 10, m - 10, m, m]], F32)])
    scores[-1, 0] = 0.051
    assert boxes[:-1].max() < m

    out = _check_exact(boxes, scores, max_num=250, nms_pre=2 * n_pairs)
    assert int(out.num_dets) == 250
    # the oracle suppresses every exact-3/5 pair: the threshold is compared in double
    kept = reference_nms(boxes, scores, max_num=10_000)[0]
    kept_second = {tuple(b) for b in kept} & {tuple(b) for b in boxes[n_pairs:-1]}
    exact = nudge == 0
    assert exact.sum() > 50
    assert not {tuple(b) for b in boxes[n_pairs:-1][exact]} & kept_second
    assert len({tuple(b) for b in boxes[n_pairs:-1][nudge > 0]} & kept_second) > 50


def test_iou_near_threshold_random_offsets():
    """Pairs with IoU ~0.6 (within ~1e-5) before the offset, many classes.

    After the offset the float32 rounding scatters these IoUs by ~1e-4 around the
    threshold, so the kept set depends on the exact offset: built from the maximum
    coordinate of *all* candidates, here held by a low-score box outside ``nms_pre``.
    """
    rng = np.random.default_rng(8)
    n_pairs, num_classes, m = 400, 80, F32(431.7)
    w = rng.uniform(8, 60, n_pairs).astype(F32)
    h = rng.uniform(8, 60, n_pairs).astype(F32)
    x = rng.uniform(0, 360, n_pairs).astype(F32)
    y = rng.uniform(0, 360, n_pairs).astype(F32)
    shift = (w / 4 + rng.integers(-40, 41, n_pairs) * np.spacing(w)).astype(F32)
    first = np.stack([x, y, x + w, y + h], 1)
    second = np.stack([x + shift, y, x + shift + w, y + h], 1)
    boxes = np.concatenate([first, second, np.array([[m - 10, m - 10, m, m]])]).astype(F32)
    scores = np.zeros((2 * n_pairs + 1, num_classes), F32)
    labels = rng.integers(0, num_classes, n_pairs)
    scores[np.arange(n_pairs), labels] = rng.uniform(0.6, 1, n_pairs)
    scores[n_pairs + np.arange(n_pairs), labels] = rng.uniform(0.1, 0.5, n_pairs)
    scores[-1, 0] = 0.051
    assert boxes[:-1].max() < m
    # the first boxes (scores >= 0.6) all survive; ~half of the second ones follow them
    out = _check_exact(boxes, scores, max_num=560, nms_pre=2 * n_pairs)
    assert int(out.num_dets) == 560


def test_identical_boxes_different_classes_not_suppressed():
    boxes = np.tile(np.array([[10, 10, 50, 60]], F32), (3, 1))
    scores = np.array([[0.9, 0.8, 0.0], [0.7, 0.0, 0.6], [0.0, 0.0, 0.95]], F32)
    out = _check_exact(boxes, scores)
    assert int(out.num_dets) == 3
    np.testing.assert_array_equal(np.asarray(out.labels[:3]), [2, 0, 1])


def test_zero_candidates():
    rng = np.random.default_rng(0)
    boxes = _random_boxes(rng, 50)
    scores = np.full((50, 5), 0.05, F32)  # equal to the threshold: strictly-greater fails
    out = _check_exact(boxes, scores)
    assert int(out.num_dets) == 0


def test_more_than_max_num_survivors():
    # a grid of disjoint boxes: nothing is suppressed, the best 100 are returned
    g = np.arange(20, dtype=F32) * 16
    xs, ys = np.meshgrid(g, g)
    boxes = np.stack([xs.ravel(), ys.ravel(), xs.ravel() + 10, ys.ravel() + 10], 1).astype(F32)
    rng = np.random.default_rng(1)
    scores = rng.uniform(0.1, 1, (400, 3)).astype(F32)
    out = _check_exact(boxes, scores, nms_pre=1200)
    assert int(out.num_dets) == 100


def test_nms_pre_truncation():
    rng = np.random.default_rng(2)
    boxes = np.tile(np.array([[0, 0, 100, 100]], F32), (300, 1))
    scores = rng.uniform(0.1, 1, (300, 2)).astype(F32)
    # 600 candidates, 2 classes of identical boxes -> 2 kept: truncated with nms_pre < 600
    out = _nms_fn(nms_pre=100)(boxes, scores)
    assert bool(out.truncated) and int(out.num_dets) == 2
    out = _nms_fn(nms_pre=600)(boxes, scores)
    assert not bool(out.truncated)
    # over nms_pre candidates but max_num reached: exact, not flagged, ties at the cut
    boxes = _random_boxes(rng, 300, size=3000, max_wh=30)
    scores = (rng.integers(1, 30, (300, 2)) / 30).astype(F32)
    out = _check_exact(boxes, scores, max_num=20, nms_pre=100)
    assert int(out.num_dets) == 20


def test_fma_free_rounding():
    """Offsets, areas and IoUs are bit-identical to separately rounded float32 math.

    Fails if the compiler contracts a product into the following add (FMA).
    """
    rng = np.random.default_rng(4)
    boxes = _random_boxes(rng, 500, size=997.3)
    scores = rng.uniform(0, 1, (500, 80)).astype(F32)

    def fn(b, s):
        c = _candidates(b, s, 0.05, 4000)
        return c, jax.vmap(lambda j: _iou_with(c, j))(jnp.arange(64))

    single = jax.jit(fn)(boxes, scores)
    batched = jax.jit(jax.vmap(fn))(np.stack([boxes, boxes]), np.stack([scores, scores]))
    for got in jax.tree.leaves(batched):
        assert np.array_equal(got[0], got[1])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b[1]), single, batched)
    c, ious = single
    priors, labels = np.asarray(c.priors), np.asarray(c.labels)
    valid = scores > F32(0.05)
    max_coord = boxes[np.any(valid, 1)].max()
    nb = boxes[priors] + (labels.astype(F32) * (max_coord + F32(1)))[:, None]
    areas = (nb[:, 2] - nb[:, 0]) * (nb[:, 3] - nb[:, 1])
    np.testing.assert_array_equal(np.asarray(c.nms_boxes), nb)
    np.testing.assert_array_equal(np.asarray(c.areas), areas)
    for j in range(64):
        w = np.maximum(F32(0), np.minimum(nb[j, 2], nb[:, 2]) - np.maximum(nb[j, 0], nb[:, 0]))
        h = np.maximum(F32(0), np.minimum(nb[j, 3], nb[:, 3]) - np.maximum(nb[j, 1], nb[:, 1]))
        inter = w * h
        np.testing.assert_array_equal(np.asarray(ious[j]), inter / (areas[j] + areas - inter))


def test_batched_matches_single_and_numpy_helper():
    rng = np.random.default_rng(5)
    boxes = np.stack([_clustered_boxes(rng, 300) for _ in range(3)])
    scores = (1 / (1 + np.exp(-rng.normal(-3, 2, (3, 300, 8))))).astype(F32)
    scores[1] = 0.0  # an image without detections
    batched = jax.jit(functools.partial(batched_multiclass_nms, nms_pre=2400))(boxes, scores)
    dets = to_numpy_detections(batched.boxes, batched.scores, batched.labels, batched.num_dets)
    assert len(dets) == 3 and len(dets[1][0]) == 0
    for i in range(3):
        rb, rs, rl = reference_nms(boxes[i], scores[i])
        np.testing.assert_array_equal(dets[i][0], rb)
        np.testing.assert_array_equal(dets[i][1], rs)
        np.testing.assert_array_equal(dets[i][2], rl)


@functools.cache
def _golden_nms() -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(GOLDEN_NMS) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("meta")))
    return {c["name"]: c for c in meta["cases"]}, arrays


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_nms_matches_nanodet_golden(name):
    """Our jitted decode + multiclass_nms against NanoDet's recorded outputs.

    Golden: ``tests/data/golden_nms.npz``, written by
    ``python tools/check_nms_torch.py /path/to/nanodet --record tests/data/golden_nms.npz``
    (seed 0): NanoDet's ``multiclass_nms`` (``nanodet/model/module/nms.py``, with the
    dummy background column of ``get_bboxes``; torchvision's nms, or its stand-in
    ``tools.reference.torch_nms`` with the CPU kernel's stable sort) with
    ``max_num=100`` and ``max_num=-1`` (no cut). Cases: two raw head outputs at 64x96
    (8 classes) decoded by NanoDet's ``get_single_level_center_priors`` / ``Integral`` /
    ``distance2bbox`` / sigmoid (one with a few logit levels: exact score ties), boxes
    with a few score levels (ties), all scores equal, box pairs with IoU ~0.6 over 80
    classes, pairs with IoU exactly 3/5 after the class offset (or one ulp off), and
    IoUs of exactly 3/5 and 1/2 at thresholds 0.6 and 0.5. NMS must agree exactly:
    count, order, boxes, scores, labels; decode to float32 rounding.
    """
    cases, g = _golden_nms()
    case = cases[name]
    boxes, scores = g[f"{name}/boxes"], g[f"{name}/scores"]
    if f"{name}/raw" in g:
        ours_boxes, ours_scores = jax.jit(decode, static_argnums=range(1, 5))(
            g[f"{name}/raw"],
            tuple(case["input_hw"]),
            case["num_classes"],
            case["reg_max"],
            tuple(case["strides"]),
        )
        np.testing.assert_allclose(np.asarray(ours_boxes[0]), boxes, rtol=0, atol=1e-4)
        np.testing.assert_allclose(np.asarray(ours_scores[0]), scores, rtol=0, atol=1e-7)
    assert case["candidates"] == int((scores > F32(case["score_thr"])).sum())
    for max_num in (100, -1):
        want_boxes, want_scores, want_labels = (
            g[f"{name}/max_num={max_num}/{k}"] for k in ("boxes", "scores", "labels")
        )
        assert len(want_scores) == case["kept"][str(max_num)]
        if "ties" in name or "equal" in name:  # the case must exercise the tie-break
            assert len(np.unique(want_scores)) < len(want_scores) // 4
        ours_max = max_num if max_num > 0 else max(case["candidates"], 1)
        out = _nms_fn(case["score_thr"], case["iou_thr"], ours_max, 2000)(boxes, scores)
        n, msg = int(out.num_dets), f"{name}, max_num={max_num}"
        assert not bool(out.truncated)
        assert n == len(want_scores), f"{msg}: {n} kept, NanoDet {len(want_scores)}"
        np.testing.assert_array_equal(np.asarray(out.scores[:n]), want_scores, err_msg=msg)
        np.testing.assert_array_equal(np.asarray(out.labels[:n]), want_labels, err_msg=msg)
        np.testing.assert_array_equal(np.asarray(out.boxes[:n]), want_boxes, err_msg=msg)
