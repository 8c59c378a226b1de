"""Orbax weight checkpoints: exact round trip, EMA preference, clear architecture errors."""

from __future__ import annotations

import numpy as np
import optax
import pytest
from flax import nnx

from nanodet_jax.models import build_model
from nanodet_jax.training import trainer
from nanodet_jax.weights import checkpoint
from nanodet_jax.weights.pytorch import WeightMismatchError, load_torch_weights, model_variables
from tests.weights.test_convert import random_weights


def values(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v[...]) for k, v in model_variables(model).items()}


def test_save_restore_exact(tmp_path, small_config):
    model = build_model(small_config, seed=1)
    load_torch_weights(model, random_weights(model, seed=9))
    checkpoint.save_weights(tmp_path / "ckpt", model, small_config)
    other = build_model(small_config, seed=2)
    meta = checkpoint.restore_weights(tmp_path / "ckpt", other)
    assert meta["class_names"] == list(small_config.class_names)
    a, b = values(model), values(other)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_inference_model_restores_from_training_checkpoint(tmp_path, small_config):
    """A training checkpoint (raw weights, EMA, optimizer) restores into an inference
    model: every tensor, parameters and BatchNorm statistics, from the EMA item (what
    evaluation uses), or from the raw weights with prefer_ema=False."""
    raw = build_model(small_config, seed=1)
    load_torch_weights(raw, random_weights(raw, seed=9))
    ema = build_model(small_config, seed=1)
    load_torch_weights(ema, random_weights(ema, seed=10))
    _, state = trainer.create_train_state(raw, optax.sgd(0.1))
    state = state.replace(ema=nnx.state(ema))
    mngr = checkpoint.train_manager(tmp_path / "ckpt", keep=1)
    checkpoint.save_train_state(mngr, state, {"epoch": 1})
    mngr.wait_until_finished()
    mngr.close()
    for prefer_ema, source in ((True, ema), (False, raw)):
        inference = build_model(small_config, with_aux=False, seed=3)
        checkpoint.restore_weights(tmp_path / "ckpt", inference, prefer_ema=prefer_ema)
        got, expected = values(inference), values(source)
        assert set(got) == {k for k in expected if not k.startswith(("aux_fpn.", "aux_head."))}
        assert any(k.endswith("running_var") for k in got)
        for k, v in got.items():
            np.testing.assert_array_equal(v, expected[k], err_msg=f"{k} (prefer_ema={prefer_ema})")


def test_wrong_architecture_checkpoint(tmp_path, small_config, m_config):
    checkpoint.save_weights(tmp_path / "ckpt", build_model(small_config), small_config)
    with pytest.raises(WeightMismatchError, match="shape mismatch"):
        checkpoint.restore_weights(tmp_path / "ckpt", build_model(m_config, with_aux=False))


def test_missing_directory(tmp_path, small_model):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        checkpoint.restore_weights(tmp_path / "nope", small_model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no orbax checkpoint steps"):
        checkpoint.restore_weights(tmp_path / "empty", small_model)


def test_training_checkpoint_digest_catches_changed_data(tmp_path, small_config, caplog):
    """A training checkpoint carries its state's SHA-256: a restore that does not give those
    exact bytes is refused, and resuming falls back to the previous step (test_kill.py
    damages real files). Here step 2's recorded digest is altered, as changed array bytes
    that still decode would make it."""
    import os

    _, state = trainer.create_train_state(build_model(small_config, seed=1), optax.sgd(0.1))
    mngr = checkpoint.train_manager(tmp_path / "ckpt", keep=2)
    for step in (1, 2):
        checkpoint.save_train_state(mngr, state.replace(step=step), {"epoch": 0})
    mngr.wait_until_finished()
    digest = checkpoint.train_state_digest(state)
    edited = 0
    for root, _, files in os.walk(tmp_path / "ckpt" / "2"):
        for name in files:
            path = os.path.join(root, name)
            text = open(path, "rb").read()
            if digest.encode() in text:
                open(path, "wb").write(text.replace(digest.encode(), b"0" * len(digest)))
                edited += 1
    assert edited == 1
    with pytest.raises(checkpoint.CorruptCheckpointError, match="step 2: the restored state's"):
        checkpoint.restore_train_state(mngr, state, 2)
    restored, _ = checkpoint.restore_latest_train_state(mngr, state)
    assert int(restored.step) == 1
    assert checkpoint.train_state_digest(restored) == digest
    assert f"{tmp_path / 'ckpt' / '2'} cannot be restored" in caplog.text
    mngr.close()
