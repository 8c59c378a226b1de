"""The dense 3x3 convolution: the C++ Winograd kernel against XLA's convolution."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanodet_jax.ops import conv3x3
from nanodet_jax.ops.conv3x3 import ENV_VAR, conv3x3_lax

REPO = Path(__file__).resolve().parents[2]

# (N, H, W, C, K): odd and even sizes (cropped edge tiles), channel counts that are not
# multiples of the vector width or of the output panel, a 1x1 image, the aux head's shape.
CASES = [
    (2, 13, 7, 37, 45),
    (3, 8, 8, 192, 192),
    (1, 1, 1, 5, 3),
    (2, 5, 6, 16, 33),
    (1, 10, 11, 96, 64),
    (4, 3, 2, 24, 100),
]


def _data(case: tuple[int, ...], seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    n, h, w, c, k = case
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    kern = jnp.asarray(rng.standard_normal((3, 3, c, k)) / np.sqrt(9 * c), jnp.float32)
    g = jnp.asarray(rng.standard_normal((n, h, w, k)), jnp.float32)
    return x, kern, g


def _value_and_grads(impl: str, x: jax.Array, kern: jax.Array, g: jax.Array):
    @jax.jit
    def run(x, kern, g):
        y, vjp = jax.vjp(lambda x, kern: conv3x3(x, kern, impl=impl), x, kern)
        return (y, *vjp(g))

    return run(x, kern, g)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_matches_lax(ffi_ok: bool, case: tuple[int, ...]) -> None:
    x, kern, g = _data(case)
    ours = _value_and_grads("ffi", x, kern, g)
    ref = _value_and_grads("lax", x, kern, g)
    for name, a, b in zip(("y", "dx", "dkernel"), ours, ref):
        assert a.shape == b.shape, name
        err = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
        assert err < 1e-5, (name, err)  # measured <= 3.2e-6 (Winograd rounding)


def test_program_uses_kernel_and_env_var(monkeypatch: pytest.MonkeyPatch, ffi_ok: bool) -> None:
    x, kern, _ = _data(CASES[0])

    def hlo() -> str:
        return jax.jit(lambda x, k: conv3x3(x, k)).lower(x, kern).as_text()

    def grad_hlo() -> str:
        loss = lambda k: jnp.sum(conv3x3(x, k) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss)).lower(kern).as_text()

    monkeypatch.setenv(ENV_VAR, "lax")
    assert "nanodet_winograd_conv3x3" not in hlo() + grad_hlo()
    monkeypatch.setenv(ENV_VAR, "auto")
    assert "nanodet_winograd_conv3x3" in hlo()
    assert "nanodet_winograd_conv3x3_weight_grad" in grad_hlo()
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="NANODET_JAX_CONV3X3 must be one of"):
        hlo()
    monkeypatch.setenv(ENV_VAR, "auto")
    with pytest.raises(ValueError, match="kernel"):
        conv3x3(x, kern[:, :, :5])


def test_vmap_and_bfloat16(ffi_ok: bool) -> None:
    x, kern, _ = _data((3, 6, 5, 20, 12))
    stacked = jax.vmap(lambda xi: conv3x3(xi[None], kern, impl="ffi")[0])(x)
    np.testing.assert_allclose(stacked, conv3x3_lax(x, kern), rtol=1e-5, atol=1e-5)

    # Per-example kernel gradients: the weight gradient's vmap rule maps over the examples.
    def dkernel(impl: str) -> jax.Array:
        loss = lambda k, xi: jnp.sum(jnp.sin(conv3x3(xi[None], k, impl=impl)))  # noqa: E731
        return jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(kern, x)

    np.testing.assert_allclose(dkernel("ffi"), dkernel("lax"), rtol=1e-5, atol=1e-5)
    y = conv3x3(x.astype(jnp.bfloat16), kern, impl="ffi")
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(y.astype(jnp.float32), conv3x3_lax(x, kern), rtol=0.05, atol=0.05)


def test_sharded_batch_and_fallback(ffi_ok: bool, tmp_path: Path) -> None:
    # Batch split over 2 host devices: same values and gradients, no all-gather (the FFI
    # call runs per shard). Then a failing compiler: lax, one warning, correct values.
    sharded = """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from nanodet_jax.ops import conv3x3
        mesh = Mesh(np.array(jax.devices()), ("data",))
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((4, 9, 10, 40)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((3, 3, 40, 24)) * 0.05, jnp.float32)
        data, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        def loss(x, k):
            y = conv3x3(jnp.tanh(x), k, impl="ffi")
            return jnp.sum(jnp.sin(y)), y
        f = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        split = jax.jit(f, in_shardings=(data, rep), out_shardings=((rep, data), (data, rep)))
        for a, b in zip(jax.tree.leaves(split(x, k)), jax.tree.leaves(jax.jit(f)(x, k))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
        hlo = split.lower(x, k).compile().as_text()
        assert "all-gather" not in hlo and "f32[2,9,10,40]" in hlo, hlo[-3000:]
        assert "nanodet_winograd_conv3x3" in hlo
        assert "nanodet_winograd_conv3x3_weight_grad" in hlo and "all-reduce" in hlo
        # The training 1x1 convolution's C++ weight gradient, per shard and summed.
        from nanodet_jax.ops import conv1x1
        k1 = jnp.asarray(rng.standard_normal((1, 1, 40, 24)) * 0.1, jnp.float32)
        def loss1(x, k):
            y = conv1x1(jnp.tanh(x), k, impl="ffi")
            return jnp.sum(jnp.sin(y)), y
        f = jax.value_and_grad(loss1, argnums=(0, 1), has_aux=True)
        split = jax.jit(f, in_shardings=(data, rep), out_shardings=((rep, data), (data, rep)))
        for a, b in zip(jax.tree.leaves(split(x, k1)), jax.tree.leaves(jax.jit(f)(x, k1))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
        hlo = split.lower(x, k1).compile().as_text()
        assert "all-gather" not in hlo and "nanodet_pointwise_weight_grad" in hlo
        assert "all-reduce" in hlo
        print("OK")
    """
    fallback = """
        import jax, jax.numpy as jnp, numpy as np
        from nanodet_jax.ops import conv3x3
        from nanodet_jax.ops.conv3x3 import conv3x3_lax
        x = jnp.ones((1, 5, 5, 8)); k = jnp.full((3, 3, 8, 4), 0.1)
        f = jax.jit(lambda x, k: conv3x3(x, k))
        assert "nanodet_winograd" not in f.lower(x, k).as_text()
        np.testing.assert_allclose(f(x, k), conv3x3_lax(x, k), rtol=1e-6)
        conv3x3(x, k)
        print("OK")
    """
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(ENV_VAR, None)
    runs = [
        (sharded, {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}),
        (fallback, {"CXX": "false", "XDG_CACHE_HOME": str(tmp_path)}),
    ]
    for code, extra in runs:
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                              env={**env, **extra}, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]
    assert proc.stderr.count("C++ FFI kernels unavailable") == 1, proc.stderr
