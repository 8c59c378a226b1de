"""Optimiser, learning-rate schedule and EMA decay, as NanoDet's training configures them.

NanoDet (PyTorch Lightning) trains with AdamW, clips the gradient norm, warms the
learning rate up per *step*, and anneals it with ``CosineAnnealingLR`` stepped once
per *epoch*. Two details shape the schedule and are reproduced exactly:

* warm-up overwrites the lr with ``base_lr * k(step)`` on every step up to
  ``warmup.steps`` (inclusive), whatever the cosine schedule had set;
* PyTorch's CosineAnnealingLR updates recursively from the *current* lr, so an
  epoch boundary that falls inside the warm-up anchors the cosine curve at a
  warm-up value, and the lr stays at ``base_lr`` from the end of warm-up until
  the next epoch boundary.

:func:`lr_schedule` simulates that once per epoch on the host (float64) and
returns a jittable ``step -> lr`` function.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def warmup_factor(step: Any, warmup: Any) -> Any:
    """NanoDet's warm-up multiplier at a 0-based global step (numpy or jnp)."""
    name, steps, ratio = warmup["name"], warmup["steps"], warmup["ratio"]
    if steps <= 0:  # no warm-up (NanoDet would divide by zero)
        return 1.0 + 0.0 * step
    if name == "constant":
        return ratio + 0.0 * step
    if name == "linear":
        # = 1 - (1 - step/steps) * (1 - ratio), rearranged to avoid float32 cancellation.
        return ratio + (step / steps) * (1 - ratio)
    if name == "exp":
        return ratio ** (1 - step / steps)
    raise ValueError(f"unsupported warmup {name!r} (constant, linear or exp)")


def _cosine_step(last_epoch: int, lr: float, base: float, eta_min: float, t_max: int) -> float:
    """One ``CosineAnnealingLR.step()`` of PyTorch (its recursive form)."""
    if (last_epoch - 1 - t_max) % (2 * t_max) == 0:
        return lr + (base - eta_min) * (1 - math.cos(math.pi / t_max)) / 2
    ratio = (1 + math.cos(math.pi * last_epoch / t_max)) / (
        1 + math.cos(math.pi * (last_epoch - 1) / t_max)
    )
    return ratio * (lr - eta_min) + eta_min


def epoch_lrs(schedule: Any, steps_per_epoch: int) -> np.ndarray:
    """The lr PyTorch holds right after each epoch boundary (index e: start of epoch e)."""
    base = float(schedule["optimizer"]["lr"])
    cos = schedule["lr_schedule"]
    if cos["name"] != "CosineAnnealingLR":
        raise ValueError(f"unsupported lr_schedule {cos['name']!r} (CosineAnnealingLR)")
    warmup, epochs = schedule["warmup"], int(schedule["total_epochs"])
    w_steps = int(warmup["steps"])
    lrs = [base]
    lr = base
    for epoch in range(epochs):
        last_step = (epoch + 1) * steps_per_epoch - 1
        if epoch * steps_per_epoch <= w_steps:  # warm-up assigned lr during this epoch
            lr = base * float(warmup_factor(min(last_step, w_steps), warmup))
        lr = _cosine_step(epoch + 1, lr, base, float(cos["eta_min"]), int(cos["T_max"]))
        lrs.append(lr)
    return np.asarray(lrs)


def lr_schedule(schedule: Any, steps_per_epoch: int) -> Callable[[jax.Array], jax.Array]:
    """``step -> lr`` for the 0-based global step (the optimizer step about to be taken)."""
    if steps_per_epoch < 1:
        raise ValueError("steps_per_epoch must be >= 1 (is the dataset smaller than a batch?)")
    base = float(schedule["optimizer"]["lr"])
    warmup = schedule["warmup"]
    w_steps = int(warmup["steps"])
    table = jnp.asarray(epoch_lrs(schedule, steps_per_epoch), jnp.float32)
    last_warm = base * float(warmup_factor(w_steps, warmup))  # lr set by the last warm-up step

    def lr_at(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.int32)
        epoch = jnp.minimum(step // steps_per_epoch, table.shape[0] - 1)
        warm = base * warmup_factor(step.astype(jnp.float32), warmup)
        # After warm-up the lr is the epoch's cosine value, unless the current epoch
        # began during warm-up: then it is still the value of warm-up's last step.
        after = jnp.where(epoch * steps_per_epoch - 1 >= w_steps, table[epoch], last_warm)
        return jnp.where(step <= w_steps, warm, after).astype(jnp.float32)

    return lr_at


def ema_decay(iteration: Any, decay: float = 0.9998) -> Any:
    """NanoDet's ExpMovingAverager weight of the *new* value at an iteration (1-based)."""
    return decay * jnp.exp(-(1.0 + iteration) / 2000.0) + (1.0 - decay)


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """``torch.nn.utils.clip_grad_norm_``: scale by min(1, max_norm / (norm + 1e-6))."""

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def build_optimizer(config: Any, steps_per_epoch: int) -> optax.GradientTransformation:
    """Gradient clipping then AdamW with NanoDet's schedule (PyTorch's default betas/eps)."""
    opt = config.schedule.optimizer
    if opt.name != "AdamW":
        raise ValueError(f"unsupported optimizer {opt.name!r} (NanoDet-Plus uses AdamW)")
    adamw = optax.adamw(
        learning_rate=lr_schedule(config.schedule, steps_per_epoch),
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=float(opt.weight_decay),
    )
    grad_clip = float(config.get("grad_clip", 0.0) or 0.0)
    return optax.chain(clip_by_global_norm_torch(grad_clip), adamw) if grad_clip > 0 else adamw
