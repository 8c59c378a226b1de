"""Depthwise convolution: every implementation against grouped lax.conv_general_dilated."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanodet_jax.ops import depthwise_conv2d
from nanodet_jax.ops.depthwise import ENV_VAR, depthwise_conv2d_lax

REPO = Path(__file__).resolve().parents[2]

# (N, H, W, C, K, stride, padding): K 3/5, stride 1/2, padding K//2 and 0, odd and even
# spatial sizes, channel counts that are not multiples of the vector width, batch 1 and 3.
CASES = [
    (1, 7, 9, 24, 3, 1, 1),
    (3, 8, 8, 58, 3, 2, 1),
    (1, 10, 11, 96, 5, 1, 2),
    (3, 9, 7, 193, 5, 2, 2),
    (1, 6, 6, 24, 3, 2, 0),
    (3, 7, 8, 58, 5, 1, 0),
    (3, 11, 10, 96, 3, 1, 0),
    (1, 8, 9, 193, 5, 2, 0),
    (1, 3, 4, 24, 5, 1, 2),  # smaller than the kernel: every pixel is a border pixel
    (3, 9, 8, 17, 7, 2, 3),  # K without a specialised C++ kernel (generic path)
]


def _impls(request: pytest.FixtureRequest, impl: str) -> str:
    if impl == "ffi":
        request.getfixturevalue("ffi_ok")
    return impl


def _data(case: tuple[int, ...], seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    n, h, w, c, k, s, p = case
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    kern = jnp.asarray(rng.standard_normal((k, k, 1, c)), jnp.float32)
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    g = jnp.asarray(rng.standard_normal((n, ho, wo, c)), jnp.float32)
    return x, kern, g


Conv = Callable[[jax.Array, jax.Array, int, int], jax.Array]


def _value_and_grads(
    fn: Conv, x: jax.Array, kern: jax.Array, g: jax.Array, s: int, p: int
) -> tuple[jax.Array, ...]:
    """(y, dL/dx, dL/dkernel) under jit, for the cotangent g."""

    @jax.jit
    def run(x: jax.Array, kern: jax.Array, g: jax.Array) -> tuple[jax.Array, ...]:
        y, vjp = jax.vjp(lambda x, kern: fn(x, kern, s, p), x, kern)
        return (y, *vjp(g))

    return run(x, kern, g)


def _assert_close(
    actual: jax.Array, expected: jax.Array, rtol: float = 1e-5, err_msg: str = ""
) -> None:
    expected = np.asarray(expected, np.float32)
    scale = float(np.abs(expected).max()) or 1.0
    np.testing.assert_allclose(
        np.asarray(actual, np.float32), expected, rtol=rtol, atol=rtol * scale, err_msg=err_msg
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}_{}x{}_c{}_k{}_s{}_p{}".format(*c))
@pytest.mark.parametrize("impl", ["ffi", "xla"])
def test_matches_lax(request: pytest.FixtureRequest, impl: str, case: tuple[int, ...]) -> None:
    impl = _impls(request, impl)
    x, kern, g = _data(case)
    s, p = case[5], case[6]
    ref = _value_and_grads(depthwise_conv2d_lax, x, kern, g, s, p)

    got = _value_and_grads(partial(depthwise_conv2d, impl=impl), x, kern, g, s, p)
    for name, a, b in zip(("y", "dx", "dkernel"), got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        _assert_close(a, b)


EPILOGUE_CASES = [CASES[1], CASES[3], CASES[4], CASES[9]]  # s1/s2, K 3/5/7, tails


@pytest.mark.parametrize("act", ["ReLU", "LeakyReLU", "ReLU6", "HardSwish", None])
def test_bias_act_epilogue(ffi_ok: bool, act: str | None) -> None:
    # The fused inference forward (bias + activation stored by the C++ kernel) against
    # lax's convolution followed by the same bias and activation.
    from nanodet_jax.models.layers import ACTIVATIONS
    from nanodet_jax.ops import depthwise_conv2d_bias_act
    from nanodet_jax.ops.depthwise_ffi import fused_depthwise_weights

    fn = ACTIVATIONS[act]
    for case in EPILOGUE_CASES:
        x, kern, _ = _data(case)
        s, p = case[5], case[6]
        bias = jnp.asarray(np.random.default_rng(5).normal(size=case[3]), jnp.float32)
        wb = fused_depthwise_weights(kern, bias)
        want = fn(depthwise_conv2d_lax(x, kern, s, p) + bias)
        for impl in ("ffi", "lax"):  # the C++ epilogue, and the unfused fallback
            fused = jax.jit(
                partial(depthwise_conv2d_bias_act, stride=s, padding=p, activation=act,
                        activation_fn=fn, impl=impl)
            )  # fmt: skip
            hlo = fused.lower(x, wb).as_text()
            assert ("nanodet_depthwise_fwd_fused" in hlo) == (impl == "ffi")
            got = fused(x, wb)
            assert got.shape == want.shape
            err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
            assert err < 1e-5, (case, act, impl, err)
        # vmapped over a leading axis (the kernel shared: folded into the batch)
        got_v = jax.vmap(fused, in_axes=(0, None))(jnp.stack([x, -x]), wb)
        np.testing.assert_allclose(got_v[1], fused(-x, wb), rtol=1e-6, atol=1e-6)
    # Names the epilogue does not know take the unfused path, with the same result.
    x, kern, _ = _data(CASES[0])
    bias = jnp.ones(x.shape[-1])
    silu = ACTIVATIONS["SiLU"]
    wb = fused_depthwise_weights(kern, bias)
    got = depthwise_conv2d_bias_act(x, wb, 1, 1, "SiLU", silu, impl="ffi")
    want = silu(depthwise_conv2d_lax(x, kern, 1, 1) + bias)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["ffi", "xla"])
def test_eager_and_vmap(request: pytest.FixtureRequest, impl: str) -> None:
    impl = _impls(request, impl)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 3, 8, 7, 24)), jnp.float32)
    kern = jnp.asarray(rng.standard_normal((3, 3, 1, 24)), jnp.float32)
    kerns = jnp.asarray(rng.standard_normal((2, 3, 3, 1, 24)), jnp.float32)

    def loss(f: Conv) -> Callable[[jax.Array, jax.Array], jax.Array]:
        return lambda x, k: jnp.sum(jnp.sin(f(x, k, 2, 1)))

    ours = partial(depthwise_conv2d, impl=impl)
    _assert_close(ours(x[0], kern, 2, 1), depthwise_conv2d_lax(x[0], kern, 2, 1))  # eager
    for axes, k in (((0, None), kern), ((0, 0), kerns)):
        got = jax.vmap(jax.grad(loss(ours), argnums=(0, 1)), axes)(x, k)
        ref = jax.vmap(jax.grad(loss(depthwise_conv2d_lax), argnums=(0, 1)), axes)(x, k)
        for a, b in zip(got, ref):
            _assert_close(a, b)


@pytest.mark.parametrize("impl", ["ffi", "xla", "lax"])
def test_bfloat16(request: pytest.FixtureRequest, impl: str) -> None:
    """bf16 in, bf16 out; y, dx and dkernel match the float32 reference on the same
    (bf16-rounded) inputs and cotangent to bf16 precision."""
    impl = _impls(request, impl)
    s, p = 1, 2
    x, kern, g = _data((2, 9, 9, 58, 5, s, p))
    xb, kb, gb = (a.astype(jnp.bfloat16) for a in (x, kern, g))
    got = _value_and_grads(partial(depthwise_conv2d, impl=impl), xb, kb, gb, s, p)
    ref = _value_and_grads(
        depthwise_conv2d_lax, *(a.astype(jnp.float32) for a in (xb, kb, gb)), s, p
    )
    for name, a, b in zip(("y", "dx", "dkernel"), got, ref):
        assert a.dtype == jnp.bfloat16 and a.shape == b.shape, name
        # Rounding the float32 result to bf16 costs up to 2^-8 = 0.4% (measured: 0.3%
        # of the largest value); a dropped or mis-scaled gradient is off by 50-100%.
        _assert_close(a, b, rtol=1e-2, err_msg=f"{name} ({impl})")


def test_env_var_selects_implementation(monkeypatch: pytest.MonkeyPatch, ffi_ok: bool) -> None:
    x, kern, _ = _data((1, 6, 6, 24, 3, 1, 1))

    def hlo() -> str:
        f = lambda x, k: depthwise_conv2d(x, k, 1, 1)  # fresh function: re-read env var
        return jax.jit(f).lower(x, kern).as_text()

    monkeypatch.setenv(ENV_VAR, "lax")
    assert "convolution" in hlo() and "nanodet_depthwise" not in hlo()
    monkeypatch.setenv(ENV_VAR, "xla")
    assert "convolution" not in hlo() and "nanodet_depthwise" not in hlo()
    for value in ("ffi", "auto"):
        monkeypatch.setenv(ENV_VAR, value)
        assert "nanodet_depthwise_fwd" in hlo()
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError):
        hlo()


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    full_env.pop(ENV_VAR, None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_fallback_when_build_fails(tmp_path: Path) -> None:
    # A "compiler" that always fails and an empty cache: auto must warn once and fall
    # back to the pure-XLA path with correct results, never crash.
    code = """
        import jax, jax.numpy as jnp, numpy as np
        from nanodet_jax.ops import depthwise_conv2d
        from nanodet_jax.ops.depthwise import depthwise_conv2d_lax
        x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 9, 24)), jnp.float32)
        k = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 1, 24)), jnp.float32)
        f = jax.jit(lambda x, k: depthwise_conv2d(x, k, 2, 1))
        assert "nanodet_depthwise" not in f.lower(x, k).as_text()
        np.testing.assert_allclose(f(x, k), depthwise_conv2d_lax(x, k, 2, 1), rtol=1e-5,
                                   atol=1e-5)
        depthwise_conv2d(x, k, 1, 1)  # second call: no second warning
        print("OK")
    """
    proc = _run_python(code, CXX="false", XDG_CACHE_HOME=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout
    assert proc.stderr.count("C++ FFI kernels unavailable") == 1, proc.stderr


def test_sharded_batch(ffi_ok: bool) -> None:
    # Batch sharded over 2 host devices: same values and gradients as unsharded, and the
    # compiled program must not all-gather the activations (the FFI call is opaque to
    # the partitioner; custom_partitioning makes it run per shard).
    code = """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from nanodet_jax.ops import depthwise_conv2d
        assert jax.device_count() == 2
        mesh = Mesh(np.array(jax.devices()), ("data",))
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((4, 10, 10, 58)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((5, 5, 1, 58)), jnp.float32)
        data, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        for impl in ("ffi", "xla"):
            for s in (1, 2):
                def loss(x, k):
                    y = depthwise_conv2d(jnp.tanh(x), k, s, 2, impl=impl)
                    return jnp.sum(jnp.sin(y)), y
                f = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
                sharded = jax.jit(f, in_shardings=(data, rep),
                                  out_shardings=((rep, data), (data, rep)))
                (l1, y1), (dx1, dk1) = sharded(x, k)
                (l0, y0), (dx0, dk0) = jax.jit(f)(x, k)
                for a, b in ((l1, l0), (y1, y0), (dx1, dx0), (dk1, dk0)):
                    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
                hlo = sharded.lower(x, k).compile().as_text()
                assert "all-gather" not in hlo, (impl, s)
                if impl == "ffi":
                    assert "f32[2,10,10,58]" in hlo and "nanodet_depthwise_weight_grad" in hlo
        # The fused inference forward (bias + activation in the kernel) runs per shard too.
        from nanodet_jax.ops import depthwise_conv2d_bias_act
        from nanodet_jax.ops.depthwise_ffi import fused_depthwise_weights
        wb = fused_depthwise_weights(k, jnp.asarray(rng.standard_normal(58), jnp.float32))
        relu = lambda v: jnp.maximum(v, 0)
        f = lambda x, wb: depthwise_conv2d_bias_act(x, wb, 2, 2, "ReLU", relu, impl="ffi")
        sharded = jax.jit(f, in_shardings=(data, rep), out_shardings=data)
        np.testing.assert_allclose(sharded(x, wb), jax.jit(f)(x, wb), rtol=1e-6, atol=1e-6)
        hlo = sharded.lower(x, wb).compile().as_text()
        assert "all-gather" not in hlo and "nanodet_depthwise_fwd_fused" in hlo
        print("OK")
    """
    proc = _run_python(code, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "OK" in proc.stdout
