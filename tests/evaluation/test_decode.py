"""Decoding of the GFL head output (the DFL integral x stride, clipped boxes, sigmoid scores)
against a float64 NumPy version, and decode + NMS end to end."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanodet_jax.box_ops import center_priors
from nanodet_jax.evaluation.postprocess import decode, postprocess
from tests.evaluation.test_postprocess import F32, reference_nms


def _numpy_decode(raw, input_hw, num_classes, reg_max, strides):
    priors = center_priors(input_hw, strides).astype(np.float64)
    raw = raw.astype(np.float64)
    logits = raw[..., num_classes:].reshape(*raw.shape[:-1], 4, reg_max + 1)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dist = (p * np.arange(reg_max + 1)).sum(-1) * priors[:, 2:3]
    h, w = input_hw
    x1 = np.clip(priors[:, 0] - dist[..., 0], 0, w)
    y1 = np.clip(priors[:, 1] - dist[..., 1], 0, h)
    x2 = np.clip(priors[:, 0] + dist[..., 2], 0, w)
    y2 = np.clip(priors[:, 1] + dist[..., 3], 0, h)
    return np.stack([x1, y1, x2, y2], -1), 1 / (1 + np.exp(-raw[..., :num_classes]))


@pytest.mark.parametrize("input_hw,reg_max", [((64, 96), 7), ((320, 320), 16)])
def test_decode_matches_numpy(input_hw, reg_max):
    strides, num_classes = (8, 16, 32, 64), 5
    num_priors = len(center_priors(input_hw, strides))
    rng = np.random.default_rng(6)
    raw = rng.normal(0, 3, (2, num_priors, num_classes + 4 * (reg_max + 1))).astype(F32)
    boxes, scores = decode(jnp.asarray(raw), input_hw, num_classes, reg_max, strides)
    ref_boxes, ref_scores = _numpy_decode(raw, input_hw, num_classes, reg_max, strides)
    np.testing.assert_allclose(np.asarray(boxes), ref_boxes, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(np.asarray(scores), ref_scores, rtol=1e-5, atol=1e-7)
    assert boxes.min() >= 0 and boxes[..., 0::2].max() <= input_hw[1]
    assert boxes[..., 1::2].max() <= input_hw[0]


def test_postprocess_end_to_end():
    input_hw, num_classes, reg_max, strides = (64, 96), 4, 7, (8, 16, 32, 64)
    num_priors = len(center_priors(input_hw, strides))
    rng = np.random.default_rng(7)
    raw = rng.normal(0, 2, (2, num_priors, num_classes + 4 * (reg_max + 1))).astype(F32)
    raw[..., :num_classes] -= 2.0
    fn = jax.jit(postprocess, static_argnums=range(1, 9))
    out = fn(raw, input_hw, num_classes, reg_max, strides, 0.05, 0.6, 100, 2000)
    boxes, scores = jax.jit(decode, static_argnums=range(1, 5))(
        raw, input_hw, num_classes, reg_max, strides
    )
    for i in range(2):
        rb, rs, rl = reference_nms(np.asarray(boxes[i]), np.asarray(scores[i]))
        n = int(out.num_dets[i])
        assert n == len(rs) and n > 0
        np.testing.assert_array_equal(np.asarray(out.boxes[i, :n]), rb)
        np.testing.assert_array_equal(np.asarray(out.scores[i, :n]), rs)
        np.testing.assert_array_equal(np.asarray(out.labels[i, :n]), rl)
    with pytest.raises(ValueError):
        decode(jnp.asarray(raw[:, :-1]), input_hw, num_classes, reg_max, strides)
