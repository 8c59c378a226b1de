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


# (N, H, W, C, K, passthrough channels): full panels, tails of n < 8, 8 <= n < 16 and
# 16 + n lanes, row tails; a passthrough wider than K (a whole block input).
INTERLEAVED = [(2, 5, 7, 24, 58, 116), (1, 3, 3, 8, 5, 5), (3, 4, 5, 40, 33, 40),
               (1, 1, 13, 16, 20, 20), (2, 6, 6, 58, 64, 64)]  # fmt: skip


@pytest.mark.parametrize("act", ["LeakyReLU", "ReLU", "SiLU"])
def test_pointwise_stores_the_channel_shuffle(ffi_ok: bool, act: str) -> None:
    # interleave_with p: channel 2i of the output is p's channel i, 2i + 1 the conv's.
    from nanodet_jax.ops.channels import interleave_channels

    fn = ACTIVATIONS[act]
    for case in INTERLEAVED:
        n, h, w, c, k, cp = case
        x, kernel, bias = _data(n, h, w, c, 1, k, seed=3)
        p = jnp.asarray(np.random.default_rng(4).standard_normal((n, h, w, cp)), jnp.float32)
        wb = fused_dense_weights(kernel, bias)
        want = interleave_channels(p[..., :k], _reference(x, kernel, bias, 1, 0, fn))
        assert want.shape == (n, h, w, 2 * k)
        for impl in ("ffi", "lax"):
            f = jax.jit(partial(pointwise_conv_bias_act, activation=act, activation_fn=fn,
                                impl=impl))  # fmt: skip
            got = f(x, wb, interleave_with=p)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{case} {impl}")
            hlo = f.lower(x, wb, interleave_with=p).as_text()
            fused = impl == "ffi" and act in ("LeakyReLU", "ReLU")  # SiLU: XLA after the kernel
            assert ("nanodet_pointwise_bias_act_interleave" in hlo) == fused, (case, impl)
    # vmap over the input alone, the passthrough alone, and both.
    g = jax.jit(lambda x, p: f(x, wb, interleave_with=p))
    xs, ps = jnp.stack([x, 2 * x]), jnp.stack([p, -p])
    for axes, args in (((0, None), (xs, p)), ((None, 0), (x, ps)), ((0, 0), (xs, ps))):
        got = jax.vmap(g, in_axes=axes)(*args)
        for i in range(2):
            xi, pi = (a[i] if ax == 0 else a for a, ax in zip(args, axes))
            np.testing.assert_allclose(got[i], g(xi, pi), rtol=1e-6, atol=1e-6, err_msg=axes)
    with pytest.raises(ValueError, match="passthrough"):
        pointwise_conv_bias_act(x, wb, act, fn, interleave_with=p[..., : k - 1])
    # Past INTERLEAVE_MAX_BYTES of output: the plain kernel, then XLA's shuffle.
    wb = jnp.zeros((1, 1, 59, 58))
    f = jax.jit(partial(pointwise_conv_bias_act, activation=act, activation_fn=fn, impl="ffi"))
    for shape, fused in (((8, 40, 40, 58), act != "SiLU"), ((16, 40, 40, 58), False)):
        big = jax.ShapeDtypeStruct(shape, jnp.float32)
        hlo = f.lower(big, wb, interleave_with=big).as_text()
        assert ("nanodet_pointwise_bias_act_interleave" in hlo) == fused, shape
        assert "nanodet_pointwise_bias_act" in hlo


def test_interleaved_pointwise_runs_per_batch_shard(ffi_ok: bool) -> None:
    from tests.ops.test_depthwise import _run_python

    code = """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from nanodet_jax.ops import pointwise_conv_bias_act
        assert jax.device_count() == 2
        mesh = Mesh(np.array(jax.devices()), ("data",))
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((4, 6, 6, 24)), jnp.float32)
        p = jnp.asarray(rng.standard_normal((4, 6, 6, 40)), jnp.float32)
        wb = jnp.asarray(rng.standard_normal((1, 1, 25, 20)), jnp.float32)
        relu = lambda v: jnp.maximum(v, 0)
        f = lambda x, wb, p: pointwise_conv_bias_act(x, wb, "ReLU", relu, interleave_with=p,
                                                     impl="ffi")
        data, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        sharded = jax.jit(f, in_shardings=(data, rep, data), out_shardings=data)
        np.testing.assert_allclose(sharded(x, wb, p), jax.jit(f)(x, wb, p), rtol=1e-6)
        hlo = sharded.lower(x, wb, p).compile().as_text()
        assert "all-gather" not in hlo and "nanodet_pointwise_bias_act_interleave" in hlo
        assert "f32[2,6,6,40]" in hlo
        print("OK")
    """
    proc = _run_python(code, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "OK" in proc.stdout


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
