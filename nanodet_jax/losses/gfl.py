"""Generalized Focal Loss terms (quality focal, distribution focal), per prior, in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nanodet_jax.assigners.dynamic_soft_label import bce_with_logits


def _pow(x: jax.Array, beta: float) -> jax.Array:
    return jnp.square(x) if beta == 2.0 else x**beta


def quality_focal_loss(
    cls_logits: jax.Array, labels: jax.Array, scores: jax.Array, beta: float = 2.0
) -> jax.Array:
    """Per-prior QFL summed over classes: ``[..., C]`` logits -> ``[...]``.

    Every class is pushed towards 0 with weight ``sigmoid**beta``; a positive's own class
    (``labels < C``) towards its IoU ``score`` with weight ``|score - sigmoid|**beta``.
    """
    num_classes = cls_logits.shape[-1]
    sig = jax.nn.sigmoid(cls_logits)
    negative = bce_with_logits(cls_logits, jnp.zeros_like(cls_logits)) * _pow(sig, beta)
    target = scores[..., None]
    positive = bce_with_logits(cls_logits, target) * _pow(jnp.abs(target - sig), beta)
    own_class = labels[..., None] == jnp.arange(num_classes)  # all False for background
    return jnp.sum(jnp.where(own_class, positive, negative), axis=-1)


def distribution_focal_loss(reg_logits: jax.Array, targets: jax.Array) -> jax.Array:
    """DFL: ``[..., reg_max + 1]`` logits, ``[...]`` targets in ``[0, reg_max)`` -> ``[...]``.

    Cross-entropy to the two integer bins around the target, each weighted by the
    target's distance to the other bin.
    """
    left = targets.astype(jnp.int32)  # truncation == floor: targets are >= 0
    right = left + 1
    weight_left = right.astype(targets.dtype) - targets
    weight_right = targets - left.astype(targets.dtype)
    log_probs = jax.nn.log_softmax(reg_logits, axis=-1)
    ce_left = -jnp.take_along_axis(log_probs, left[..., None], axis=-1)[..., 0]
    ce_right = -jnp.take_along_axis(log_probs, right[..., None], axis=-1)[..., 0]
    return ce_left * weight_left + ce_right * weight_right
