"""The dtype our float32 code paths compute in.

Statistics, losses and head outputs are computed in float32 even for bfloat16
activations. Promoting to *at least* float32 instead of casting to float32 keeps that
exactly, while a float64 run (``jax_enable_x64`` with float64 parameters and inputs)
stays float64 end to end: ``tools/grad_precision.py`` and ``tests/test_grad_precision.py``
use such a run as the reference our float32 gradients are measured against.
"""

from __future__ import annotations

import jax.numpy as jnp


def compute_dtype(dtype) -> jnp.dtype:
    """float32 for float32 and narrower floats (and ints/bools), float64 for float64."""
    return jnp.promote_types(dtype, jnp.float32)


def at_least_f32(x):
    """``x`` cast to :func:`compute_dtype` of its dtype."""
    return x.astype(compute_dtype(x.dtype))
