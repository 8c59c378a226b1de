"""ImageNet backbones (``model.arch.backbone.pretrain``): torchvision-format ShuffleNetV2
state_dicts, in torchvision's own key layout, load by rule, and the backbone then equals
NanoDet's ShuffleNetV2 after its ``pretrain`` path on the same weights; a wrong file
stops with one readable error; train.py starts from them only when training from scratch.

``tests/data/golden_pretrained.npz`` is written by
``python tools/make_golden_pretrained.py /path/to/RangiLyu/nanodet``; the weights are
regenerated here from its seed with torchvision (``tools/torchvision_cpu.py``).
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
from flax import nnx

from nanodet_jax.models.backbones.pretrained import (
    TORCHVISION_FILES,
    load_pretrained_backbone,
    load_pretrained_for_training,
)
from nanodet_jax.models.backbones.shufflenetv2 import ShuffleNetV2
from nanodet_jax.weights.pytorch import WeightMismatchError, model_variables
from tests.conftest import REPO, skip_unless_ci

pytestmark = pytest.mark.needs_torch

GOLDEN = os.path.join(REPO, "tests", "data", "golden_pretrained.npz")
TOLERANCE = 1e-5  # max |ours - NanoDet|; outputs are O(1), NanoDet's own f32 noise ~5e-7


@pytest.fixture(scope="module")
def tv_tools():
    """tools/torchvision_cpu.py with torchvision importable, or a skip saying why."""
    from tools import torchvision_cpu

    try:
        torchvision_cpu.import_torchvision()
    except ImportError as e:
        skip_unless_ci(str(e), "the pretrained-backbone tests would be skipped")
    return torchvision_cpu


@pytest.fixture(scope="module")
def golden() -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(GOLDEN) as f:
        arrays = {k: f[k] for k in f.files}
    return json.loads(str(arrays.pop("meta"))), arrays


def backbone(size: str, activation: str = "LeakyReLU") -> ShuffleNetV2:
    model = ShuffleNetV2(size, (2, 3, 4), activation=activation, rngs=nnx.Rngs(0))
    model.eval()
    return model


def save(state_dict, path) -> str:
    import torch

    torch.save(state_dict, path)
    return str(path)


@pytest.mark.parametrize("size", ["0.5x", "1.0x", "1.5x", "2.0x"])
def test_torchvision_weights_equal_nanodet_pretrain(size, tv_tools, golden):
    meta, arrays = golden
    state_dict = tv_tools.seeded_shufflenet_state_dict(size, meta["weight_seed"])
    model = backbone(size, meta["activation"])
    report = load_pretrained_backbone(model, state_dict)
    # Every backbone tensor came from the file; what was not taken is what NanoDet left out.
    assert sorted(report.loaded) == sorted(model_variables(model))
    assert sorted(set(state_dict) - set(report.loaded)) == meta["nanodet_left_out"][size]
    x = np.random.RandomState(meta["input_seed"]).standard_normal(meta["input_shape"])
    outs = model(np.transpose(x.astype(np.float32), (0, 2, 3, 1)))
    diffs = []
    for stage, out in zip((2, 3, 4), outs):
        expected = arrays[f"{size}/stage{stage}"]
        assert out.shape == expected.shape, (stage, out.shape, expected.shape)
        diffs.append(float(np.abs(np.asarray(out) - expected).max()))
    print(f"{size}: max |ours - NanoDet| per stage {', '.join(f'{d:.2e}' for d in diffs)}")
    assert max(diffs) <= TOLERANCE, (size, diffs)


def test_file_path_and_torch_hub_cache(tv_tools, tmp_path, monkeypatch, caplog):
    """A path loads; ``True`` reads torchvision's file name from the torch hub cache (and
    says where to put it when it is absent); a file without ``num_batches_tracked``
    (pre-0.4.1 PyTorch) loads too."""
    state_dict = tv_tools.seeded_shufflenet_state_dict("0.5x", 3)
    path = save(state_dict, tmp_path / "x.pth")
    caplog.set_level(logging.INFO, logger="nanodet_jax")
    report = load_pretrained_backbone(backbone("0.5x"), path)
    assert path in report.source and "left out 8 tensors (fc.*, conv5.*)" in caplog.text

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FileNotFoundError, match="shufflenetv2_x0.5-f707e7126e.pth") as e:
        load_pretrained_backbone(backbone("0.5x"), True)
    assert "--config.model.arch.backbone.pretrain=" in str(e.value)
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    old = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    save(old, cache / TORCHVISION_FILES["0.5x"])
    model = backbone("0.5x")
    load_pretrained_backbone(model, True)
    weight = np.asarray(model_variables(model)["stage3.1.branch2.1.running_var"][...])
    np.testing.assert_array_equal(weight, state_dict["stage3.1.branch2.1.running_var"].numpy())


def test_wrong_files_give_one_readable_error(tv_tools, tmp_path):
    """A ResNet-18, another ShuffleNetV2 width, a whole detector, a dropped and an extra
    tensor: each one WeightMismatchError naming the file and the offending keys."""
    tv = tv_tools.import_torchvision()
    resnet = save(tv.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(WeightMismatchError) as e:
        load_pretrained_backbone(backbone("1.0x"), resnet)
    message = str(e.value)
    print(message)
    assert message.startswith(f"ImageNet backbone {resnet} does not fit this model:")
    assert "missing (" in message and "unexpected (" in message
    assert "    layer1.0.conv1.weight" in message and "    conv1.0.weight" in message
    assert "no key of this file is a ShuffleNetV2 key" in message
    assert "shufflenetv2_x1-5666bf0f80.pth" in message
    assert len(message.splitlines()) < 100  # listed 40 per kind at most

    wider = tv_tools.seeded_shufflenet_state_dict("1.5x", 0)
    with pytest.raises(WeightMismatchError) as e:
        load_pretrained_backbone(backbone("1.0x"), wider)
    message = str(e.value)
    assert "shape mismatch (" in message and "missing (" not in message
    assert "    stage2.0.branch1.2.weight: checkpoint (88, 24, 1, 1), model (58, 24, 1, 1)" in (
        message
    )

    detector = {f"backbone.{k}": v for k, v in wider.items()}
    with pytest.raises(WeightMismatchError, match="whole-detector checkpoint: use init_from"):
        load_pretrained_backbone(backbone("1.5x"), detector)

    edited = dict(wider)
    del edited["stage3.4.branch2.3.weight"]
    edited["stage5.0.weight"] = wider["conv5.0.weight"]
    with pytest.raises(WeightMismatchError) as e:
        load_pretrained_backbone(backbone("1.5x"), edited)
    message = str(e.value)
    assert "missing (1):\n    stage3.4.branch2.3.weight\n" in message
    assert "unexpected (1):\n    stage5.0.weight\n" in message


class _Config(dict):
    """The two fields load_pretrained_for_training reads, with ConfigDict's access."""

    def __getattr__(self, name):
        return self[name]


