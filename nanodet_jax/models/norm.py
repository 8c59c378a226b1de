"""Normalisation layers with PyTorch semantics (NHWC, PyTorch parameter names), and
NanoDet's ``build_norm_layer`` naming rule."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from nanodet_jax.precision import at_least_f32

_AXES = (0, 1, 2)


def _bn_stats(xf: jax.Array) -> tuple[jax.Array, jax.Array]:
    mean = jnp.mean(xf, axis=_AXES)
    return mean, jnp.mean(jnp.square(xf - mean), axis=_AXES)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float):
    """Train-mode BatchNorm over NHWC: ``(y, batch mean, biased batch variance)``.

    ``y = x * scale + (bias - mean * scale)`` with ``scale = weight * rsqrt(var + eps)``,
    computed in (at least) float32 and returned in ``x``'s dtype. The custom VJP is
    PyTorch's centred backward; plain autodiff of this forward formed the weight's
    cotangent as ``sum(g * x) - mean * sum(g)``, which cancels catastrophically in
    float32 when a channel's mean is large against its spread (tools/grad_precision.py).
    The forward stays uncentred: the centred ``(x - mean) * scale + bias`` moved the
    8-device vs 1-device gradients of tests/test_distributed.py from 5e-6 to 1.2e-3
    (relative L2), cause not pinned down (ReLU kink sides switching is the suspect).
    """
    return _bn_forward(x, weight, bias, eps)[0]


def _bn_forward(x, weight, bias, eps):
    xf = at_least_f32(x)
    mean, var = _bn_stats(xf)
    inv = lax.rsqrt(var + eps)
    scale = weight * inv
    y = xf * scale + (bias - mean * scale)
    return (y.astype(x.dtype), mean, var), (x, weight, mean, inv)


def _bn_backward(eps, res, cotangents):
    x, weight, mean, inv = res
    g, g_mean, g_var = (at_least_f32(c) for c in cotangents)
    n = x.shape[0] * x.shape[1] * x.shape[2]
    centred = at_least_f32(x) - mean
    xhat = centred * inv
    d_bias = jnp.sum(g, axis=_AXES)
    d_weight = jnp.sum(g * xhat, axis=_AXES)
    # d/dx of the normalised output, then of the returned statistics (their
    # cotangents are zero in training, where they only feed stop_gradient'ed buffers).
    dx = (weight * inv) * (g - d_bias / n - xhat * (d_weight / n))
    dx = dx + g_mean / n + centred * (2.0 * g_var / n)
    return dx.astype(x.dtype), d_weight.astype(weight.dtype), d_bias.astype(weight.dtype)


batch_norm_train.defvjp(_bn_forward, _bn_backward)


class BatchNorm2d(nnx.Module):
    """``nn.BatchNorm2d`` with PyTorch's training semantics.

    Training normalises with the biased batch variance but updates ``running_var``
    with the unbiased one; ``momentum`` is PyTorch's (weight of the new batch).
    Under ``jax.jit`` with a batch-sharded input the batch statistics are global
    (what PyTorch needs SyncBatchNorm for). Statistics are computed in float32.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        self.eps = eps
        self.momentum = momentum
        self.use_running_average = False
        self.record_input_stats = False  # see bn_recalibration.py
        self.weight = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.running_mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.running_var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_running_average:
            mean, var = self.running_mean[...], self.running_var[...]
            if self.record_input_stats:
                xf = at_least_f32(x)
                batch_mean = jnp.mean(xf, axis=_AXES)
                second = jnp.mean(jnp.square(xf), axis=_AXES)
                self.input_stats = nnx.Intermediate(jnp.stack([batch_mean, second]))
            scale = self.weight[...] * lax.rsqrt(var + self.eps)
            shift = self.bias[...] - mean * scale
            return (x * scale.astype(x.dtype) + shift.astype(x.dtype)).astype(x.dtype)
        else:
            y, mean, var = batch_norm_train(x, self.weight[...], self.bias[...], self.eps)
            n = x.shape[0] * x.shape[1] * x.shape[2]
            unbiased = var * (n / max(n - 1, 1))
            m = self.momentum
            # set_value, not ``var[...] = v``: under a trace, flax's ``[...]`` assignment
            # probes ``tracer.sharding``, whose error message walks the whole jaxpr built
            # so far, making train-mode tracing quadratic in the number of BN layers.
            self.running_mean.set_value(
                (1 - m) * self.running_mean[...] + m * lax.stop_gradient(mean)
            )
            self.running_var.set_value(
                (1 - m) * self.running_var[...] + m * lax.stop_gradient(unbiased)
            )
            self.num_batches_tracked.set_value(self.num_batches_tracked[...] + 1)
            return y


class GroupNorm(nnx.Module):
    """``nn.GroupNorm`` over NHWC (channels split into ``num_groups`` contiguous groups)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels not divisible by {num_groups}")
        self.num_groups = num_groups
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((num_channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics as per-channel sums over (H, W), then combined per group: XLA:CPU
        # reduces [B, H, W, C] -> [B, C] fast, while reducing a [B, H, W, G, C/G] view
        # over (H, W, C/G) made GroupNorm's backward 2.4x slower.
        b, h, w, c = x.shape
        k = c // self.num_groups
        n = h * w * k

        def group_mean(per_channel: jax.Array) -> jax.Array:  # [B, C] -> [B, 1, 1, C]
            groups = per_channel.reshape(b, self.num_groups, k).sum(-1) / n
            return jnp.repeat(groups, k, axis=-1)[:, None, None, :]

        xf = at_least_f32(x)
        centered = xf - group_mean(jnp.sum(xf, axis=(1, 2)))
        var = group_mean(jnp.sum(jnp.square(centered), axis=(1, 2)))
        y = centered * (lax.rsqrt(var + self.eps) * self.weight[...]) + self.bias[...]
        return y.astype(x.dtype)


def build_norm(norm_cfg: dict | None, channels: int) -> tuple[str, nnx.Module] | None:
    """NanoDet's ``build_norm_layer``: returns the attribute name PyTorch uses and the layer."""
    if norm_cfg is None:
        return None
    kind = norm_cfg["type"]
    eps = norm_cfg.get("eps", 1e-5)
    if kind in ("BN", "SyncBN"):
        return "bn", BatchNorm2d(channels, eps=eps)
    if kind == "GN":
        return "gn", GroupNorm(norm_cfg["num_groups"], channels, eps=eps)
    raise ValueError(f"unsupported norm type {kind!r} (use BN, SyncBN or GN)")


class LayerNorm(nnx.Module):
    """``nn.LayerNorm`` over the last axis (biased variance, eps inside the square root)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = at_least_f32(x)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        centered = xf - mean
        var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
        y = centered * lax.rsqrt(var + self.eps) * self.weight[...] + self.bias[...]
        return y.astype(x.dtype)
