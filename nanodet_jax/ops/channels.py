"""Channel rearrangements shared by the models and the fused inference ops."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def interleave_channels(a: jax.Array, b: jax.Array) -> jax.Array:
    """ShuffleNet's channel shuffle (2 groups) of ``concat([a, b])``: channel 2i from
    ``a``, 2i + 1 from ``b``, for each of ``b``'s channels (a wider ``a``, e.g. a whole
    block input, gives its first ones).

    Written as a stack on a new minor axis, XLA emits it as one fusion writing the result
    in the default layout; the reshape-swapaxes-reshape form left its output transposed,
    and a consumer needing the default layout (a custom call) paid a second copy."""
    a = a[..., : b.shape[-1]]
    return jnp.stack([a, b], axis=-1).reshape(*b.shape[:-1], 2 * b.shape[-1])
