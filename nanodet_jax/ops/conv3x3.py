"""Dense 3x3 convolution, stride 1, padding 1 (NHWC input, HWIO kernel).

These are the aux head's convolutions (SimpleConvHead: eight 192-channel layers on every
pyramid level), ~85% of a NanoDet-Plus training step's FLOPs. Implementations, picked per
call by ``impl`` or the ``NANODET_JAX_CONV3X3`` environment variable (read at trace time):

* ``auto`` (default): on CPU the C++ Winograd kernels for the forward and the input
  gradient (``csrc/winograd.cc``) and the weight gradient (``csrc/winograd_wgrad.cc``) if
  they can be built, else ``lax``; on GPU/TPU ``lax`` (cuDNN and the TPU compiler choose
  their own algorithms). Images of at least ``MIN_SIDE_FOR_4X4`` pixels a side use
  F(4x4, 3x3) (4x fewer multiplies than direct convolution), smaller ones F(2x2, 3x3)
  (2.25x fewer; a 4x4 tile would be mostly padding).
* ``ffi``: the Winograd kernels on CPU (raises if they cannot be built), ``lax`` elsewhere.
* ``lax``: ``lax.conv_general_dilated`` everywhere.

Winograd rounds differently from direct convolution (relative to the largest value,
tests/ops/test_conv3x3.py): F(2x2, 3x3) <= 7e-7, the size of float32 summation-order
differences; F(4x4, 3x3) <= 1.1e-5, from its larger transform coefficients.
The weight gradient reduces over the batch: under a batch-sharded ``jit`` each shard
computes a partial [3, 3, C, K] gradient and the shards' parts are summed (``psum``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nanodet_jax.ops import ffi_build
from nanodet_jax.ops.depthwise_xla import batch_parallel, batchable

ENV_VAR = "NANODET_JAX_CONV3X3"
IMPLS = ("auto", "ffi", "lax")
_TARGET = "nanodet_winograd_conv3x3"
_WGRAD_TARGET = "nanodet_winograd_conv3x3_weight_grad"
# Images at least this many pixels on their shorter side use 4x4 output tiles. Measured
# (benchmarks/conv3x3.py --tiles, batch 16, 192 channels): 4x4 is faster at 40x40 and
# 20x20, slower at 10x10 and 5x5 (12x12 / 8x8 of tiles for 100 / 25 pixels).
MIN_SIDE_FOR_4X4 = 16


def conv3x3_lax(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Reference: XLA's convolution."""
    return lax.conv_general_dilated(
        x,
        kernel.astype(x.dtype),
        window_strides=(1, 1),
        padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


# G of F(m x m, 3 x 3) per output tile side m (csrc/winograd.h has all the matrices).
_G = {
    2: np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32),
    4: np.array(
        [
            [1 / 4, 0, 0],
            [-1 / 6, -1 / 6, -1 / 6],
            [-1 / 6, 1 / 6, -1 / 6],
            [1 / 24, 1 / 12, 1 / 6],
            [1 / 24, -1 / 12, 1 / 6],
            [0, 0, 1],
        ],
        np.float32,
    ),
}


def winograd_tile(height: int, width: int) -> int:
    """Output tile side for an image: 4x4 tiles (1.78x fewer multiplies than 2x2) unless
    the image is so small that most of a 4x4 tile would be padding."""
    return 4 if min(height, width) >= MIN_SIDE_FOR_4X4 else 2


def _g_transform(w: jax.Array, axis: int, g: np.ndarray) -> jax.Array:
    """G w along ``axis`` (3 taps -> tile + 2), as weighted sums of the taps: ~10x faster
    on CPU than the same product written as a dot."""
    taps = [lax.index_in_dim(w, i, axis, keepdims=False) for i in range(3)]
    rows = [sum(float(c) * t for c, t in zip(row, taps) if c != 0) for row in g]
    return jnp.stack(rows, axis)


def pack_weights(kernel: jax.Array, tile: int = 2) -> jax.Array:
    """Winograd-transformed [3, 3, C, K] kernel, U = G w G^T, in the C++ kernel's panel
    layout [(tile + 2)^2, ceil(K / NR), Cp, NR] (zero padded; NR and the alignment of Cp
    are the build's)."""
    lib = ffi_build.library()
    nr, align = int(lib.NanodetWinogradPanelWidth()), int(lib.NanodetWinogradChannelAlign())
    c, k = kernel.shape[2:]
    cp, kp = -(-c // align) * align, -(-k // nr) * nr
    points = _G[tile].shape[0] ** 2
    u = _g_transform(_g_transform(kernel, 0, _G[tile]), 1, _G[tile])
    u = jnp.pad(u.reshape(points, c, k), ((0, 0), (0, cp - c), (0, kp - k)))
    return u.reshape(points, cp, kp // nr, nr).transpose(0, 2, 1, 3)


def _raw(x: jax.Array, u: jax.Array, out_shape: tuple[int, ...], *_: int) -> jax.Array:
    out = jax.ShapeDtypeStruct(out_shape, jnp.float32)
    return jax.ffi.ffi_call(_TARGET, out, vmap_method="sequential")(x, u)


_winograd_op = batch_parallel(_raw, reduce_batch=False, dense=True)


def _winograd(x: jax.Array, kernel: jax.Array, tile: int) -> jax.Array:
    shape = (*x.shape[:3], kernel.shape[3])
    return batchable(_winograd_op, shape, 1, 1, fold=True)(x, pack_weights(kernel, tile))


def _raw_wgrad(
    x: jax.Array, g: jax.Array, out_shape: tuple[int, ...], tile: int, *_: int
) -> jax.Array:
    out = jax.ShapeDtypeStruct(out_shape, jnp.float32)
    call = jax.ffi.ffi_call(_WGRAD_TARGET, out, vmap_method="sequential")
    return call(x, g, tile=np.int32(tile))


# Per batch shard a partial [3, 3, C, K] gradient, psummed over the shards. The tile side
# travels in the op's (otherwise unused) stride slot, a static argument.
_wgrad_op = batch_parallel(_raw_wgrad, reduce_batch=True, dense=True)


def _winograd_weight_grad(x: jax.Array, g: jax.Array, tile: int) -> jax.Array:
    shape = (3, 3, x.shape[3], g.shape[3])
    return batchable(_wgrad_op, shape, tile, 1, fold=False)(x, g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_f32(x: jax.Array, kernel: jax.Array, tile: int) -> jax.Array:
    return _winograd(x, kernel, tile)


def _conv_fwd(x: jax.Array, kernel: jax.Array, tile: int):
    return _winograd(x, kernel, tile), (x, kernel)


def _conv_bwd(tile: int, res, g):
    x, kernel = res
    # dx is the 'same' convolution of g with the kernel flipped and its channels swapped.
    dx = _winograd(g, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2), tile)
    return dx, _winograd_weight_grad(x, g, tile)


_conv_f32.defvjp(_conv_fwd, _conv_bwd)


def conv3x3_winograd(x: jax.Array, kernel: jax.Array, tile: int | None = None) -> jax.Array:
    """The C++ Winograd kernels (CPU only; call ``ffi_build.load()`` first), in float32.
    ``tile``: the output tile side, 2 or 4 (default ``winograd_tile`` of the image)."""
    if tile is None:
        tile = winograd_tile(*x.shape[1:3])
    if tile not in _G:
        raise ValueError(f"Winograd tile side must be 2 or 4, got {tile}")
    return _conv_f32(x.astype(jnp.float32), kernel.astype(jnp.float32), tile).astype(x.dtype)


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
