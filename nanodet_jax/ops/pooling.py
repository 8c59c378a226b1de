"""3x3 stride-2 max pooling (NHWC), the one implementation: ShuffleNetV2's and ResNet's
stem pool in the models, and the XLA twin of the fused stem kernel's pool
(``fused_conv``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def _pool_taps(xp: jax.Array, out_hw: tuple[int, int]) -> list[jax.Array]:
    """The 9 stride-2 windows' taps of a padded input, in PyTorch's row-major scan order."""
    b, _, _, c = xp.shape
    ho, wo = out_hw
    return [
        lax.slice(xp, (0, i, j, 0), (b, i + 2 * ho - 1, j + 2 * wo - 1, c), (1, 2, 2, 1))
        for i in range(3)
        for j in range(3)
    ]


@jax.custom_vjp
def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """``nn.MaxPool2d(kernel_size=3, stride=2, padding=1)`` (padding never wins the max).

    The gradient goes to the *first* maximum of each window in row-major order, as
    PyTorch's kernel does. XLA's own gradient of ``reduce_window`` (select-and-scatter)
    is ~6x slower on CPU than this tap-wise backward. The forward is the maximum of the
    9 taps too, one fused loop: XLA:CPU's ``reduce_window`` took 1.8x its time (0.78 vs
    1.4 ms on ShuffleNetV2's 160x160x24 stem output, one thread).
    """
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    out_hw = ((x.shape[1] + 1) // 2, (x.shape[2] + 1) // 2)
    return functools.reduce(jnp.maximum, _pool_taps(xp, out_hw))


def _max_pool_fwd(x):
    y = max_pool_3x3_s2(x)
    return y, (x, y)


def _max_pool_bwd(res, g):
    x, y = res
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    claimed = jnp.zeros(y.shape, bool)
    tap_grads = []
    for tap in _pool_taps(xp, y.shape[1:3]):
        hit = (tap == y) & ~claimed  # first maximum in scan order takes the gradient
        claimed = claimed | hit
        tap_grads.append(jnp.where(hit, g, jnp.zeros_like(g)))
    # The tap extraction is linear: its transpose scatters the taps back into place.
    _, taps_vjp = jax.vjp(lambda v: _pool_taps(v, y.shape[1:3]), xp)
    (dxp,) = taps_vjp(tap_grads)
    return (dxp[:, 1:-1, 1:-1, :],)


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)
