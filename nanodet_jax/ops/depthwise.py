"""Depthwise 2-D convolution (NHWC input, HWIO kernel with I == 1).

Implementations, picked per call by ``impl`` or the ``NANODET_JAX_DEPTHWISE`` environment
variable (read at trace time):

* ``auto`` (default): on CPU the C++ FFI kernels (``depthwise_ffi``), or the pure-XLA
  shift-add version (``depthwise_xla``) if they cannot be built; on GPU/TPU the grouped
  ``lax.conv_general_dilated``, which cuDNN and the TPU compiler handle well.
* ``ffi``: the C++ kernels on CPU (raises if they cannot be built), lax elsewhere.
* ``xla``: the pure-XLA shift-add version on CPU, lax elsewhere.
* ``lax``: grouped ``lax.conv_general_dilated`` everywhere (40-90x slower on XLA:CPU).

The CPU/other choice is made with ``lax.platform_dependent``: both branches are traced,
and only the one for the platform the computation is lowered for is compiled, so one
traced function is correct on every backend (``jax.default_backend()`` at trace time
would be wrong for a jit placed on a non-default device).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from nanodet_jax.ops import depthwise_ffi
from nanodet_jax.ops.depthwise_xla import depthwise_conv2d_xla
from nanodet_jax.ops.epilogue import EPILOGUE_ACTIVATIONS

ENV_VAR = "NANODET_JAX_DEPTHWISE"
IMPLS = ("auto", "ffi", "xla", "lax")

Impl = Callable[[jax.Array, jax.Array, int, int], jax.Array]


def depthwise_conv2d_lax(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Reference: grouped convolution with one group per channel."""
    return lax.conv_general_dilated(
        x,
        kernel.astype(x.dtype),
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


def _cpu_impl(choice: str, k: int) -> Impl:
    if choice == "xla":
        return depthwise_conv2d_xla
    if choice == "ffi":
        if k > depthwise_ffi.MAX_KERNEL:
            raise ValueError(
                f"{ENV_VAR}=ffi supports kernel sizes up to {depthwise_ffi.MAX_KERNEL}, got {k}"
            )
        if not depthwise_ffi.load():
            raise RuntimeError(
                f"{ENV_VAR}=ffi but the C++ depthwise kernel could not be "
                "built (see the warning above)"
            )
        return depthwise_ffi.depthwise_conv2d_ffi
    # auto. Only pay for building the C++ kernel when CPU is the default backend: on a
    # GPU/TPU host the CPU branch is rarely compiled and the XLA fallback is correct.
    if k <= depthwise_ffi.MAX_KERNEL and jax.default_backend() == "cpu" and depthwise_ffi.load():
        return depthwise_ffi.depthwise_conv2d_ffi
    return depthwise_conv2d_xla


def _choice(impl: str | None) -> str:
    choice = impl or os.environ.get(ENV_VAR, "auto") or "auto"
    if choice not in IMPLS:
        raise ValueError(f"depthwise implementation must be one of {IMPLS}, got {choice!r}")
    return choice


def depthwise_conv2d(
    x: jax.Array, kernel: jax.Array, stride: int, padding: int, *, impl: str | None = None
) -> jax.Array:
    """y[b, i, j, c] = sum_{u, v} xpad[b, i*s + u, j*s + v, c] * kernel[u, v, 0, c].

    Args:
      x: [N, H, W, C] activations (float32 or bfloat16; computed in float32 on CPU).
      kernel: [K, K, 1, C] (HWIO with one input channel per group).
      stride: spatial stride.
      padding: symmetric zero padding on each spatial side (PyTorch semantics).
      impl: one of ``IMPLS``; default from ``$NANODET_JAX_DEPTHWISE``, else ``auto``.

    Returns:
      [N, Ho, Wo, C] in the dtype of ``x``, Ho = (H + 2*padding - K) // stride + 1.
    """
    choice = _choice(impl)
    k, k2, one, c = kernel.shape
    if k != k2 or one != 1 or c != x.shape[-1] or x.ndim != 4:
        raise ValueError(
            f"expected x [N, H, W, C] and kernel [K, K, 1, C], got {x.shape} and {kernel.shape}"
        )
    stride, padding = int(stride), int(padding)
    # The FFI and shift-add kernels compute in float32; a float64 input (the float64
    # reference runs of tools/grad_precision.py) must not be silently rounded by them.
    if choice == "lax" or x.dtype == jnp.float64:
        return depthwise_conv2d_lax(x, kernel, stride, padding)
    cpu = _cpu_impl(choice, k)
    return lax.platform_dependent(
        x,
        kernel,
        cpu=partial(cpu, stride=stride, padding=padding),
        default=partial(depthwise_conv2d_lax, stride=stride, padding=padding),
    )


def depthwise_conv2d_bias_act(
    x: jax.Array,
    wb: jax.Array,
    stride: int,
    padding: int,
    activation: str | None,
    activation_fn: Callable[[jax.Array], jax.Array],
    *,
    impl: str | None = None,
) -> jax.Array:
    """``activation_fn(depthwise_conv2d(x, kernel, stride, padding) + bias)``.

    For inference, BatchNorm folded into kernel and bias: ``wb`` is the [K*K + 1, 1, 1, C]
    array of ``depthwise_ffi.fused_depthwise_weights(kernel, bias)``. Where the C++
    kernels run, bias and activation are their epilogue, applied to each output vector
    before it is stored, which saves XLA's separate pass over the output; that path has
    no gradient. ``activation`` is NanoDet's name of ``activation_fn``; names the epilogue
    does not know, other implementations and other backends take the unfused path.
    """
    choice = _choice(impl)
    stride, padding = int(stride), int(padding)
    k, c = depthwise_ffi.fused_kernel_size(wb), wb.shape[-1]

    def unfused(x: jax.Array, wb: jax.Array, fn: Impl) -> jax.Array:
        kernel, bias = wb[: k * k].reshape(k, k, 1, c), wb[k * k].reshape(c)
        y = fn(x, kernel.astype(x.dtype), stride, padding)
        return activation_fn(y + bias.astype(y.dtype))

    fusable = (
        activation in EPILOGUE_ACTIVATIONS
        and choice in ("auto", "ffi")
        and x.dtype != jnp.float64
        and _cpu_impl(choice, k) is depthwise_ffi.depthwise_conv2d_ffi
    )
    if not fusable:
        return unfused(x, wb, partial(depthwise_conv2d, impl=impl))

    def fused(x: jax.Array, wb: jax.Array) -> jax.Array:
        y = depthwise_ffi.forward_bias_act(x, wb, stride, padding, activation)
        return y.astype(x.dtype)

    return lax.platform_dependent(
        x, wb, cpu=fused, default=partial(unfused, fn=depthwise_conv2d_lax)
    )
