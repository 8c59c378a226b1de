"""BatchNorm recalibration keeps the eval-mode function and makes train mode agree with it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nanodet_jax.models import build_model
from nanodet_jax.training.bn_recalibration import recalibrate_batchnorm
from nanodet_jax.weights.pytorch import load_torch_weights
from tests.weights.test_convert import random_weights


def folded(model) -> dict[str, np.ndarray]:
    """Weights with BatchNorm folded away, as exported from ncnn: identity statistics."""
    sd = random_weights(model, seed=4)
    for k in sd:
        if k.endswith("running_mean"):
            sd[k] = np.zeros_like(sd[k])
        elif k.endswith("running_var"):
            sd[k] = np.full_like(sd[k], 1 - 1e-5)
        elif k.endswith("weight") and sd[k].ndim == 1 and not k.startswith("aux_head"):
            sd[k] = np.ones_like(sd[k])
    return sd


def test_function_kept_and_train_mode_close(small_config):
    model = build_model(small_config)
    load_torch_weights(model, folded(model))
    rng = np.random.default_rng(0)
    batches = [jnp.asarray(rng.normal(size=(4, 64, 64, 3)).astype(np.float32)) for _ in range(3)]
    x = batches[0]
    fwd = jax.jit(lambda m, x: m.forward_train(x, detach_aux=False))
    model.eval()
    before = fwd(model, x)
    n = recalibrate_batchnorm(model, batches)
    assert n > 100
    model.eval()
    after = fwd(model, x)
    for a, b in zip(before, after):
        np.testing.assert_allclose(
            np.asarray(b), np.asarray(a), rtol=2e-4, atol=2e-4 * float(jnp.abs(a).max())
        )
    # Train mode on exactly the calibration batches normalises every layer with the
    # statistics recalibration measured (same biased variance, same inputs, since the
    # eval-mode function is unchanged), so it reproduces eval mode up to float noise.
    # Measured on CPU: 1.1e-6 (head) and 9.4e-5 (aux head, values near zero) of the
    # largest output. The unbiased variance n/(n-1) in train-mode normalisation gives
    # 4.7e-3 (head), in the recalibrated statistics 1.3e-2.
    evals = [fwd(model, b) for b in batches]
    model.train()
    train_outs = fwd(model, jnp.concatenate(batches))
    for name, i, tol in (("head", 0, 1e-5), ("aux_head", 1, 1e-3)):
        expected = jnp.concatenate([e[i] for e in evals])
        err = float(jnp.abs(train_outs[i] - expected).max() / jnp.abs(expected).max())
        assert err < tol, f"{name}: train mode differs from eval mode by {err:.3g} (> {tol})"
    bn = model.backbone.conv1[1]
    assert not np.allclose(np.asarray(bn.running_var[...]), 1 - 1e-5)
