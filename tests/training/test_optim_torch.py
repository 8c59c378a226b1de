"""Optimisers and lr schedules against PyTorch, driven the way NanoDet's trainer drives it:
warm-up overwrites every group's lr with ``initial_lr * k`` on each step up to
``warmup.steps``, gradients are clipped with ``clip_grad_norm_``, ``optimizer.step()``,
and ``scheduler.step()`` once at the end of every epoch."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from nanodet_jax.training.optim import build_optimizer, lr_schedule
from nanodet_jax.training.param_groups import leaf_name

pytestmark = pytest.mark.needs_torch

STEPS_PER_EPOCH, EPOCHS = 4, 6
WARMUP_STEPS = 6  # crosses the first epoch boundary, ends inside the second epoch
OPTIMIZERS = {
    "AdamW": {"name": "AdamW", "lr": 1e-3, "weight_decay": 0.05},
    "SGD": {"name": "SGD", "lr": 0.14, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
}
SCHEDULES = {
    # A milestone inside warm-up (epoch 1) and a repeated one (decays twice).
    "MultiStepLR": {"name": "MultiStepLR", "milestones": [1, 3, 5, 5], "gamma": 0.1},
    # T_max below the epoch count: the curve turns back up (PyTorch's periodic branch).
    "CosineAnnealingLR": {"name": "CosineAnnealingLR", "T_max": 4, "eta_min": 5e-5},
}


def nanodet_k(step: int, warmup: dict) -> float:
    """NanoDet's ``optimizer_step`` warm-up factor, in its own (float64) form."""
    r = warmup["ratio"]
    if warmup["name"] == "constant":
        return r
    if warmup["name"] == "linear":
        return 1 - (1 - step / warmup["steps"]) * (1 - r)
    return r ** (1 - step / warmup["steps"])


def torch_optimizer(torch, groups, opt_cfg: dict, sched_cfg: dict):
    opt_kwargs = {k: v for k, v in opt_cfg.items() if k in ("lr", "momentum", "nesterov",
                  "dampening", "weight_decay", "betas", "eps")}  # fmt: skip
    opt = getattr(torch.optim, opt_cfg["name"])(groups, **opt_kwargs)
    sched_kwargs = {k: v for k, v in sched_cfg.items() if k != "name"}
    sched = getattr(torch.optim.lr_scheduler, sched_cfg["name"])(opt, **sched_kwargs)
    return opt, sched


def drive(torch, opt, sched, warmup: dict, steps_per_epoch: int, epochs: int, on_step):
    step = 0
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            if step <= warmup["steps"]:
                k = nanodet_k(step, warmup)
                for pg in opt.param_groups:
                    pg["lr"] = pg["initial_lr"] * k
            on_step(step)
            step += 1
        sched.step()


def schedule_cfg(opt_cfg: dict, warmup: dict, sched_cfg: dict, epochs: int = EPOCHS) -> dict:
    return {"optimizer": opt_cfg, "warmup": warmup, "total_epochs": epochs,
            "lr_schedule": sched_cfg}  # fmt: skip


@pytest.mark.parametrize("sched_name", list(SCHEDULES))
@pytest.mark.parametrize("warmup_name", ["constant", "linear", "exp"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_lr_equals_torch_every_step(opt_name, warmup_name, sched_name):
    import torch

    opt_cfg, sched_cfg = OPTIMIZERS[opt_name], SCHEDULES[sched_name]
    warmup = {"name": warmup_name, "steps": WARMUP_STEPS, "ratio": 0.1}
    mults = (1.0, 0.1)  # a param_level_cfg group: its own initial_lr, warmed up and scheduled
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": opt_cfg["lr"] * m}
              for m in mults]  # fmt: skip
    opt, sched = torch_optimizer(torch, groups, opt_cfg, sched_cfg)
    expected = []
    drive(torch, opt, sched, warmup, STEPS_PER_EPOCH, EPOCHS,
          lambda step: (expected.append([pg["lr"] for pg in opt.param_groups]),
                        opt.step()))  # fmt: skip
    expected = np.asarray(expected)
    steps = jnp.arange(STEPS_PER_EPOCH * EPOCHS)
    cfg = schedule_cfg(opt_cfg, warmup, sched_cfg)
    for i, m in enumerate(mults):
        ours = np.asarray(lr_schedule(cfg, STEPS_PER_EPOCH, opt_cfg["lr"] * m)(steps))
        np.testing.assert_allclose(ours, expected[:, i], rtol=1e-6, atol=0,
                                   err_msg=f"group lr_mult={m}")  # fmt: skip


# -- optimizer steps on a small module tree ------------------------------------------------


def toy_module(torch):
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Module()
    model.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4),
                                   nn.Conv2d(4, 4, 1))  # fmt: skip
    model.head = nn.Module()
    model.head.gn = nn.GroupNorm(2, 4)
    model.head.cls = nn.Conv2d(4, 2, 1)
    model.head.ln = nn.LayerNorm(4)
    model.head.fc = nn.Linear(4, 3)
    with torch.no_grad():
        # Norms start at 1 / 0: random values make their decay visible. Small values keep
        # float32 rounding of the parameters (not of the updates) out of the comparison.
        for p in model.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    return model


