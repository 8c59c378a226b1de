"""Optimisers as NanoDet's ``build_optimizer`` configures them, with PyTorch's update rules.

``schedule.optimizer.name`` selects ``AdamW``, ``Adam`` or ``SGD``; the other keys are
``torch.optim``'s own (PyTorch's defaults when absent) plus NanoDet's ``no_norm_decay``,
``no_bias_decay`` and ``param_level_cfg`` (see ``param_groups.py``). The learning rate
follows ``schedules.py`` (warm-up per step, the lr scheduler per epoch), one schedule per
distinct ``lr_mult``. The update rules are PyTorch's:

* AdamW: decoupled decay, ``p -= lr * (adam + wd * p)``;
* Adam and SGD: L2 decay added to the gradient before anything else;
* SGD momentum: the buffer starts as the first gradient, then
  ``buf = momentum * buf + (1 - dampening) * g``; nesterov steps along
  ``g + momentum * buf``.

The gradient is clipped first (``clip_grad_norm_``), as Lightning does before
``optimizer.step()``. With none of NanoDet's extras the AdamW state has the layout of
``optax.chain(clip, optax.adamw(...))``, which earlier checkpoints hold.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nanodet_jax.training.param_groups import LeafHyper, leaf_hypers
from nanodet_jax.training.schedules import epoch_lrs, lr_schedule, warmup_factor

__all__ = [
    "OPTIMIZERS",
    "OPTIMIZER_KEYS",
    "build_optimizer",
    "clip_by_global_norm_torch",
    "epoch_lrs",
    "lr_schedule",
    "warmup_factor",
]

HyperFn = Callable[[Any], list[LeafHyper]]


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """``torch.nn.utils.clip_grad_norm_``: scale by min(1, max_norm / (norm + 1e-6))."""

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _map_leaves(fn: Callable[..., jax.Array], hyper: list[LeafHyper], *trees: Any) -> Any:
    """``fn(hyper_i, leaf_i of each tree)`` over the leaves of ``trees[0]``."""
    flat = [jax.tree_util.tree_flatten(t) for t in trees]
    treedef = flat[0][1]
    out = [fn(h, *xs) for h, *xs in zip(hyper, *(f[0] for f in flat), strict=True)]
    return jax.tree_util.tree_unflatten(treedef, out)


def _add_weight_decay(hypers: HyperFn) -> optax.GradientTransformation:
    """``u + wd * p`` per leaf: L2 before Adam / SGD, decoupled decay after Adam (AdamW)."""

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("weight decay needs the parameters: tx.update(grads, state, params)")

        def one(h: LeafHyper, u: jax.Array, p: jax.Array) -> jax.Array:
            return u if h.weight_decay == 0 else u + h.weight_decay * p.astype(u.dtype)

        return _map_leaves(one, hypers(updates), updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class TorchMomentumState(NamedTuple):
    count: jax.Array
    buf: Any


def _torch_momentum(momentum: float, dampening: float, nesterov: bool):
    """``torch.optim.SGD``'s momentum buffer (first step: the gradient itself)."""

    def init(params):
        return TorchMomentumState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        del params
        first = state.count == 0
        buf = jax.tree.map(
            lambda g, b: jnp.where(first, g, momentum * b + (1 - dampening) * g), updates, state.buf
        )
        out = jax.tree.map(lambda g, b: g + momentum * b, updates, buf) if nesterov else buf
        return out, TorchMomentumState(optax.safe_increment(state.count), buf)

    return optax.GradientTransformation(init, update)


