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

from nanodet_jax.optim import build_optimizer, clip_by_global_norm_torch, ema_decay, lr_schedule
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
