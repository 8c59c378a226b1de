"""Fine-tuning as the README promises it: ``--config.init_from`` with a NanoDet ``.pth``
(another class count: the class-dependent output convs re-initialised, the log says which),
BatchNorm statistics re-estimated through train.py, the step-0 evaluation of the starting
weights; ``.ckpt`` and checkpoint-directory sources load every weight."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nanodet_jax.cli import train as train_cli
from nanodet_jax.config.loading import load_config
from nanodet_jax.models import build_model
from nanodet_jax.testing import SMALL_MODEL_OVERRIDES
from nanodet_jax.training import loop
from nanodet_jax.weights import checkpoint
from nanodet_jax.weights.pytorch import torch_state_dict
from tests.conftest import config_path
from tests.training.test_train import plus_args as train_args
from tests.weights.test_checkpoint import values
from tests.weights.test_convert import random_weights

CLASS_DEPENDENT = ("head.gfl_cls.", "aux_head.gfl_cls.")


@pytest.fixture(scope="module")
def five_class_weights(tmp_path_factory, small_config) -> tuple[str, dict]:
    """A 5-class training checkpoint (.pth state_dict) with random weights."""
    import torch

    model = build_model(small_config, seed=1)
    sd = random_weights(model, seed=11)
    path = tmp_path_factory.mktemp("init") / "five_classes.pth"
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, path)
    return str(path), sd


@pytest.mark.needs_torch
def test_init_from_pth_with_other_classes_through_train_py(
    shapes, five_class_weights, tmp_path, capsys
):
    """train.py, 3 classes, from 5-class weights: gfl_cls of both heads re-initialised (and
    logged), everything else from the file; BatchNorm re-estimated; step 0 evaluated."""
    path, sd = five_class_weights
    workdir = tmp_path / "run"
    argv = [
        *train_args(shapes, workdir, 1),
        f"--config.init_from={path}",
        "--config.init_bn_recalibration_images=8",
    ]
    train_cli.main(argv)  # logs to stderr (train.py sets up its own handler)
    messages = capsys.readouterr().err
    assert "class count differs from" in messages, messages[-2000:]
    assert "re-initialised head.gfl_cls, aux_head.gfl_cls" in messages, messages[-2000:]
    assert "re-estimated the statistics of" in messages
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals[0]["step"] == 0 and evals[0]["epoch"] == 0, evals  # before any training
    assert evals[-1]["step"] == 1

    # The checkpoint of step 1 holds the file's weights moved by one small step (lr at
    # warm-up start ~1e-7) and, for gfl_cls, NanoDet's init: not the file's 5-class rows.
    args, overrides = train_cli.parse_args(argv)
    config = load_config(args.config, overrides)
    model = build_model(config)
    checkpoint.restore_weights(workdir / "checkpoints", model, prefer_ema=False)
    got = torch_state_dict(model)
    # BatchNorm layers are re-estimated (statistics and, to keep the function, affine).
    batchnorms = tuple(k[: -len("running_mean")] for k in sd if k.endswith("running_mean"))
    compared = 0
    for k, v in got.items():
        v = np.asarray(v)
        if k.startswith(CLASS_DEPENDENT):
            assert v.shape != sd[k].shape, k
        elif k.startswith(batchnorms):
            continue
        else:
            compared += 1
            np.testing.assert_allclose(v, sd[k], rtol=0, atol=1e-4, err_msg=k)
    assert list(got) == list(sd) and compared == 172, compared  # conv kernels and biases
    bias = np.asarray(got["head.gfl_cls.0.bias"])[:3]
    np.testing.assert_allclose(bias, -4.595, atol=1e-3)  # NanoDet's prior-probability init
    # BN statistics are those of the data now, not the file's random ones.
    var = np.asarray(got["backbone.conv1.1.running_var"])
    assert np.abs(var - sd["backbone.conv1.1.running_var"]).max() > 0.1


@pytest.mark.needs_torch
def test_init_from_lightning_ckpt_and_checkpoint_dir(five_class_weights, tmp_path):
    """``train.init_weights`` with a Lightning .ckpt (EMA preferred) and one of our
    checkpoint directories: every weight of the source arrives."""
    import torch

    config = load_config(config_path("nanodet_plus_m.py"), SMALL_MODEL_OVERRIDES)
    _, sd = five_class_weights
    raw = {f"model.{k}": torch.from_numpy(np.full_like(np.asarray(v), 7)) for k, v in sd.items()
           if not k.endswith("num_batches_tracked")}  # fmt: skip
    ema = {f"avg_model.{k}": torch.from_numpy(np.asarray(v)) for k, v in sd.items()}
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {**raw, **ema}, "epoch": 3, "global_step": 99}, ckpt)
    model = build_model(config, seed=5)
    loop.init_weights(model, str(ckpt))
    got = {k: np.asarray(v) for k, v in torch_state_dict(model).items()}
    assert got.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(got[k], sd[k], err_msg=k)

    ckpt_dir = tmp_path / "ours"
    checkpoint.save_weights(ckpt_dir, model, config, step=3)
    fresh = build_model(config, seed=6)
    loop.init_weights(fresh, str(ckpt_dir))
    restored = values(fresh)
    for k, v in values(model).items():
        np.testing.assert_array_equal(restored[k], v, err_msg=k)