def _scale_by_group_lr(
    schedules: Mapping[float, Callable[[jax.Array], jax.Array]], hypers: HyperFn
) -> optax.GradientTransformation:
    """``-lr(step) * u`` with each leaf's group schedule; state as optax's scale_by_schedule."""

    def init(params):
        return optax.ScaleByScheduleState(count=jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        del params
        lrs = {m: fn(state.count) for m, fn in schedules.items()}

        def one(h: LeafHyper, u: jax.Array) -> jax.Array:
            return -lrs[h.lr_mult].astype(u.dtype) * u

        out = _map_leaves(one, hypers(updates), updates)
        return out, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def _scale_by_adam_torch(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam's direction ``(m / bc1) / (sqrt(v / bc2) + eps)`` with PyTorch's moments.

    The bias corrections ``1 - b**t`` are computed as ``-expm1(t * log(b))``: optax's
    float32 ``1 - b2**t`` loses ~4 digits early on (1 - 0.999**2), which moved the
    parameters 5x further from a float64 run than PyTorch's double-precision correction.
    The state is optax's ``ScaleByAdamState``, so checkpoints keep their layout.
    """
    log_b1, log_b2 = math.log(b1), math.log(b2)

    def init(params):
        # Two separate trees: the train step donates its state, and one buffer passed
        # twice cannot be donated.
        mu, nu = (jax.tree.map(jnp.zeros_like, params) for _ in range(2))
        return optax.ScaleByAdamState(count=jnp.zeros((), jnp.int32), mu=mu, nu=nu)

    def update(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda g, m: m + (1 - b1) * (g - m), updates, state.mu)  # lerp
        nu = jax.tree.map(lambda g, v: b2 * v + (1 - b2) * g * g, updates, state.nu)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        bc1, bc2 = -jnp.expm1(t * log_b1), -jnp.expm1(t * log_b2)
        out = jax.tree.map(lambda m, v: (m / bc1) / (jnp.sqrt(v) / jnp.sqrt(bc2) + eps), mu, nu)
        return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def _adam_core(cfg: Mapping[str, Any]) -> optax.GradientTransformation:
    if cfg["amsgrad"]:
        raise ValueError("optimizer: amsgrad=True is not supported")
    b1, b2 = (float(b) for b in cfg["betas"])
    return _scale_by_adam_torch(b1, b2, float(cfg["eps"]))


def _adamw(cfg, decay, lr):
    return optax.chain(_adam_core(cfg), decay, lr)


def _adam(cfg, decay, lr):
    return optax.chain(decay, _adam_core(cfg), lr)


def _sgd(cfg, decay, lr):
    momentum, dampening = float(cfg["momentum"]), float(cfg["dampening"])
    if cfg["nesterov"] and (momentum <= 0 or dampening != 0):
        raise ValueError("SGD: nesterov needs momentum > 0 and dampening = 0 (as in PyTorch)")
    if momentum == 0:  # PyTorch keeps no buffer then
        return optax.chain(decay, lr)
    return optax.chain(decay, _torch_momentum(momentum, dampening, bool(cfg["nesterov"])), lr)


_ADAM_KEYS = {"betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False}
# name -> (torch.optim's keyword defaults, chain(cfg, weight_decay, lr_scaling)).
OPTIMIZERS: dict[str, tuple[dict[str, Any], Callable[..., optax.GradientTransformation]]] = {
    "AdamW": ({**_ADAM_KEYS, "weight_decay": 1e-2}, _adamw),
    "Adam": ({**_ADAM_KEYS, "weight_decay": 0.0}, _adam),
    "SGD": ({"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0}, _sgd),
}
# Keys every optimizer section may hold besides its torch keyword arguments.
OPTIMIZER_KEYS = ("name", "lr", "no_norm_decay", "no_bias_decay", "param_level_cfg")


def build_optimizer(config: Any, steps_per_epoch: int) -> optax.GradientTransformation:
    """Gradient clipping (``config.grad_clip``) then ``config.schedule.optimizer``."""
    schedule = config.schedule
    opt = dict(schedule.optimizer)
    name = opt["name"]
    if name not in OPTIMIZERS:  # the one place an optimizer name is looked up
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(sorted(OPTIMIZERS))}")
    defaults, make = OPTIMIZERS[name]
    unknown = sorted(set(opt) - set(defaults) - set(OPTIMIZER_KEYS))
    if unknown:
        raise ValueError(f"optimizer {name}: unknown keys {unknown} (known: {sorted(defaults)})")
    cfg = {**defaults, **{k: v for k, v in opt.items() if k in defaults}}
    default_wd = float(cfg["weight_decay"])

    def hypers(tree: Any) -> list[LeafHyper]:  # static: from names and shapes only
        return leaf_hypers(opt, tree, default_wd)

    base_lr = float(opt["lr"])
    mults = {1.0} | {float(sub["lr_mult"]) for sub in (opt.get("param_level_cfg") or {}).values()
                     if "lr_mult" in sub}  # fmt: skip
    # Each group's lr is PyTorch's ``base_lr * lr_mult`` warmed up and scheduled on its own
    # (CosineAnnealingLR's eta_min is not scaled by lr_mult, so the curves are not scaled
    # copies of one another).
    schedules = {m: lr_schedule(schedule, steps_per_epoch, base_lr * m) for m in mults}
    tx = make(cfg, _add_weight_decay(hypers), _scale_by_group_lr(schedules, hypers))
    grad_clip = float(config.get("grad_clip", 0.0) or 0.0)
    return optax.chain(clip_by_global_norm_torch(grad_clip), tx) if grad_clip > 0 else tx
