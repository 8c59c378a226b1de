"""Frozen layers the way torchvision's detection models freeze them.

* :class:`FrozenBatchNorm2d` is torchvision's ``ops.misc.FrozenBatchNorm2d``: fixed
  running statistics and affine parameters, all four buffers (state_dict keys ``weight``,
  ``bias``, ``running_mean``, ``running_var``; no ``num_batches_tracked``), the same
  affine map in train and eval mode.
* :func:`freeze` turns a module's parameters into buffers: the trainer optimises only
  ``nnx.Param`` (``training/trainer.py``), so this is what ``requires_grad_(False)`` does
  in torchvision's ``_resnet_fpn_extractor``; the state_dict keys do not change.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from nanodet_jax.models.layers import Buffer
from nanodet_jax.models.norm import BatchNorm2d


class FrozenBatchNorm2d(nnx.Module):
    """``y = x * weight / sqrt(running_var + eps) + (bias - running_mean * scale)``."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        self.eps = eps
        self.weight = Buffer(jnp.ones((num_features,), jnp.float32))
        self.bias = Buffer(jnp.zeros((num_features,), jnp.float32))
        self.running_mean = Buffer(jnp.zeros((num_features,), jnp.float32))
        self.running_var = Buffer(jnp.ones((num_features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.weight[...] * lax.rsqrt(self.running_var[...] + self.eps)
        shift = self.bias[...] - self.running_mean[...] * scale
        return x * scale.astype(x.dtype) + shift.astype(x.dtype)


def freeze_batch_norms(module: nnx.Module) -> int:
    """Replace every :class:`BatchNorm2d` under ``module`` by a :class:`FrozenBatchNorm2d`
    holding its current values, in place; returns how many were replaced."""
    count = 0
    for name, value in list(vars(module).items()):
        if isinstance(value, BatchNorm2d):
            frozen = FrozenBatchNorm2d(value.weight[...].shape[0], eps=value.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key)[...] = getattr(value, key)[...]
            setattr(module, name, frozen)
            count += 1
        elif isinstance(value, (nnx.Module, nnx.List)):
            count += freeze_batch_norms(value)
    return count


def freeze(module: nnx.Module) -> None:
    """Make every ``nnx.Param`` under ``module`` a :class:`Buffer` (same name and value)."""
    for name, value in list(vars(module).items()):
        if isinstance(value, nnx.Param):
            setattr(module, name, Buffer(value[...]))
        elif isinstance(value, (nnx.Module, nnx.List)):
            freeze(value)
