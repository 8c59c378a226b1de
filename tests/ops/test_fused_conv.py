"""The fused inference convolutions (1x1 and stem, bias + activation as the C++ kernels'
epilogue) against XLA's convolution followed by the same bias and activation."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from nanodet_jax.models.layers import ACTIVATIONS
from nanodet_jax.ops import pointwise_conv_bias_act, stem_conv_bias_act
from nanodet_jax.ops.fused_conv import fused_dense_weights


def _reference(x, kernel, bias, stride, padding, fn):
    y = lax.conv_general_dilated(
        x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # fmt: skip
    return fn(y + bias)


def _data(n, h, w, c, r, k, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((r, r, c, k)) / np.sqrt(r * r * c), jnp.float32)
    bias = jnp.asarray(rng.normal(0.0, 0.5, k), jnp.float32)
    return x, kernel, bias


def _check(op, x, kernel, bias, stride, padding, act, impl):
    fn = ACTIVATIONS[act]
    wb = fused_dense_weights(kernel, bias)
    f = jax.jit(partial(op, activation=act, activation_fn=fn, impl=impl))
    got, want = f(x, wb), _reference(x, kernel, bias, stride, padding, fn)
    assert got.shape == want.shape
    err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    assert err < 1e-5, (act, impl, err)
    return f, wb


# (N, H, W, C, K): panel tails (K % 32), row tails (pixels % 12), one pixel, NanoDet shapes.
POINTWISE = [(1, 7, 9, 24, 58), (2, 5, 5, 96, 96), (1, 1, 1, 3, 5), (3, 4, 6, 116, 33)]


@pytest.mark.parametrize("act", ["ReLU", "LeakyReLU", "HardSwish", None, "SiLU"])
def test_pointwise(ffi_ok: bool, act: str | None) -> None:
    for case in POINTWISE:
        n, h, w, c, k = case
        x, kernel, bias = _data(n, h, w, c, 1, k)
        op = lambda x, wb, **kw: pointwise_conv_bias_act(x, wb, **kw)  # noqa: E731
        for impl in ("ffi", "lax"):
            f, wb = _check(op, x, kernel, bias, 1, 0, act, impl)
            hlo = f.lower(x, wb).as_text()
            assert ("nanodet_pointwise_bias_act" in hlo) == (impl == "ffi"), (case, impl)
    got = jax.vmap(f, in_axes=(0, None))(jnp.stack([x, 2 * x]), wb)
    np.testing.assert_allclose(got[1], f(2 * x, wb), rtol=1e-6, atol=1e-6)


def test_pointwise_reads_a_channel_range_in_place(ffi_ok: bool) -> None:
    # A ShuffleNetV2 branch's 1x1 on the second half of its block's input, not sliced out.
    x, kernel, bias = _data(2, 5, 7, 40, 1, 20)
    wb = fused_dense_weights(kernel[:, :, 24:], bias)
    relu = ACTIVATIONS["ReLU"]
    want = _reference(x[..., 24:], kernel[:, :, 24:], bias, 1, 0, relu)
    for impl in ("ffi", "lax"):
        f = jax.jit(partial(pointwise_conv_bias_act, activation="ReLU", activation_fn=relu,
                            channel_offset=24, impl=impl))  # fmt: skip
        np.testing.assert_allclose(f(x, wb), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="channels 30..46"):
        pointwise_conv_bias_act(x, wb, "ReLU", relu, channel_offset=30)


# (N, H, W, C, R, K, stride, padding): NanoDet's 3x3/2 stem, ResNet's 7x7/2, odd sizes, a
# 4-channel input, padding 0.
STEMS = [
    (2, 17, 12, 3, 3, 24, 2, 1),
    (1, 15, 16, 3, 7, 16, 2, 3),
    (1, 9, 9, 4, 3, 40, 1, 1),
    (2, 8, 7, 3, 3, 8, 2, 0),
]


@pytest.mark.parametrize("act", ["ReLU", "LeakyReLU", "ReLU6", None])
def test_stem(ffi_ok: bool, act: str | None) -> None:
    for case in STEMS:
        n, h, w, c, r, k, s, p = case
        x, kernel, bias = _data(n, h, w, c, r, k, seed=1)
        op = partial(stem_conv_bias_act, kernel_size=r, stride=s, padding=p)
        for impl in ("ffi", "lax"):
            f, wb = _check(op, x, kernel, bias, s, p, act, impl)
            hlo = f.lower(x, wb).as_text()
            assert ("nanodet_stem_conv_bias_act" in hlo) == (impl == "ffi"), (case, impl)


@pytest.mark.parametrize("hw", [(17, 12), (9, 9), (4, 5), (1, 1)])
def test_stem_with_max_pool(ffi_ok: bool, hw: tuple[int, int]) -> None:
    # ShuffleNetV2's conv1 + ReLU + MaxPool2d(3, 2, 1) in one kernel: odd / even / tiny sizes.
    from nanodet_jax.ops.pooling import max_pool_3x3_s2

    x, kernel, bias = _data(2, *hw, 3, 3, 24, seed=2)
    relu = ACTIVATIONS["ReLU"]
    want = max_pool_3x3_s2(_reference(x, kernel, bias, 2, 1, relu))
    wb = fused_dense_weights(kernel, bias)
    for impl in ("ffi", "lax"):
        got = jax.jit(
            partial(stem_conv_bias_act, kernel_size=3, stride=2, padding=1, activation="ReLU",
                    activation_fn=relu, max_pool=True, impl=impl)
        )(x, wb)  # fmt: skip
        assert got.shape == want.shape, impl
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_wrong_layout_is_a_clear_error() -> None:
    x, kernel, bias = _data(1, 4, 4, 3, 3, 8)
    with pytest.raises(ValueError, match=r"\[1, 1, 28, K\]"):
        stem_conv_bias_act(
            x, fused_dense_weights(kernel[:1], bias), 3, 1, 1, None, ACTIVATIONS[None]
        )
    with pytest.raises(ValueError, match="input channels"):
        x8 = jnp.zeros((1, 4, 4, 8))
        stem_conv_bias_act(x8, jnp.zeros((1, 1, 73, 8)), 3, 1, 1, None, ACTIVATIONS[None])