def _config(pretrain, init_from=None) -> _Config:
    arch = _Config(backbone=_Config(pretrain=pretrain))
    return _Config(model=_Config(arch=arch), init_from=init_from)


def test_training_start_point(tv_tools, tmp_path, caplog):
    """Loaded from scratch only: ``init_from`` or a resumed checkpoint gives the weights
    (a path that does not exist is then never opened); no ``pretrain``, nothing."""

    class Model(nnx.Module):
        def __init__(self):
            self.backbone = backbone("0.5x")

    path = save(tv_tools.seeded_shufflenet_state_dict("0.5x", 5), tmp_path / "x.pth")
    caplog.set_level(logging.INFO, logger="nanodet_jax")
    assert load_pretrained_for_training(Model(), _config(path), resuming=False) is not None
    absent = str(tmp_path / "absent.pth")
    assert load_pretrained_for_training(Model(), _config(absent), resuming=True) is None
    assert "not loaded: the run resumes" in caplog.text
    assert load_pretrained_for_training(Model(), _config(absent, "x.pth"), resuming=False) is None
    assert "not loaded: init_from provides the weights" in caplog.text
    for off in (None, False):
        assert load_pretrained_for_training(Model(), _config(off), resuming=False) is None
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_pretrained_for_training(Model(), _config(absent), resuming=False)


@pytest.mark.slow
def test_train_py_starts_from_the_pretrained_backbone(tv_tools, shapes, tmp_path, capsys):
    """train.py with ``--config.model.arch.backbone.pretrain=<file>``: the step-1 weights
    are the file's backbone moved by one warm-up step. (A resumed run does not reload it:
    test_training_start_point, without a second train.py run.)"""
    from nanodet_jax.cli import train as train_cli
    from nanodet_jax.config.loading import load_config
    from nanodet_jax.models import build_model
    from nanodet_jax.weights import checkpoint

    # NanoDet-Plus's warm-up starts at lr ~1e-7 (the legacy recipe's at 1.4e-2), and its
    # step is the one test_finetune.py's run compiles (the XLA cache serves both).
    from tests.training.test_train import plus_args as train_args

    state_dict = tv_tools.seeded_shufflenet_state_dict("0.5x", 9)
    path = save(state_dict, tmp_path / "shufflenetv2_x0.5.pth")
    workdir = tmp_path / "run"
    argv = [*train_args(shapes, workdir, 1), f"--config.model.arch.backbone.pretrain={path}"]
    train_cli.main(argv)
    assert f"loaded 330 tensors from ImageNet backbone {path}" in capsys.readouterr().err

    args, overrides = train_cli.parse_args(argv)
    model = build_model(load_config(args.config, overrides))
    checkpoint.restore_weights(workdir / "checkpoints", model, prefer_ema=False)
    compared = 0
    for k, var in model_variables(model.backbone).items():
        if k.endswith(".weight") and var[...].ndim == 4:  # convs (BatchNorm stats moved)
            expected = np.transpose(state_dict[k].numpy(), (2, 3, 1, 0))
            np.testing.assert_allclose(np.asarray(var[...]), expected, atol=1e-5, err_msg=k)
            compared += 1
    assert compared == 55
