"""Re-estimate BatchNorm statistics on data without changing what the model computes.

Weights exported from inference runtimes (ncnn, MNN, ...) often have BatchNorm folded
into the convolutions: weight 1, bias b, running_mean 0, running_var 1. In eval mode that
is the trained network, but training normalises with *batch* statistics, which turns
every such layer into something else and wrecks the network on the first step.

For each BatchNorm with input statistics (mean m, variance s2) measured in eval mode,
    running_mean' = m, running_var' = s2,
    weight' = weight * sqrt(s2 + eps) / sqrt(running_var + eps),
    bias'   = bias + (m - running_mean) * weight / sqrt(running_var + eps)
gives exactly the same eval-mode output, while train-mode normalisation by batch
statistics now approximately reproduces it too. Fine-tuning then starts from the trained
network. For checkpoints with genuine statistics it is harmless (a re-estimate on the
fine-tuning data).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from nanodet_jax.models.norm import BatchNorm2d

log = logging.getLogger("nanodet_jax")


def measure_input_stats(model: nnx.Module, batches: Iterable[jax.Array]) -> dict:
    """Mean and variance of every BatchNorm's input over ``batches`` (normalised NHWC),
    with the model in eval mode, through both branches when the model has the aux one."""
    model.eval()
    model.set_attributes(record_input_stats=True, raise_if_not_found=False)
    graphdef, state = nnx.split(model)

    @jax.jit
    def stats_of(state, x):
        m = nnx.merge(graphdef, state, copy=True)
        m.forward_all(x)  # training-only branches (the AGM) included
        return nnx.state(m, nnx.Intermediate)

    totals, count = None, 0
    for x in batches:
        flat = {path: v for path, v in nnx.to_flat_state(stats_of(state, x))}
        batch = {path[:-1]: v.get_value() for path, v in flat.items()}
        totals = batch if totals is None else jax.tree.map(jnp.add, totals, batch)
        count += 1
    model.set_attributes(record_input_stats=False, raise_if_not_found=False)
    if not count:
        raise ValueError("BatchNorm recalibration needs at least one batch")
    out = {}
    for path, total in totals.items():
        mean, second = total[0] / count, total[1] / count
        out[path] = (mean, jnp.maximum(second - jnp.square(mean), 0.0))
    return out


def recalibrate_batchnorm(model: nnx.Module, batches: Iterable[jax.Array]) -> int:
    """Apply the function-preserving re-estimate in place; returns the number of layers."""
    stats = measure_input_stats(model, batches)
    modules = {path: m for path, m in nnx.iter_graph(model) if isinstance(m, BatchNorm2d)}
    for path, (mean, var) in stats.items():
        bn = modules[path]
        old_scale = bn.weight[...] * jax.lax.rsqrt(bn.running_var[...] + bn.eps)
        bn.bias[...] = bn.bias[...] + (mean - bn.running_mean[...]) * old_scale
        bn.weight[...] = old_scale * jnp.sqrt(var + bn.eps)
        bn.running_mean[...] = mean
        bn.running_var[...] = var
    log.info(f"re-estimated the statistics of {len(stats)} BatchNorm layers (function kept)")
    return len(stats)
