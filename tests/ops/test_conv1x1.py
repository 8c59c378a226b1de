"""The training 1x1 convolution: the C++ weight gradient against XLA's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanodet_jax.ops import conv1x1

# (N, H, W, C, K): channel counts off the register tile (12 rows x 32 lanes), pixel counts
# off the 128-pixel blocks, one pixel, NanoDet-Plus-m's shapes.
CASES = [(2, 5, 7, 13, 37), (1, 1, 1, 3, 5), (3, 9, 8, 58, 58), (2, 10, 10, 96, 112)]


def _grads(impl: str, x, k, g):
    @jax.jit
    def run(x, k, g):
        y, vjp = jax.vjp(lambda x, k: conv1x1(x, k, impl=impl), x, k)
        return (y, *vjp(g))

    return run(x, k, g)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_matches_lax(ffi_ok: bool, case: tuple[int, ...]) -> None:
    n, h, w, c, k = case
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    kern = jnp.asarray(rng.standard_normal((1, 1, c, k)) / np.sqrt(c), jnp.float32)
    g = jnp.asarray(rng.standard_normal((n, h, w, k)), jnp.float32)
    ours, ref = _grads("ffi", x, kern, g), _grads("lax", x, kern, g)
    for name, a, b in zip(("y", "dx", "dkernel"), ours, ref):
        assert a.shape == b.shape, name
        err = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
        assert err < 1e-5, (name, err)
    hlo = jax.jit(lambda x, k, g: jax.vjp(lambda k: conv1x1(x, k, impl="ffi"), k)[1](g))
    assert "nanodet_pointwise_weight_grad" in hlo.lower(x, kern, g).as_text()


def test_per_example_gradients_under_vmap(ffi_ok: bool) -> None:
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 2, 4, 5, 16)), jnp.float32)
    kern = jnp.asarray(rng.standard_normal((1, 1, 16, 24)), jnp.float32)

    def per_example(impl):
        f = lambda x: jax.grad(lambda k: jnp.sum(jnp.sin(conv1x1(x, k, impl=impl))))(kern)  # noqa: E731
        return jax.jit(jax.vmap(f))(x)

    np.testing.assert_allclose(per_example("ffi"), per_example("lax"), rtol=1e-5, atol=1e-5)
