"""Dense convolutions with bias and activation fused, for inference (NHWC input).

BatchNorm folding (``models/batchnorm_folding.py``) gives these convolutions a bias and
moves the activation after the norm into them; the ops here run the three as one:

* :func:`pointwise_conv_bias_act`: 1x1, stride 1 (``csrc/pointwise.cc``, a GEMM whose
  register tiles store through the epilogue), optionally storing its output interleaved
  with a passthrough tensor (ShuffleNetV2's channel shuffle, ``interleave_with``);
* :func:`stem_conv_bias_act`: a backbone's first convolution, on the RGB image (few input
  channels; ``csrc/stem.cc``). XLA:CPU's convolution runs it at ~13 GFLOP/s, the C++
  kernel 3-6x faster (docs/benchmarks.md); ShuffleNetV2's max pool after it can run in
  the same kernel.

Both take the weights as one [1, 1, R*R*C + 1, K] array, the HWIO kernel's rows followed
by the bias (:func:`fused_dense_weights`). Implementations, picked per call by ``impl``
or the ``NANODET_JAX_FUSED_CONV`` environment variable (read at trace time):

* ``auto`` (default): on CPU the C++ kernels if they can be built, else ``lax``; on
  GPU/TPU ``lax``.
* ``ffi``: the C++ kernels on CPU (raises if they cannot be built), ``lax`` elsewhere.
* ``lax``: XLA's convolution, bias and activation.

The C++ path has no gradient: the fused weights exist only in folded inference copies.
An activation the epilogue does not know (``EPILOGUE_ACTIVATIONS``) is applied by XLA
after the kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nanodet_jax.ops import ffi_build
from nanodet_jax.ops.channels import interleave_channels
from nanodet_jax.ops.depthwise_xla import RawOp, batch_parallel, batchable, out_size
from nanodet_jax.ops.epilogue import EPILOGUE_ACTIVATIONS, LEAKY_RELU_SLOPE
from nanodet_jax.ops.pooling import max_pool_3x3_s2

ENV_VAR = "NANODET_JAX_FUSED_CONV"
IMPLS = ("auto", "ffi", "lax")
Activation = Callable[[jax.Array], jax.Array]


def fused_dense_weights(kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """[R, R, C, K] kernel and [K] bias as the fused ops' [1, 1, R*R*C + 1, K] operand."""
    k = kernel.shape[-1]
    return jnp.concatenate([kernel.reshape(1, 1, -1, k), bias.reshape(1, 1, 1, k)], axis=2)


def _split(wb: jax.Array, c: int, r: int) -> tuple[jax.Array, jax.Array]:
    rows = wb[0, 0]
    if rows.shape[0] != r * r * c + 1:
        raise ValueError(f"fused weights for a {r}x{r} kernel on {c} input channels must be "
                         f"[1, 1, {r * r * c + 1}, K], got {wb.shape}")  # fmt: skip
    return rows[:-1].reshape(r, r, c, -1), rows[-1]


_POINTWISE, _STEM = "nanodet_pointwise_bias_act", "nanodet_stem_conv_bias_act"
_POINTWISE_INTERLEAVE = "nanodet_pointwise_bias_act_interleave"
# Largest interleaved output (bytes) stored by the kernel; larger ones get XLA's shuffle
# after the plain kernel. On the Zen 5 VM (2 MiB L2 per core, 32 MiB L3) the fused store
# was 0.89-0.91x the two-pass time for 5.9 MB outputs (8 or 16 images of 40x40x116 or
# 20x20x232) and 1.17-1.30x for 11.9 MB (16 x 40x40x116), where the three tensors no
# longer fit the L3 (benchmarks/fusions.py times the whole model).
INTERLEAVE_MAX_BYTES = 8 << 20


@functools.cache
def _op(target: str, activation: int, max_pool: bool, channel_offset: int) -> RawOp:
    """The sharding-aware call of ``target`` with these static attributes."""

    def call(*args: object) -> jax.Array:
        *arrays, out_shape, stride, padding = args
        ffi = jax.ffi.ffi_call(
            target, jax.ShapeDtypeStruct(out_shape, jnp.float32), vmap_method="sequential"
        )
        attrs = {"activation": np.int64(activation), "slope": np.float32(LEAKY_RELU_SLOPE)}
        if target == _STEM:
            attrs.update(stride=np.int64(stride), padding=np.int64(padding),
                         max_pool=np.int64(max_pool))  # fmt: skip
        else:
            attrs["channel_offset"] = np.int64(channel_offset)
        return ffi(*arrays, **attrs)

    passthrough = target == _POINTWISE_INTERLEAVE
    return batch_parallel(call, reduce_batch=False, dense=True, passthrough=passthrough)


def _use_ffi(impl: str | None, x: jax.Array) -> bool:
    return ffi_build.wants_kernels(impl, ENV_VAR, IMPLS) and x.dtype != jnp.float64


