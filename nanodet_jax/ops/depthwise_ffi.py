"""Call the C++ XLA FFI depthwise-convolution kernels (``csrc/depthwise.cc``, XLA:CPU only).

:func:`load` builds and registers them (``ffi_build``); if that fails callers fall back to
the pure-XLA implementation.

An FFI custom call is opaque to the SPMD partitioner, which would all-gather a
batch-sharded input; each kernel call is therefore wrapped with ``batch_parallel``
(``custom_partitioning``: run per batch/channel shard, ``psum`` the weight gradient) and
``batchable`` (``custom_vmap``, since ``custom_partitioning`` has no batching rule), both
from ``depthwise_xla``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nanodet_jax.ops.depthwise_xla import (
    RawOp,
    batch_parallel,
    batchable,
    float32_depthwise,
    out_size,
)
from nanodet_jax.ops.ffi_build import load  # noqa: F401 - re-exported for callers

_TARGET_FWD = "nanodet_depthwise_fwd"
_TARGET_DX = "nanodet_depthwise_input_grad"
_TARGET_DW = "nanodet_depthwise_weight_grad"
MAX_KERNEL = 7  # largest K the C++ kernels accept (fast paths for K in {1, 3, 5})


def _raw(target: str) -> RawOp:
    def call(
        a: jax.Array, b: jax.Array, out_shape: tuple[int, ...], stride: int, padding: int
    ) -> jax.Array:
        ffi = jax.ffi.ffi_call(
            target, jax.ShapeDtypeStruct(out_shape, jnp.float32), vmap_method="sequential"
        )
        return ffi(a, b, stride=np.int64(stride), padding=np.int64(padding))

    return call


_fwd_op = batch_parallel(_raw(_TARGET_FWD), reduce_batch=False)
_dx_op = batch_parallel(_raw(_TARGET_DX), reduce_batch=False)
_dw_op = batch_parallel(_raw(_TARGET_DW), reduce_batch=True)


def forward(x: jax.Array, w: jax.Array, stride: int, padding: int) -> jax.Array:
    """FFI forward on float32 NHWC ``x`` and [K, K, 1, C] ``w``."""
    n, h, wd, c = x.shape
    k = w.shape[0]
    shape = (n, out_size(h, k, stride, padding), out_size(wd, k, stride, padding), c)
    return batchable(_fwd_op, shape, stride, padding, fold=True)(x, w)


def input_grad(
    g: jax.Array, w: jax.Array, stride: int, padding: int, in_hw: tuple[int, int]
) -> jax.Array:
    shape = (g.shape[0], *in_hw, g.shape[3])
    return batchable(_dx_op, shape, stride, padding, fold=True)(g, w)


def weight_grad(x: jax.Array, g: jax.Array, k: int, stride: int, padding: int) -> jax.Array:
    shape = (k, k, 1, x.shape[3])
    return batchable(_dw_op, shape, stride, padding, fold=False)(x, g)


# Depthwise conv through the C++ kernels; call :func:`load` first (CPU only).
depthwise_conv2d_ffi = float32_depthwise(forward, input_grad, weight_grad)
