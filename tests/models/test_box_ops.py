"""Center priors, distance <-> box conversions, the Integral projection and overlaps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanodet_jax.box_ops import (
    bbox2distance,
    bbox_overlaps,
    center_priors,
    distance2bbox,
    distribution_to_distance,
    level_sizes,
)

STRIDES = (8, 16, 32, 64)


@pytest.mark.parametrize(
    "input_hw,sizes",
    [
        ((320, 320), [(40, 40), (20, 20), (10, 10), (5, 5)]),
        ((416, 416), [(52, 52), (26, 26), (13, 13), (7, 7)]),
        ((64, 96), [(8, 12), (4, 6), (2, 3), (1, 2)]),  # H=64, W=96
    ],
)
def test_center_priors_layout(input_hw, sizes):
    assert level_sizes(input_hw, STRIDES) == sizes
    priors = center_priors(input_hw, STRIDES)
    assert priors.dtype == np.float32
    assert priors.shape == (sum(h * w for h, w in sizes), 4)
    start = 0
    for (h, w), s in zip(sizes, STRIDES):
        level = priors[start : start + h * w]
        start += h * w
        np.testing.assert_array_equal(level[0], [0, 0, s, s])  # top-left corner, no offset
        np.testing.assert_array_equal(level[-1], [(w - 1) * s, (h - 1) * s, s, s])
        if w > 1:  # row-major: x moves first
            np.testing.assert_array_equal(level[1], [s, 0, s, s])
        if h > 1:
            np.testing.assert_array_equal(level[w], [0, s, s, s])
        assert np.all(level[:, 2:] == s)
    assert len(center_priors((416, 416), STRIDES)) == 3598


def test_center_priors_match_float_arange_width():
    # NanoDet takes the width as arange(ceil(W) / s) over floats; count must equal ceil(W/s)
    for width in (64, 96, 100, 320, 333, 416, 417):
        for s in STRIDES:
            assert len(np.arange(float(width) / s)) == level_sizes((32, width), (s,))[0][1]


def test_distribution_to_distance():
    reg_max = 7
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (2, 5, 4 * (reg_max + 1))).astype(np.float32)
    out = distribution_to_distance(jnp.asarray(logits), reg_max)
    assert out.shape == (2, 5, 4)
    z = logits.reshape(2, 5, 4, reg_max + 1).astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(out), (p * np.arange(reg_max + 1)).sum(-1), rtol=1e-6)
    # flat logits -> middle of the range; a dominant bin -> that bin
    flat = distribution_to_distance(jnp.zeros((4 * (reg_max + 1),)), reg_max)
    np.testing.assert_allclose(np.asarray(flat), reg_max / 2, rtol=1e-6)
    peaked = np.full((4, reg_max + 1), -1e4, np.float32)
    peaked[np.arange(4), [0, 3, 5, 7]] = 0
    np.testing.assert_array_equal(
        np.asarray(distribution_to_distance(jnp.asarray(peaked.ravel()), reg_max)), [0, 3, 5, 7]
    )
    with pytest.raises(ValueError):
        distribution_to_distance(jnp.zeros((10,)), reg_max)


def test_distance2bbox_and_back():
    rng = np.random.default_rng(1)
    points = rng.uniform(0, 100, (3, 7, 2)).astype(np.float32)
    dist = rng.uniform(0, 30, (3, 7, 4)).astype(np.float32)
    boxes = np.asarray(distance2bbox(jnp.asarray(points), jnp.asarray(dist)))
    np.testing.assert_array_equal(boxes[..., 0], points[..., 0] - dist[..., 0])
    np.testing.assert_array_equal(boxes[..., 3], points[..., 1] + dist[..., 3])
    back = np.asarray(bbox2distance(jnp.asarray(points), jnp.asarray(boxes)))
    np.testing.assert_allclose(back, dist, atol=1e-4)

    clipped = np.asarray(distance2bbox(jnp.asarray(points), jnp.asarray(dist), max_shape=(60, 80)))
    assert clipped.min() >= 0
    assert clipped[..., 0::2].max() <= 80 and clipped[..., 1::2].max() <= 60
    np.testing.assert_array_equal(clipped, np.clip(boxes, 0, [80, 60, 80, 60]))

    limited = np.asarray(bbox2distance(jnp.asarray(points), jnp.asarray(boxes), max_dis=7))
    assert limited.min() >= 0 and limited.max() <= np.float32(7 - 0.1)
    np.testing.assert_allclose(limited, np.clip(back, 0, 6.9), atol=1e-6)


def _numpy_overlaps(b1, b2, mode, eps=1e-6):
    b1, b2 = b1[:, None].astype(np.float64), b2[None].astype(np.float64)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    wh = np.clip(
        np.minimum(b1[..., 2:], b2[..., 2:]) - np.maximum(b1[..., :2], b2[..., :2]), 0, None
    )
    overlap = wh[..., 0] * wh[..., 1]
    union = area(b1) + area(b2) - overlap if mode != "iof" else area(b1) + 0 * overlap
    union = np.maximum(union, eps)
    iou = overlap / union
    if mode != "giou":
        return iou
    ewh = np.clip(
        np.maximum(b1[..., 2:], b2[..., 2:]) - np.minimum(b1[..., :2], b2[..., :2]), 0, None
    )
    enclose = np.maximum(ewh[..., 0] * ewh[..., 1], eps)
    return iou - (enclose - union) / enclose


def _random_boxes(rng, shape):
    xy = rng.uniform(0, 50, (*shape, 2))
    wh = rng.uniform(0, 30, (*shape, 2))
    return np.concatenate([xy, xy + wh], -1).astype(np.float32)


@pytest.mark.parametrize("mode", ["iou", "iof", "giou"])
def test_bbox_overlaps_random(mode):
    rng = np.random.default_rng(2)
    b1, b2 = _random_boxes(rng, (2, 6)), _random_boxes(rng, (2, 9))
    full = np.asarray(bbox_overlaps(jnp.asarray(b1), jnp.asarray(b2), mode=mode))
    assert full.shape == (2, 6, 9)
    for i in range(2):
        np.testing.assert_allclose(full[i], _numpy_overlaps(b1[i], b2[i], mode), atol=1e-6)
    aligned = np.asarray(
        bbox_overlaps(jnp.asarray(b1), jnp.asarray(b2[:, :6]), mode=mode, is_aligned=True)
    )
    assert aligned.shape == (2, 6)
    np.testing.assert_allclose(aligned, np.diagonal(full[:, :, :6], axis1=1, axis2=2), atol=1e-6)


def test_bbox_overlaps_hand_values():
    a = jnp.array([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    b = jnp.array([[2.0, 0.0, 6.0, 4.0], [10.0, 10.0, 12.0, 11.0], [0.0, 0.0, 0.0, 0.0]])
    iou = np.asarray(bbox_overlaps(a, b))
    # 8 / (16 + 16 - 8); disjoint; an empty box gives 0, not NaN (union clamped at eps)
    np.testing.assert_allclose(iou, [[1 / 3, 0, 0], [0, 0, 0]], atol=1e-7)
    giou = np.asarray(bbox_overlaps(a, b, mode="giou"))
    # disjoint: enclosing box 12x11 = 132, union 16 + 2 = 18 -> -(132 - 18) / 132
    np.testing.assert_allclose(giou[0, :2], [1 / 3, -(132 - 18) / 132], rtol=1e-6)
    iof = np.asarray(bbox_overlaps(a, b, mode="iof"))
    np.testing.assert_allclose(iof[0, 0], 0.5, rtol=1e-6)
    with pytest.raises(ValueError):
        bbox_overlaps(a, b, mode="diou")


def test_box_ops_jit_and_grad():
    b1 = jnp.array([[1.0, 2.0, 5.0, 7.0]])
    b2 = jnp.array([[2.0, 1.0, 6.0, 6.0]])
    loss = lambda x: 1 - bbox_overlaps(x, b2, mode="giou", is_aligned=True).sum()
    grad = jax.jit(jax.grad(loss))(b1)
    assert np.all(np.isfinite(np.asarray(grad))) and np.abs(np.asarray(grad)).sum() > 0
