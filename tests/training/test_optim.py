"""Learning-rate / EMA schedules against NanoDet's own (tests/data/golden_schedule.json,
written by ``python tools/make_golden_schedule.py REF_PATH``), and the optimiser step."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nanodet_jax.training.ema import ema_decay
from nanodet_jax.training.optim import build_optimizer, clip_by_global_norm_torch, lr_schedule
from tests.conftest import REPO

GOLDEN = os.path.join(REPO, "tests", "data", "golden_schedule.json")


@pytest.fixture(scope="module")
def golden():
    with open(GOLDEN) as f:
        return json.load(f)


def schedule_cfg(case: dict) -> dict:
    return {
        "optimizer": {"name": "AdamW", "lr": 0.001, "weight_decay": 0.05},
        "warmup": {"name": case["warmup"], "steps": case["warmup_steps"], "ratio": 0.0001},
        "total_epochs": case["epochs"],
        "lr_schedule": {"name": "CosineAnnealingLR", "T_max": case["epochs"], "eta_min": 5e-5},
    }


@pytest.mark.parametrize("index", range(4))
def test_lr_equals_nanodet(golden, index):
    case = golden["cases"][index]
    fn = jax.jit(jax.vmap(lr_schedule(schedule_cfg(case), case["steps_per_epoch"])))
    steps = np.array([int(k) for k in case["lr"]])
    expected = np.array(list(case["lr"].values()))
    ours = np.asarray(fn(jnp.asarray(steps)))
    np.testing.assert_allclose(ours, expected, rtol=2e-6, atol=1e-12)


def test_ema_decay_equals_nanodet(golden):
    for it, expected in golden["ema_decay"].items():
        np.testing.assert_allclose(float(ema_decay(int(it))), expected, rtol=1e-6)


def test_torch_style_clipping():
    grads = {"a": jnp.full((4,), 10.0), "b": jnp.full((2, 2), -5.0)}  # norm = sqrt(500)
    clipped, _ = clip_by_global_norm_torch(10.0).update(grads, optax.EmptyState())
    scale = 10.0 / (np.sqrt(500.0) + 1e-6)
    np.testing.assert_allclose(np.asarray(clipped["a"]), 10.0 * scale, rtol=1e-6)
    small, _ = clip_by_global_norm_torch(1e3).update(grads, optax.EmptyState())
    np.testing.assert_array_equal(np.asarray(small["b"]), -5.0)


@pytest.mark.needs_torch
def test_adamw_step_equals_torch(m_config):
    import torch

    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(3, 4)).astype(np.float32)
    grads = [rng.normal(size=(3, 4)).astype(np.float32) * s for s in (1.0, 50.0, 0.1)]
    steps_per_epoch = 7
    tx = build_optimizer(m_config, steps_per_epoch)
    params = {"w": jnp.asarray(w0)}
    state = tx.init(params)
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.05)
    lr_fn = lr_schedule(m_config.schedule, steps_per_epoch)
    for step, g in enumerate(grads):
        updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
        for group in opt.param_groups:
            group["lr"] = float(lr_fn(step))
        p.grad = torch.from_numpy(g.copy())
        torch.nn.utils.clip_grad_norm_([p], m_config.grad_clip)
        opt.step()
        np.testing.assert_allclose(np.asarray(params["w"]), p.detach().numpy(), rtol=1e-5,
                                   atol=1e-7)  # fmt: skip


def _config(optimizer: dict, lr_schedule: dict | None = None, grad_clip: float = 35.0):
    from ml_collections import ConfigDict

    sched = lr_schedule or {"name": "CosineAnnealingLR", "T_max": 3, "eta_min": 5e-5}
    return ConfigDict({"schedule": {"optimizer": optimizer, "total_epochs": 3,
                                    "warmup": {"name": "linear", "steps": 2, "ratio": 0.1},
                                    "lr_schedule": sched}, "grad_clip": grad_clip})  # fmt: skip


def test_unknown_names_list_the_known():
    with pytest.raises(ValueError, match=r"unknown optimizer 'RMSprop'; known: Adam, AdamW, SGD$"):
        build_optimizer(_config({"name": "RMSprop", "lr": 1e-3}), 10)
    with pytest.raises(
        ValueError, match=r"unknown lr_schedule 'StepLR'; known: CosineAnnealingLR, MultiStepLR$"
    ):
        build_optimizer(_config({"name": "SGD", "lr": 0.1}, {"name": "StepLR", "step_size": 2}), 10)
    with pytest.raises(ValueError, match=r"optimizer SGD: unknown keys \['betas'\]"):
        build_optimizer(_config({"name": "SGD", "lr": 0.1, "betas": [0.9, 0.99]}), 10)
    with pytest.raises(ValueError, match="nesterov needs momentum > 0"):
        build_optimizer(_config({"name": "SGD", "lr": 0.1, "nesterov": True}), 10)
    with pytest.raises(ValueError, match=r"missing keys \['milestones'\]"):
        build_optimizer(_config({"name": "SGD", "lr": 0.1}, {"name": "MultiStepLR"}), 10)


def test_default_adamw_state_keeps_optax_layout(m_config):
    """Checkpoints written before per-parameter groups existed still restore."""
    params = {"a": {"weight": jnp.ones((3, 3, 2, 4)), "bias": jnp.ones((4,))}}
    ours = build_optimizer(m_config, 10).init(params)
    before = optax.chain(
        clip_by_global_norm_torch(35.0), optax.adamw(lambda step: 1e-3, weight_decay=0.05)
    ).init(params)
    assert jax.tree.structure(ours) == jax.tree.structure(before)


def test_norm_rule_finds_the_norm_modules(small_model):
    """param_groups' shape rule (1-D ``weight`` = a norm layer) against module types."""
    from flax import nnx

    from nanodet_jax.models.norm import BatchNorm2d, GroupNorm
    from nanodet_jax.training.param_groups import leaf_name, norm_parameter_names

    params = nnx.state(small_model, nnx.Param)
    shapes = {leaf_name(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    by_type = set()
    for path, module in nnx.iter_modules(small_model):
        if isinstance(module, BatchNorm2d | GroupNorm):
            prefix = ".".join(str(k) for k in path)
            by_type |= {f"{prefix}.weight", f"{prefix}.bias"}
    assert by_type and norm_parameter_names(shapes) == by_type
    assert len(by_type) < len(shapes)


def test_param_level_cfg_first_key_wins_and_configdict_overlap_refused():
    from ml_collections import ConfigDict

    from nanodet_jax.training.param_groups import LeafHyper, assign

    shapes = {"head.fc.weight": (3, 4), "head.gn.weight": (4,), "head.gn.bias": (4,),
              "backbone.0.weight": (4, 3, 3, 3)}  # fmt: skip
    level = {"fc": {"lr_mult": 3.0}, "head": {"lr_mult": 0.5, "decay_mult": 2.0}}
    cfg = {"lr": 0.1, "weight_decay": 0.01, "no_norm_decay": True, "param_level_cfg": level}
    got = assign(cfg, shapes, 0.01)
    assert got["head.fc.weight"] == LeafHyper(3.0, 0.01)  # "fc" first: "head" not applied
    assert got["head.gn.weight"] == got["head.gn.bias"] == LeafHyper(0.5, 0.0)  # norm: no decay
    assert got["backbone.0.weight"] == LeafHyper(1.0, 0.01)
    with pytest.raises(ValueError, match=r"'head.fc.weight' matches \['fc', 'head'\]"):
        assign({**cfg, "param_level_cfg": ConfigDict(level)}, shapes, 0.01)


@pytest.mark.parametrize("name", ["AdamW", "Adam", "SGD"])
def test_state_can_be_donated(name):
    """The train step donates the optimizer state: no buffer may appear twice in it."""
    extra = {"momentum": 0.9} if name == "SGD" else {}
    tx = build_optimizer(_config({"name": name, "lr": 0.1, **extra}), 10)
    params = {"conv": {"weight": jnp.ones((3, 3, 2, 4)), "bias": jnp.ones((4,))}}
    state = tx.init(params)
    leaves = jax.tree.leaves(state)
    assert len({id(x) for x in leaves}) == len(leaves)
    step = jax.jit(lambda s, g, p: tx.update(g, s, p), donate_argnums=0)
    updates, _ = step(state, jax.tree.map(jnp.ones_like, params), params)
    assert np.all(np.isfinite(np.asarray(updates["conv"]["weight"])))
