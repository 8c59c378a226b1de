"""1x1 convolution, stride 1, no padding (NHWC input, HWIO kernel), for training.

The forward and the input gradient are XLA's (a dot over the channels either way). The
weight gradient ``dw[c, k] = sum_p x[p, c] g[p, k]`` is XLA's convolution with the batch
as feature dimension, for which XLA first transposes both activations: ~8% of a
NanoDet-Plus training step on CPU. Implementations, picked per call by ``impl`` or the
``NANODET_JAX_CONV1X1`` environment variable (read at trace time):

* ``auto`` (default): on CPU the weight gradient by the C++ kernel
  (``csrc/pointwise_wgrad.cc``, reading the activations as stored; 1.4-6x XLA's on
  NanoDet-Plus-m's shapes) if it can be built; elsewhere XLA's.
* ``ffi``: the C++ weight gradient on CPU (raises if it cannot be built).
* ``lax``: XLA throughout.

Its float32 sums run in blocks of 128 pixels per worker, so the rounding differs from
XLA's by ~1e-6 relative (tests/ops/test_conv1x1.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from nanodet_jax.ops import ffi_build
from nanodet_jax.ops.depthwise_xla import batch_parallel, batchable

ENV_VAR = "NANODET_JAX_CONV1X1"
IMPLS = ("auto", "ffi", "lax")
_TARGET = "nanodet_pointwise_weight_grad"


def conv1x1_lax(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Reference: XLA's convolution."""
    return lax.conv_general_dilated(
        x, kernel.astype(x.dtype), (1, 1), ((0, 0), (0, 0)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # fmt: skip


def _raw(x: jax.Array, g: jax.Array, out_shape: tuple[int, ...], *_: int) -> jax.Array:
    out = jax.ShapeDtypeStruct(out_shape, jnp.float32)
    return jax.ffi.ffi_call(_TARGET, out, vmap_method="sequential")(x, g)


# Sharded batch: each shard's partial dw, summed over the batch axes (psum).
_weight_grad_op = batch_parallel(_raw, reduce_batch=True, dense=True)


@jax.custom_vjp
def _conv_f32(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return conv1x1_lax(x, kernel)


def _conv_fwd(x: jax.Array, kernel: jax.Array):
    return conv1x1_lax(x, kernel), (x, kernel)


def _conv_bwd(res, g):
    x, kernel = res
    dx = conv1x1_lax(g, kernel.transpose(0, 1, 3, 2))  # g . W^T
    dw = batchable(_weight_grad_op, kernel.shape, 1, 0, fold=False)(x, g)
    return dx, dw


_conv_f32.defvjp(_conv_fwd, _conv_bwd)


def conv1x1_ffi(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """XLA's 1x1 convolution with the C++ weight gradient (CPU only; call
    ``ffi_build.load()`` first), in float32."""
    return _conv_f32(x.astype(jnp.float32), kernel.astype(jnp.float32)).astype(x.dtype)


def conv1x1(x: jax.Array, kernel: jax.Array, *, impl: str | None = None) -> jax.Array:
    """y[b, i, j, k] = sum_c x[b, i, j, c] * kernel[0, 0, c, k].

    Args:
      x: [N, H, W, C] activations.
      kernel: [1, 1, C, K].
      impl: one of ``IMPLS``; default from ``$NANODET_JAX_CONV1X1``, else ``auto``.

    Returns:
      [N, H, W, K] in the dtype of ``x``.
    """
    if x.ndim != 4 or kernel.shape[:3] != (1, 1, x.shape[-1]):
        raise ValueError(f"expected x [N, H, W, C] and kernel [1, 1, C, K], got "
                         f"{x.shape} and {kernel.shape}")  # fmt: skip
    use_ffi = ffi_build.wants_kernels(impl, ENV_VAR, IMPLS)
    # bfloat16 training keeps XLA's own gradient (the kernel is float32-only), as float64.
    if not use_ffi or x.dtype != jnp.float32:
        return conv1x1_lax(x, kernel)
    return lax.platform_dependent(x, kernel, cpu=conv1x1_ffi, default=conv1x1_lax)
