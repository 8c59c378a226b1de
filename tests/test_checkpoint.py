"""Orbax weight checkpoints: exact round trip, EMA preference, clear architecture errors."""

from __future__ import annotations

import numpy as np
import pytest

from nanodet_jax import checkpoint
from nanodet_jax.convert import WeightMismatchError, load_torch_weights, model_variables
from nanodet_jax.model import build_model
from tests.test_convert import random_weights


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
    full = build_model(small_config, seed=1)
    checkpoint.save_weights(tmp_path / "ckpt", full, small_config)
    inference = build_model(small_config, with_aux=False, seed=3)
    checkpoint.restore_weights(tmp_path / "ckpt", inference)
    np.testing.assert_array_equal(
        np.asarray(inference.head.gfl_cls[0].weight[...]),
        np.asarray(full.head.gfl_cls[0].weight[...]),
    )


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