def our_tree(model) -> dict:
    """The same parameters as a nested tree whose dotted paths are the torch names
    (Sequential children as a list, as nnx.List flattens)."""
    tree: dict = {}
    for name, p in model.named_parameters():
        *parents, leaf = name.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(p.detach().numpy().copy())
    tree["backbone"] = [tree["backbone"][str(i)] for i in range(len(tree["backbone"]))]
    return tree


def torch_param_groups(torch, model, opt_cfg: dict) -> list[dict]:
    """NanoDet's parameter groups, decided from module types (an oracle independent of
    our shape-based norm rule)."""
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.modules.batchnorm._BatchNorm)
    groups = {name: {"params": [p]} for name, p in model.named_parameters()}
    base_lr, base_wd = opt_cfg["lr"], opt_cfg.get("weight_decay")
    for name, group in groups.items():
        for key, sub in opt_cfg.get("param_level_cfg", {}).items():
            if key in name:
                if "lr_mult" in sub and base_lr:
                    group["lr"] = base_lr * sub["lr_mult"]
                if "decay_mult" in sub and base_wd:
                    group["weight_decay"] = base_wd * sub["decay_mult"]
                break
    for mod_name, m in model.named_modules():
        for leaf in ("weight", "bias"):
            p = getattr(m, leaf, None)
            zero = opt_cfg.get("no_norm_decay") and isinstance(m, norms)
            zero = zero or (leaf == "bias" and opt_cfg.get("no_bias_decay"))
            if zero and isinstance(p, torch.nn.Parameter):
                groups[f"{mod_name}.{leaf}"]["weight_decay"] = 0.0
    return list(groups.values())


PARAM_LEVEL = {"backbone": {"lr_mult": 0.1, "decay_mult": 2.0}, "fc": {"lr_mult": 3.0}}
STEP_CASES = {
    "adamw": ({"name": "AdamW", "lr": 1e-2, "weight_decay": 0.05}, "CosineAnnealingLR"),
    "adamw_norm_level": ({"name": "AdamW", "lr": 1e-2, "weight_decay": 0.05,
                          "no_norm_decay": True, "param_level_cfg": PARAM_LEVEL},
                         "CosineAnnealingLR"),
    "sgd_nesterov_norm_level": ({"name": "SGD", "lr": 0.05, "momentum": 0.9, "nesterov": True,
                                 "weight_decay": 0.05, "no_norm_decay": True,
                                 "param_level_cfg": PARAM_LEVEL}, "MultiStepLR"),
    "sgd_dampening": ({"name": "SGD", "lr": 0.05, "momentum": 0.9, "dampening": 0.3,
                       "weight_decay": 0.01}, "MultiStepLR"),
    "sgd_plain_no_bias": ({"name": "SGD", "lr": 0.05, "weight_decay": 0.01,
                           "no_bias_decay": True}, "CosineAnnealingLR"),
    "adam_norm": ({"name": "Adam", "lr": 1e-2, "weight_decay": 0.01, "betas": (0.8, 0.99),
                   "eps": 1e-6, "no_norm_decay": True}, "MultiStepLR"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_optimizer_steps_equal_torch(case):
    import torch

    opt_cfg, sched_name = STEP_CASES[case]
    steps_per_epoch, epochs, grad_clip = 2, 3, 5.0
    warmup = {"name": "linear", "steps": 2, "ratio": 0.1}
    sched_cfg = {**SCHEDULES[sched_name], "T_max": 3} if sched_name == "CosineAnnealingLR" else {
        "name": "MultiStepLR", "milestones": [1, 2], "gamma": 0.5}  # fmt: skip
    model = toy_module(torch)
    params = our_tree(model)
    opt, sched = torch_optimizer(torch, torch_param_groups(torch, model, opt_cfg), opt_cfg,
                                 sched_cfg)  # fmt: skip
    config = ConfigDict({"schedule": schedule_cfg(copy.deepcopy(opt_cfg), warmup, sched_cfg,
                                                  epochs), "grad_clip": grad_clip})  # fmt: skip
    tx = build_optimizer(config, steps_per_epoch)
    state = tx.init(params)
    rng = np.random.default_rng(1)
    worst = [0.0]

    def on_step(step):
        nonlocal params, state
        scale = 20.0 if step == 1 else 0.3  # one step past grad_clip, the others under it
        grads = {n: (rng.normal(size=p.shape) * scale).astype(np.float32)
                 for n, p in model.named_parameters()}  # fmt: skip
        for n, p in model.named_parameters():
            p.grad = torch.from_numpy(grads[n].copy())
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        updates, state = tx.update(our_tree_from(grads, params), state, params)
        params = optax.apply_updates(params, updates)
        ours = flat_by_name(params)
        for n, p in model.named_parameters():
            ref = p.detach().numpy()
            np.testing.assert_allclose(ours[n], ref, rtol=1e-6, atol=1e-7,
                                       err_msg=f"{case} step {step} {n}")  # fmt: skip
            worst[0] = max(worst[0], float(np.max(np.abs(ours[n] - ref))))

    drive(torch, opt, sched, warmup, steps_per_epoch, epochs, on_step)
    print(f"{case}: max |ours - torch| over {steps_per_epoch * epochs} steps = {worst[0]:.2e}")


def flat_by_name(tree) -> dict:
    return {leaf_name(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def our_tree_from(grads: dict, like):
    """``grads`` (by torch name) in the structure of our tree ``like``."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(grads[leaf_name(p)]) for p, _ in leaves]
    )
