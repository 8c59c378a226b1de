"""Weight averaging of the training state, selected by ``model.weight_averager.name``.

NanoDet's ``ExpMovingAverager`` averages parameters *and* BatchNorm statistics with an
iteration-dependent weight; evaluation and the best checkpoint use the average.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nanodet_jax.registry import Registry


def ema_decay(iteration: Any, decay: float = 0.9998) -> Any:
    """NanoDet's ExpMovingAverager weight of the *new* value at an iteration (1-based)."""
    return decay * jnp.exp(-(1.0 + iteration) / 2000.0) + (1.0 - decay)


def update_ema(ema: nnx.State, current: nnx.State, iteration: jax.Array, decay: float) -> nnx.State:
    """``ema = ema * (1 - d) + current * d`` with NanoDet's iteration-dependent ``d``.

    Integer buffers (``num_batches_tracked``) are averaged in float and truncated, as
    PyTorch's in-place ``copy_`` into an int64 tensor does. RNG state (the dropout /
    drop-connect streams of TAN and EfficientNet-Lite) is not a weight: a PRNG key
    cannot be averaged, so the average carries the current model's.
    """
    d = ema_decay(iteration.astype(jnp.float32), decay)

    def mix(e, c):
        if isinstance(e, nnx.RngState):
            return c
        if jnp.issubdtype(e.dtype, jnp.integer):
            return jnp.trunc(e.astype(jnp.float32) * (1 - d) + c.astype(jnp.float32) * d).astype(
                e.dtype
            )
        return (e * (1 - d) + c * d).astype(e.dtype)

    return jax.tree.map(mix, ema, current, is_leaf=lambda x: isinstance(x, nnx.RngState))


WEIGHT_AVERAGERS = Registry("model.weight_averager", {"ExpMovingAverager": update_ema})
