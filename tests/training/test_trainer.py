"""The train step's precision option: ``--config.device.precision=bf16`` computes the
forward and backward in bfloat16 with float32 master weights (README, Training)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanodet_jax.config.loading import load_config
from nanodet_jax.data.augment import color_augment_and_normalize
from nanodet_jax.models import build_model
from nanodet_jax.testing import SMALL_MODEL_OVERRIDES
from nanodet_jax.training import distributed, trainer
from nanodet_jax.training.optim import build_optimizer
from tests.conftest import config_path


def _batch(size: int = 64, batch: int = 2, boxes: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, size / 2, (batch, boxes, 2))
    wh = rng.uniform(8, size / 2, (batch, boxes, 2))
    return {
        "images": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
        "color": np.tile(np.float32([0.0, 1.0, 1.0, 1.0]), (batch, 1)),
        "gt_boxes": np.concatenate([xy, xy + wh], -1).astype(np.float32),
        "gt_labels": rng.integers(0, 5, (batch, boxes)).astype(np.int32),
        "gt_mask": np.ones((batch, boxes), bool),
    }


def _setup(precision: str):
    config = load_config(
        config_path("nanodet_plus_m.py"),
        [*SMALL_MODEL_OVERRIDES, "--config.data.train.input_size=[64, 64]",
         f"--config.device.precision={precision}"],
    )  # fmt: skip
    mesh = distributed.data_mesh(jax.devices()[:1])
    tx = build_optimizer(config, 10)
    graphdef, state = trainer.create_train_state(build_model(config, seed=0), tx)
    step = trainer.jit_train_step(graphdef, tx, config, mesh, phase="joint")
    batch = jax.device_put(_batch(), distributed.batch_sharded(mesh))
    return config, graphdef, state, step, batch


def _fp32_loss(config, graphdef, state, batch) -> float:
    """The step's loss in float32, without the backward and the update: a third of the
    step's compile, which is most of this test's time."""
    mean, std = (tuple(v) for v in config.data.train.pipeline.normalize)

    @jax.jit
    def loss(state, batch):
        images = color_augment_and_normalize(batch["images"], batch["color"], mean, std)
        model = nnx.merge(graphdef, state.params, state.model_state, copy=True)
        targets = {k: batch[k] for k in ("gt_boxes", "gt_labels", "gt_mask")}
        return model.loss(images, targets, "joint")[0]

    return float(loss(state, batch))


def test_bf16_computes_in_bfloat16_with_float32_master_weights() -> None:
    # float32 (the default) is every other test's precision: its goldens would catch a
    # bfloat16 op there. Its loss here comes from the forward+loss program alone.
    config, graphdef, state, _, batch = _setup("fp32")
    fp32 = _fp32_loss(config, graphdef, state, batch)
    config, graphdef, state, step, batch = _setup("bf16")
    lowered = step.lower(state, batch)  # traced once: its text is checked, then it runs
    convs = [line for line in lowered.as_text().splitlines() if "convolution(" in line]
    bf16 = [line for line in convs if "bf16" in line]
    assert len(bf16) > len(convs) // 2, f"bf16 asked for, {len(bf16)}/{len(convs)} convs"
    state, metrics = lowered.compile()(state, batch)
    # Master weights, optimizer state and EMA stay float32 whatever the compute dtype.
    for tree in (state.params, state.ema, state.opt_state):
        floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert floats and all(x.dtype == jnp.float32 for x in floats)
    # bf16 moves the loss by its rounding (4% here: 0.588 vs 0.614), not to garbage.
    loss = float(metrics["loss"])
    assert np.isfinite(loss) and loss == pytest.approx(fp32, rel=0.1) and loss != fp32
