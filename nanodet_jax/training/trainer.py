"""The training state and the jit-compiled train step of any detector.

One step, inside one XLA program: colour augmentation and normalisation of the uint8
batch -> the detector's ``loss`` for the phase (NanoDet-Plus: both PANs and heads, the
assignment from the aux head, the GFL losses) -> gradients -> the optimizer (clipping,
AdamW / SGD) -> the weight average (EMA of weights and BatchNorm statistics).

The step is a pure function of ``(TrainState, batch)`` built from ``nnx.split`` /
``nnx.merge`` (``nnx.jit`` would add Python overhead per step); each training phase
the detector names (NanoDet-Plus: before / after ``detach_epoch``) is one compiled
program.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from nanodet_jax import precision
from nanodet_jax.data import canvas_resize, transforms
from nanodet_jax.data.augment import color_augment_and_normalize
from nanodet_jax.training import distributed
from nanodet_jax.training.ema import WEIGHT_AVERAGERS

Batch = dict[str, jax.Array]


class TrainState(struct.PyTreeNode):
    """Everything a step changes; a pytree, checkpointed as is."""

    step: jax.Array  # int32: optimizer steps taken so far
    params: nnx.State  # trainable parameters (nnx.Param), float32 master copy
    model_state: nnx.State  # BatchNorm statistics and buffers
    opt_state: optax.OptState
    ema: nnx.State  # EMA of params *and* model_state, as NanoDet's ExpMovingAverager


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Train-mode graph definition, parameters, and the rest of the state."""
    model.train()
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    return graphdef, params, model_state


def create_train_state(
    model: nnx.Module, tx: optax.GradientTransformation
) -> tuple[Any, TrainState]:
    graphdef, params, model_state = split_model(model)
    ema = jax.tree.map(jnp.copy, nnx.merge_state(params, model_state))
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=tx.init(params),
        ema=ema,
    )
    return graphdef, state


def merge_for_eval(graphdef: Any, full_state: nnx.State) -> nnx.Module:
    """An eval-mode model from the train graph and a full state (e.g. the EMA weights)."""
    model = nnx.merge(graphdef, full_state, copy=True)
    model.eval()
    return model


def compute_dtype(config: Any) -> jnp.dtype:
    precision = str(config.device.get("precision", "fp32")).lower()
    if precision in ("fp32", "32", "float32"):
        return jnp.float32
    if precision in ("bf16", "bfloat16"):
        return jnp.bfloat16
    raise ValueError(f"device.precision must be fp32 or bf16, got {precision!r}")


def make_train_step(
    graphdef: Any,
    tx: optax.GradientTransformation,
    config: Any,
    *,
    phase: str,
    lr_fn: Callable[[jax.Array], jax.Array] | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The (un-jitted) train step of one training ``phase``; ``lr_fn`` only feeds the metrics."""
    train = config.data.train
    resize = canvas_resize.from_config(train, "data.train")
    # The batch shapes the loader makes: one per canvas (each compiles its own step).
    canvases = (
        {(h, w) for w, h in resize.canvases} if resize else {transforms.canvas_hw(train.input_size)}
    )
    mean, std = (tuple(v) for v in train.pipeline.normalize)
    averager_cfg = config.model.weight_averager
    average = WEIGHT_AVERAGERS.get(averager_cfg.get("name", "ExpMovingAverager"))
    decay = float(averager_cfg.decay)
    dtype = compute_dtype(config)

    def run_dtype(param_dtype: jnp.dtype) -> jnp.dtype:
        # fp32 computes in the master copy's own dtype: float32, or float64 for a float64
        # state under jax_enable_x64 (the reference runs of the numerical checks).
        return dtype if dtype != jnp.float32 else precision.compute_dtype(param_dtype)

    def step_fn(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        images = color_augment_and_normalize(
            batch["images"], batch["color"], mean, std, batch.get("valid_hw")
        )
        if images.shape[1:3] not in canvases:
            raise ValueError(f"batch images {images.shape[1:3]} not in configured {canvases}")
        targets = {k: batch[k] for k in ("gt_boxes", "gt_labels", "gt_mask")}

        def loss_fn(params):
            compute_params = jax.tree.map(lambda p: p.astype(run_dtype(p.dtype)), params)
            model = nnx.merge(graphdef, compute_params, state.model_state, copy=True)
            image_dtype = run_dtype(jax.tree.leaves(params)[0].dtype)
            total, terms = model.loss(images.astype(image_dtype), targets, phase)
            new_model_state = nnx.state(model, nnx.Not(nnx.Param))
            return total, (terms, new_model_state)

        (loss, (terms, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step = state.step + 1
        ema = average(state.ema, nnx.merge_state(params, model_state), step, decay)
        metrics = {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads)}
        if lr_fn is not None:
            metrics["lr"] = lr_fn(state.step)
        new_state = TrainState(step, params, model_state, opt_state, ema)
        return new_state, metrics

    return step_fn


def jit_train_step(
    graphdef: Any,
    tx: optax.GradientTransformation,
    config: Any,
    mesh: Mesh,
    *,
    phase: str,
    lr_fn: Callable[[jax.Array], jax.Array] | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The train step compiled for ``mesh``: state replicated (and donated), batch split.

    Every batch statistic in the step (BatchNorm moments, loss normalisers) is then a
    reduction over the global batch, which XLA lowers to cross-device collectives.
    """
    replicated = distributed.replicated(mesh)
    return jax.jit(
        make_train_step(graphdef, tx, config, phase=phase, lr_fn=lr_fn),
        in_shardings=(replicated, distributed.batch_sharded(mesh)),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


def batch_from_host(batch: dict[str, np.ndarray]) -> Batch:
    """The device-side fields of a loader batch."""
    keys = ("images", "color", "gt_boxes", "gt_labels", "gt_mask", "valid_hw")
    return {k: batch[k] for k in keys if k in batch}
