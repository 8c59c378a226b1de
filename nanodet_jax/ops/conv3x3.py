"""Dense 3x3 convolution, stride 1, padding 1 (NHWC input, HWIO kernel).

These are the aux head's convolutions (SimpleConvHead: eight 192-channel layers on every
pyramid level), ~85% of a NanoDet-Plus training step's FLOPs. Implementations, picked per
call by ``impl`` or the ``NANODET_JAX_CONV3X3`` environment variable (read at trace time):

* ``auto`` (default): on CPU the C++ Winograd F(2x2, 3x3) kernels (2.25x fewer
  multiplies; each ~2x faster than XLA's convolution here) for the forward and the input
  gradient (``csrc/winograd.cc``) and the weight gradient (``csrc/winograd_wgrad.cc``) if
  they can be built, else ``lax``; on GPU/TPU ``lax`` (cuDNN and the TPU compiler choose
  their own algorithms).
* ``ffi``: the Winograd kernels on CPU (raises if they cannot be built), ``lax`` elsewhere.
* ``lax``: ``lax.conv_general_dilated`` everywhere.

Winograd rounds differently from direct convolution: ~1e-6 relative on NanoDet's
activations, the size of float32 summation-order differences (tests/ops/test_conv3x3.py).
The weight gradient reduces over the batch: under a batch-sharded ``jit`` each shard
computes a partial [3, 3, C, K] gradient and the shards' parts are summed (``psum``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from nanodet_jax.ops import ffi_build
from nanodet_jax.ops.depthwise_xla import batch_parallel, batchable

ENV_VAR = "NANODET_JAX_CONV3X3"
IMPLS = ("auto", "ffi", "lax")
_TARGET = "nanodet_winograd_conv3x3"
_WGRAD_TARGET = "nanodet_winograd_conv3x3_weight_grad"


def conv3x3_lax(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Reference: XLA's convolution."""
    return lax.conv_general_dilated(
        x,
        kernel.astype(x.dtype),
        window_strides=(1, 1),
        padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def _g_transform(w: jax.Array, axis: int) -> jax.Array:
    """G w along ``axis`` (3 taps -> 4), G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1]."""
    w0, w1, w2 = (lax.index_in_dim(w, i, axis, keepdims=False) for i in range(3))
    half = 0.5 * (w0 + w2)
    return jnp.stack([w0, half + 0.5 * w1, half - 0.5 * w1, w2], axis)


def pack_weights(kernel: jax.Array) -> jax.Array:
    """Winograd-transformed [3, 3, C, K] kernel in the C++ kernel's panel layout
    [16, ceil(K / NR), Cp, NR] (zero padded; NR and the alignment of Cp are the build's)."""
    lib = ffi_build.library()
    nr, align = int(lib.NanodetWinogradPanelWidth()), int(lib.NanodetWinogradChannelAlign())
    c, k = kernel.shape[2:]
    cp, kp = -(-c // align) * align, -(-k // nr) * nr
    u = _g_transform(_g_transform(kernel, 0), 1).reshape(16, c, k)
    u = jnp.pad(u, ((0, 0), (0, cp - c), (0, kp - k)))
    return u.reshape(16, cp, kp // nr, nr).transpose(0, 2, 1, 3)


def _raw(x: jax.Array, u: jax.Array, out_shape: tuple[int, ...], *_: int) -> jax.Array:
    out = jax.ShapeDtypeStruct(out_shape, jnp.float32)
    return jax.ffi.ffi_call(_TARGET, out, vmap_method="sequential")(x, u)


_winograd_op = batch_parallel(_raw, reduce_batch=False, dense=True)


def _winograd(x: jax.Array, kernel: jax.Array) -> jax.Array:
    shape = (*x.shape[:3], kernel.shape[3])
    return batchable(_winograd_op, shape, 1, 1, fold=True)(x, pack_weights(kernel))


def _raw_wgrad(x: jax.Array, g: jax.Array, out_shape: tuple[int, ...], *_: int) -> jax.Array:
    out = jax.ShapeDtypeStruct(out_shape, jnp.float32)
    return jax.ffi.ffi_call(_WGRAD_TARGET, out, vmap_method="sequential")(x, g)


# Per batch shard a partial [3, 3, C, K] gradient, psummed over the shards.
_wgrad_op = batch_parallel(_raw_wgrad, reduce_batch=True, dense=True)


def _winograd_weight_grad(x: jax.Array, g: jax.Array) -> jax.Array:
    shape = (3, 3, x.shape[3], g.shape[3])
    return batchable(_wgrad_op, shape, 1, 1, fold=False)(x, g)


@jax.custom_vjp
def _conv_f32(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return _winograd(x, kernel)


def _conv_fwd(x: jax.Array, kernel: jax.Array):
    return _winograd(x, kernel), (x, kernel)


def _conv_bwd(res, g):
    x, kernel = res
    # dx is the 'same' convolution of g with the kernel flipped and its channels swapped.
    dx = _winograd(g, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))
    return dx, _winograd_weight_grad(x, g)


_conv_f32.defvjp(_conv_fwd, _conv_bwd)


def conv3x3_winograd(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The C++ Winograd kernel (CPU only; call ``ffi_build.load()`` first), in float32."""
    return _conv_f32(x.astype(jnp.float32), kernel.astype(jnp.float32)).astype(x.dtype)


def conv3x3(x: jax.Array, kernel: jax.Array, *, impl: str | None = None) -> jax.Array:
    """y[b, i, j, k] = sum_{u, v, c} xpad[b, i + u, j + v, c] * kernel[u, v, c, k].

    Args:
      x: [N, H, W, C] activations.
      kernel: [3, 3, C, K].
      impl: one of ``IMPLS``; default from ``$NANODET_JAX_CONV3X3``, else ``auto``.

    Returns:
      [N, H, W, K] in the dtype of ``x``.
    """
    if x.ndim != 4 or kernel.shape[:3] != (3, 3, x.shape[-1]):
        raise ValueError(f"expected x [N, H, W, C] and kernel [3, 3, C, K], got "
                         f"{x.shape} and {kernel.shape}")  # fmt: skip
    # Only pay for building the kernels when CPU is the default backend (as depthwise).
    use_ffi = ffi_build.wants_kernels(impl, ENV_VAR, IMPLS)
    if not use_ffi or x.dtype == jnp.float64:  # Winograd is float32-only
        return conv3x3_lax(x, kernel)
    return lax.platform_dependent(x, kernel, cpu=conv3x3_winograd, default=conv3x3_lax)
