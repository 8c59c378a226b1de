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
from nanodet_jax.ops.epilogue import EPILOGUE_ACTIVATIONS, LEAKY_RELU_SLOPE
from nanodet_jax.ops.ffi_build import load  # noqa: F401 - re-exported for callers

_TARGET_FWD = "nanodet_depthwise_fwd"
_TARGET_DX = "nanodet_depthwise_input_grad"
_TARGET_DW = "nanodet_depthwise_weight_grad"
_TARGET_FUSED = "nanodet_depthwise_fwd_fused"
MAX_KERNEL = 7  # largest K the C++ kernels accept (fast paths for K in {1, 3, 5})


def _raw(target: str, **attrs: np.generic) -> RawOp:
    """The call of ``target`` with its stride and padding and any further ``attrs``."""

    def call(
        a: jax.Array, b: jax.Array, out_shape: tuple[int, ...], stride: int, padding: int
    ) -> jax.Array:
        ffi = jax.ffi.ffi_call(
            target, jax.ShapeDtypeStruct(out_shape, jnp.float32), vmap_method="sequential"
        )
        return ffi(a, b, stride=np.int64(stride), padding=np.int64(padding), **attrs)

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


def fused_depthwise_weights(kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """[K, K, 1, C] kernel and [C] bias as the fused forward's [K*K + 1, 1, 1, C] operand."""
    k, _, _, c = kernel.shape
    return jnp.concatenate([kernel.reshape(k * k, 1, 1, c), bias.reshape(1, 1, 1, c)], axis=0)


def fused_kernel_size(wb: jax.Array) -> int:
    k = int(round((wb.shape[0] - 1) ** 0.5))
    if k * k + 1 != wb.shape[0] or wb.shape[1:3] != (1, 1):
        raise ValueError(f"fused depthwise weights must be [K*K + 1, 1, 1, C], got {wb.shape}")
    return k


# One op per activation code (a static attribute of the call).
_fused_ops = {
    code: batch_parallel(
        _raw(_TARGET_FUSED, activation=np.int64(code), slope=np.float32(LEAKY_RELU_SLOPE)),
        reduce_batch=False,
    )
    for code in sorted(set(EPILOGUE_ACTIVATIONS.values()))
}


def forward_bias_act(
    x: jax.Array, wb: jax.Array, stride: int, padding: int, activation: str | None
) -> jax.Array:
    """``activation(depthwise(x, w) + bias)`` in one pass (inference: no gradient), float32.

    ``wb`` is [K*K + 1, 1, 1, C]: the kernel's K*K taps followed by the bias
    (``fused_depthwise_weights``); ``activation`` a key of ``EPILOGUE_ACTIVATIONS``."""
    n, h, wd, c = x.shape
    k = fused_kernel_size(wb)
    shape = (n, out_size(h, k, stride, padding), out_size(wd, k, stride, padding), c)
    op = _fused_ops[EPILOGUE_ACTIVATIONS[activation]]
    return batchable(op, shape, stride, padding, fold=True)(
        x.astype(jnp.float32), wb.astype(jnp.float32)
    )


# Depthwise conv through the C++ kernels; call :func:`load` first (CPU only).
depthwise_conv2d_ffi = float32_depthwise(forward, input_grad, weight_grad)
