"""Learning-rate schedules as NanoDet's Lightning task drives PyTorch's schedulers.

NanoDet warms the learning rate up per *step* and steps a ``torch.optim.lr_scheduler``
(``schedule.lr_schedule.name``: ``CosineAnnealingLR`` or ``MultiStepLR``) once per
*epoch*. Two details shape the result and are reproduced exactly:

* warm-up overwrites the lr with ``initial_lr * k(step)`` on every step up to
  ``warmup.steps`` (inclusive), whatever the scheduler had set (``initial_lr`` is
  the parameter group's own lr, so ``param_level_cfg``'s ``lr_mult`` is warmed up too);
* PyTorch's schedulers update recursively from the *current* lr (``step()`` uses
  their chainable form), so an epoch boundary that falls inside the warm-up anchors
  the schedule at a warm-up value, and after warm-up the lr keeps warm-up's last
  value (``initial_lr`` for linear / exp, ``initial_lr * ratio`` for constant) until
  the next epoch boundary.

:func:`lr_schedule` simulates that on the host in float64 (one value per epoch, one
per warm-up step) and returns a jittable ``step -> lr`` function that only looks
values up, so the float32 result is PyTorch's float64 lr rounded once.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


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


# Each scheduler: (its config keys with PyTorch's defaults, None = required) and a
# factory ``(cfg, base_lr) -> step(epoch, lr) -> lr``, one ``scheduler.step()`` that
# moves the lr held at the end of epoch ``epoch - 1`` to the start of epoch ``epoch``.
_Step = Callable[[int, float], float]


def _cosine(cfg: Mapping[str, Any], base: float) -> _Step:
    t_max, eta_min = int(cfg["T_max"]), float(cfg["eta_min"])

    def step(epoch: int, lr: float) -> float:  # CosineAnnealingLR.get_lr, recursive form
        if epoch == 0:
            return lr
        if (epoch - 1 - t_max) % (2 * t_max) == 0:
            return lr + (base - eta_min) * (1 - math.cos(math.pi / t_max)) / 2
        ratio = (1 + math.cos(math.pi * epoch / t_max)) / (
            1 + math.cos(math.pi * (epoch - 1) / t_max)
        )
        return ratio * (lr - eta_min) + eta_min

    return step


def _multistep(cfg: Mapping[str, Any], base: float) -> _Step:
    del base  # MultiStepLR only multiplies the current lr
    # A milestone listed twice decays twice, as PyTorch counts them.
    counts, gamma = Counter(int(m) for m in cfg["milestones"]), float(cfg["gamma"])

    def step(epoch: int, lr: float) -> float:
        return lr * gamma ** counts[epoch] if epoch in counts else lr

    return step


LR_SCHEDULES: dict[str, tuple[dict[str, Any], Callable[[Mapping[str, Any], float], _Step]]] = {
    "CosineAnnealingLR": ({"T_max": None, "eta_min": 0.0}, _cosine),
    "MultiStepLR": ({"milestones": None, "gamma": 0.1}, _multistep),
}


def _scheduler(cfg: Mapping[str, Any], base: float) -> _Step:
    """The one place a ``lr_schedule.name`` is looked up (unknown names list the known)."""
    name = cfg["name"]
    if name not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {name!r}; known: {', '.join(sorted(LR_SCHEDULES))}")
    defaults, factory = LR_SCHEDULES[name]
    given = {k: v for k, v in dict(cfg).items() if k != "name"}
    unknown = sorted(set(given) - set(defaults))
    missing = sorted(k for k, v in defaults.items() if v is None and k not in given)
    if unknown or missing:
        raise ValueError(f"lr_schedule {name}: unknown keys {unknown}, missing keys {missing}")
    return factory({**defaults, **given}, base)


def epoch_lrs(schedule: Any, steps_per_epoch: int, base_lr: float | None = None) -> np.ndarray:
    """The lr PyTorch holds right after each epoch boundary (index e: start of epoch e).

    ``base_lr`` is the parameter group's ``initial_lr`` (default ``optimizer.lr``).
    """
    base = float(schedule["optimizer"]["lr"] if base_lr is None else base_lr)
    step = _scheduler(schedule["lr_schedule"], base)
    warmup, epochs = schedule["warmup"], int(schedule["total_epochs"])
    w_steps = int(warmup["steps"])
    lrs = [base]
    lr = base
    for epoch in range(epochs):
        last_step = (epoch + 1) * steps_per_epoch - 1
        if epoch * steps_per_epoch <= w_steps:  # warm-up assigned lr during this epoch
            lr = base * float(warmup_factor(min(last_step, w_steps), warmup))
        lr = step(epoch + 1, lr)
        lrs.append(lr)
    return np.asarray(lrs)


def lr_schedule(
    schedule: Any, steps_per_epoch: int, base_lr: float | None = None
) -> Callable[[jax.Array], jax.Array]:
    """``step -> lr`` for the 0-based global step (the optimizer step about to be taken).

    ``base_lr``: the parameter group's own initial lr (``optimizer.lr * lr_mult``).
    """
    if steps_per_epoch < 1:
        raise ValueError("steps_per_epoch must be >= 1 (is the dataset smaller than a batch?)")
    base = float(schedule["optimizer"]["lr"] if base_lr is None else base_lr)
    warmup = schedule["warmup"]
    w_steps = max(int(warmup["steps"]), 0)
    table = jnp.asarray(epoch_lrs(schedule, steps_per_epoch, base), jnp.float32)
    # Warm-up values in float64 on the host: a float32 ``ratio ** x`` on the device is
    # several ulp off PyTorch's double.
    warm_table = base * np.asarray(
        [float(warmup_factor(s, warmup)) for s in range(w_steps + 1)], np.float64
    )
    warm = jnp.asarray(warm_table, jnp.float32)
    last_warm = warm[w_steps]  # the lr set by the last warm-up step

    def lr_at(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.int32)
        epoch = jnp.minimum(step // steps_per_epoch, table.shape[0] - 1)
        # After warm-up the lr is the epoch's scheduled value, unless the current epoch
        # began during warm-up: then it is still the value of warm-up's last step.
        after = jnp.where(epoch * steps_per_epoch - 1 >= w_steps, table[epoch], last_warm)
        return jnp.where(step <= w_steps, warm[jnp.clip(step, 0, w_steps)], after)

    return lr_at
