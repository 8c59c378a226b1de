"""The weight average of a model with RNG state (TAN's nnx.Dropout, EfficientNet-Lite's
drop-connect stream): weights and statistics are averaged, the RNG key and count are
the current model's (a PRNG key cannot be multiplied; train.py stopped at the first
step of every EfficientNet-Lite config), and the evaluation's local copy of that
average keeps the key a key (NumPy has none; NanoDet-t's run stopped at its eval), and
a checkpoint of such a model restores (the key was saved as its data, shape (2,), and
refused as a shape mismatch with the model's key of shape ())."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from nanodet_jax.training import distributed, trainer
from nanodet_jax.training.ema import ema_decay, update_ema
from nanodet_jax.weights import checkpoint


class _WithDropout(nnx.Module):
    def __init__(self, seed: int):
        self.linear = nnx.Linear(3, 2, rngs=nnx.Rngs(seed))
        self.norm = nnx.BatchNorm(2, rngs=nnx.Rngs(seed))
        self.drop = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=seed))


def test_rng_state_is_carried_weights_are_averaged() -> None:
    ema_model, current_model = _WithDropout(0), _WithDropout(1)
    current_model.drop(jnp.ones(4))  # advances the current model's dropout count
    ema, current = nnx.state(ema_model), nnx.state(current_model)
    it = jnp.int32(7)
    out = jax.jit(update_ema, static_argnums=3)(ema, current, it, 0.9998)

    d = float(ema_decay(7.0, 0.9998))
    np.testing.assert_allclose(
        out["linear"]["kernel"].get_value(),
        ema["linear"]["kernel"].get_value() * (1 - d) + current["linear"]["kernel"].get_value() * d,
        rtol=1e-6,
    )
    rngs_out, rngs_now = out["drop"]["rngs"], current["drop"]["rngs"]
    np.testing.assert_array_equal(
        jax.random.key_data(rngs_out["key"].get_value()),
        jax.random.key_data(rngs_now["key"].get_value()),
    )
    assert int(rngs_out["count"].get_value()) == int(rngs_now["count"].get_value()) == 1


def test_local_copy_of_a_replicated_state_with_a_key_evaluates() -> None:
    model = _WithDropout(0)
    mesh = distributed.data_mesh(jax.devices()[:1])
    state = jax.device_put(nnx.state(model), distributed.replicated(mesh))
    local = distributed.local_copy(state)
    assert isinstance(local["linear"]["kernel"].get_value(), np.ndarray)
    eval_model = trainer.merge_for_eval(nnx.graphdef(model), local)
    x = jnp.ones((1, 3))
    np.testing.assert_array_equal(eval_model.drop(eval_model.linear(x)), model.linear(x))


def test_checkpoint_of_a_model_with_a_key_restores(tmp_path) -> None:
    config = ml_collections.ConfigDict(
        {"name": "t", "class_names": ["a"], "data": {"val": {"input_size": [32, 32]}}}
    )
    saved = _WithDropout(0)
    saved.drop(jnp.ones(4))  # count 1, so a restore that kept the fresh model's would show
    checkpoint.save_weights(tmp_path / "ckpt", saved, config)
    other = _WithDropout(1)
    checkpoint.restore_weights(tmp_path / "ckpt", other)
    np.testing.assert_array_equal(other.linear.kernel.get_value(), saved.linear.kernel.get_value())
    np.testing.assert_array_equal(
        jax.random.key_data(other.drop.rngs.key.get_value()),
        jax.random.key_data(saved.drop.rngs.key.get_value()),
    )
    assert int(other.drop.rngs.count.get_value()) == 1
