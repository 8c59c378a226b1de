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
from nanodet_jax.ops.conv3x3 import (
    ENV_VAR,
    MIN_SIDE_FOR_4X4,
    conv3x3_lax,
    conv3x3_winograd,
    winograd_tile,
)

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


def _value_and_grads(conv, x: jax.Array, kern: jax.Array, g: jax.Array):
    @jax.jit
    def run(x, kern, g):
        y, vjp = jax.vjp(conv, x, kern)
        return (y, *vjp(g))

    return run(x, kern, g)


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_matches_lax(ffi_ok: bool, case: tuple[int, ...], tile: int) -> None:
    x, kern, g = _data(case)
    ours = _value_and_grads(lambda x, k: conv3x3_winograd(x, k, tile), x, kern, g)
    ref = _value_and_grads(conv3x3_lax, x, kern, g)
    # Measured (relative to the largest value): F(2x2, 3x3) <= 7.3e-7, F(4x4, 3x3)
    # <= 1.1e-5 (its larger transform coefficients); float32's own summation-order
    # differences are ~1e-6.
    tol = 3e-6 if tile == 2 else 3e-5
    for name, a, b in zip(("y", "dx", "dkernel"), ours, ref):
        assert a.shape == b.shape, name
        err = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
        assert err < tol, (name, err)


def test_tile_follows_image_size(ffi_ok: bool) -> None:
    # 4x4 output tiles from MIN_SIDE_FOR_4X4 pixels on the shorter side, 2x2 below; the
    # packed weights say which (36 or 16 points) and the weight gradient is told.
    small, large = MIN_SIDE_FOR_4X4 - 1, MIN_SIDE_FOR_4X4
    assert winograd_tile(small, 40) == 2 and winograd_tile(large, large) == 4
    for side, tile in ((small, 2), (large, 4)):
        x, kern, g = _data((1, side, side + 3, 8, 8))
        loss = lambda k, x=x, g=g: jnp.sum(conv3x3(x, k, impl="ffi") * g)  # noqa: E731
        hlo = jax.jit(jax.value_and_grad(loss)).lower(kern).as_text()
        calls = [line for line in hlo.splitlines() if "@nanodet_winograd" in line]
        forward = [c for c in calls if "@nanodet_winograd_conv3x3(" in c]
        wgrad = [c for c in calls if "@nanodet_winograd_conv3x3_weight_grad(" in c]
        assert len(forward) == 1 and len(wgrad) == 1, calls
        assert f"tensor<{(tile + 2) ** 2}x" in forward[0], forward[0]  # packed U's points
        assert f"tile = {tile} : i32" in wgrad[0], wgrad[0]
    with pytest.raises(ValueError, match="2 or 4"):
        conv3x3_winograd(x, kern, 3)


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