def _fused(
    target: str,
    x: jax.Array,
    wb: jax.Array,
    r: int,
    stride: int,
    padding: int,
    activation: str | None,
    activation_fn: Activation,
    impl: str | None,
    max_pool: bool = False,
    channel_offset: int = 0,
    passthrough: jax.Array | None = None,
) -> jax.Array:
    c = wb.shape[2] - 1 if target == _POINTWISE else x.shape[-1]
    if channel_offset < 0 or channel_offset + c > x.shape[-1]:
        raise ValueError(f"channels {channel_offset}..{channel_offset + c} of an input with "
                         f"{x.shape[-1]}")  # fmt: skip
    k = wb.shape[3]
    if passthrough is not None and (
        passthrough.shape[:3] != x.shape[:3] or passthrough.shape[3] < k
    ):
        raise ValueError(f"a passthrough for {x.shape[:3]} pixels and {k} output channels "
                         f"must be [*{x.shape[:3]}, >= {k}], got {passthrough.shape}")  # fmt: skip
    operands = (x, wb) if passthrough is None else (x, wb, passthrough)

    def interleaved(y: jax.Array, p: jax.Array | None) -> jax.Array:
        return y if p is None else interleave_channels(p.astype(y.dtype), y)

    def unfused(x: jax.Array, wb: jax.Array, p: jax.Array | None = None) -> jax.Array:
        x = x[..., channel_offset : channel_offset + c]
        kernel, bias = _split(wb, c, r)
        y = lax.conv_general_dilated(
            x,
            kernel.astype(x.dtype),
            window_strides=(stride, stride),
            padding=((padding, padding), (padding, padding)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        y = activation_fn(y + bias.astype(y.dtype))
        return interleaved(max_pool_3x3_s2(y) if max_pool else y, p)

    _split(wb, c, r)  # a clear error for a wrong layout, before any kernel
    if not _use_ffi(impl, x):
        return unfused(*operands)
    fused_act = activation if activation in EPILOGUE_ACTIVATIONS else None
    # An activation the epilogue lacks must come before the pool: pool in XLA then.
    fused_pool = max_pool and fused_act == activation

    # The shuffle goes into the kernel only when nothing runs between it and the store,
    # and only for outputs that stay in cache (INTERLEAVE_MAX_BYTES).
    fused_interleave = (
        passthrough is not None
        and fused_act == activation
        and 2 * k * int(np.prod(x.shape[:3])) * 4 <= INTERLEAVE_MAX_BYTES
    )

    def cpu(x: jax.Array, wb: jax.Array, p: jax.Array | None = None) -> jax.Array:
        n, h, w, _ = x.shape
        hw = [out_size(d, r, stride, padding) for d in (h, w)]
        if fused_pool:
            hw = [out_size(d, 3, 2, 1) for d in hw]
        act = EPILOGUE_ACTIVATIONS[fused_act]
        f32 = [x.astype(jnp.float32), wb.astype(jnp.float32)]
        if fused_interleave:
            op = _op(_POINTWISE_INTERLEAVE, act, False, channel_offset)
            y = batchable(op, (n, *hw, 2 * k), stride, padding, fold=True)(
                *f32, p.astype(jnp.float32)
            )
            return y.astype(x.dtype)
        op = _op(target, act, fused_pool, channel_offset)
        y = batchable(op, (n, *hw, k), stride, padding, fold=True)(*f32).astype(x.dtype)
        y = y if fused_act == activation else activation_fn(y)
        return interleaved(max_pool_3x3_s2(y) if max_pool and not fused_pool else y, p)

    return lax.platform_dependent(*operands, cpu=cpu, default=unfused)


def pointwise_conv_bias_act(
    x: jax.Array,
    wb: jax.Array,
    activation: str | None,
    activation_fn: Activation,
    *,
    channel_offset: int = 0,
    interleave_with: jax.Array | None = None,
    impl: str | None = None,
) -> jax.Array:
    """``y = activation_fn(conv1x1(x[..., channel_offset:][..., :C], kernel) + bias)``;
    ``activation`` is NanoDet's name of ``activation_fn``. The C++ kernel reads the
    channel range in place (a ShuffleNetV2 branch's half of its block's input).

    ``interleave_with`` ([N, H, W, >= K]): return ``interleave_channels(p[..., :K], y)``
    instead ([N, H, W, 2K], ShuffleNetV2's shuffle of ``concat([p, y])``), stored so by
    the C++ kernel up to ``INTERLEAVE_MAX_BYTES`` of output; ``p`` may be a whole block
    input whose first K channels pass through.
    """
    return _fused(
        _POINTWISE, x, wb, 1, 1, 0, activation, activation_fn, impl, False, channel_offset,
        interleave_with,
    )  # fmt: skip


def stem_conv_bias_act(
    x: jax.Array,
    wb: jax.Array,
    kernel_size: int,
    stride: int,
    padding: int,
    activation: str | None,
    activation_fn: Activation,
    *,
    max_pool: bool = False,
    impl: str | None = None,
) -> jax.Array:
    """``activation_fn(conv(x, kernel) + bias)`` for few input channels (``x``'s last axis,
    at most ``STEM_MAX_CHANNELS``) and kernels up to 7x7; ``max_pool``: followed by
    ``nn.MaxPool2d(3, 2, padding=1)`` (ShuffleNetV2's stem), in the same kernel on CPU."""
    if x.shape[-1] > STEM_MAX_CHANNELS or kernel_size > 7:
        raise ValueError(f"the stem kernel takes <= {STEM_MAX_CHANNELS} input channels and "
                         f"kernels <= 7x7, got {x.shape[-1]} and {kernel_size}")  # fmt: skip
    return _fused(
        _STEM, x, wb, kernel_size, stride, padding, activation, activation_fn, impl, max_pool
    )


STEM_MAX_CHANNELS = 4
