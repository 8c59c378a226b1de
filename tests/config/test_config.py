"""Config files and ``--config.a.b=value`` overrides."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from nanodet_jax.config.loading import apply_overrides, load_config, split_overrides
from nanodet_jax.models import build_model
from nanodet_jax.weights.pytorch import model_variables, to_torch_layout
from tests.conftest import REPO, config_path

NANODET_VALUES = {
    # file: (model_size, input size, PAN channels, aux channels) from NanoDet's yml files
    "nanodet_plus_m.py": ("1.0x", 320, 96, 192),
    "nanodet_plus_m_416.py": ("1.0x", 416, 96, 192),
    "nanodet_plus_m_1.5x.py": ("1.5x", 320, 128, 256),
    "nanodet_plus_m_1.5x_416.py": ("1.5x", 416, 128, 256),
}


@pytest.mark.parametrize("name", sorted(NANODET_VALUES))
def test_configs_carry_nanodet_values(name):
    c = load_config(config_path(name))
    size, res, pan, aux = NANODET_VALUES[name]
    arch = c.model.arch
    assert arch.backbone.model_size == size and arch.fpn.out_channels == pan
    assert arch.aux_head.feat_channels == aux and arch.aux_head.input_channel == aux
    assert c.data.train.input_size == [res, res] and c.data.val.input_size == [res, res]
    assert arch.head.strides == [8, 16, 32, 64] and arch.head.reg_max == 7
    assert arch.detach_epoch == 10 and c.model.weight_averager.decay == 0.9998
    assert c.schedule.optimizer.lr == 0.001 and c.schedule.optimizer.weight_decay == 0.05
    assert c.schedule.warmup.steps == 500 and c.schedule.lr_schedule.eta_min == 5e-5
    assert c.grad_clip == 35 and len(c.class_names) == 80
    assert c.data.train.pipeline.normalize == [[103.53, 116.28, 123.675], [57.375, 57.12, 58.395]]


def test_overrides_are_typed():
    c = load_config(
        config_path("nanodet_plus_m.py"),
        ["--config.data.val.ann_file=/a/b.json", "--config.test.nms_pre", "500",
         "--config.grad_clip=10", "--config.data.val.keep_ratio=true",
         "--config.model.arch.head.strides=[8, 16]"],
    )  # fmt: skip
    assert c.data.val.ann_file == "/a/b.json"
    assert c.test.nms_pre == 500 and c.grad_clip == 10.0 and isinstance(c.grad_clip, float)
    assert c.data.val.keep_ratio is True and c.model.arch.head.strides == [8, 16]


def test_pretrain_takes_a_path_where_the_config_says_true():
    """NanoDet's .yml says ``pretrain: True`` (a bool field); an override may still name a
    torchvision checkpoint, or switch it off; other bool fields stay strictly boolean."""
    config = load_config(
        config_path("nanodet_plus_m.py"), ["--config.model.arch.backbone.pretrain=True"]
    )
    for text, value in (("/w/shufflenetv2.pth", "/w/shufflenetv2.pth"), ("false", False),
                        ("None", None), ("true", True)):  # fmt: skip
        apply_overrides(config, [f"--config.model.arch.backbone.pretrain={text}"])
        assert config.model.arch.backbone.pretrain == value
    with pytest.raises(ValueError, match="expected a boolean, got '/a.pth'"):
        apply_overrides(config, ["--config.data.val.keep_ratio=/a.pth"])


def test_unknown_override_is_an_error():
    with pytest.raises(KeyError, match="no field 'nms_pree'"):
        load_config(config_path("nanodet_plus_m.py"), ["--config.test.nms_pree=1"])
    with pytest.raises(ValueError, match="unrecognised argument"):
        load_config(config_path("nanodet_plus_m.py"), ["--oops"])


def test_1_5x_builds_with_nanodet_key_count():
    """Every key, in order, with its shape, of NanoDet's own NanoDetPlus 1.5x state_dict
    (recorded from a nanodet checkout: tests/data/golden_torch_keys.json, see
    tools/check_export_torch.py --record-keys); the inference model is that minus the
    aux branch."""
    with open(os.path.join(REPO, "tests", "data", "golden_torch_keys.json")) as f:
        golden = json.load(f)
    layout = golden["architectures"][golden["configs"]["configs/nanodet_plus_m_1.5x.py"]]
    expected = [(k, tuple(shape)) for k, shape, _ in layout]
    assert len(expected) == 887  # NanoDet's count, aux branch included
    model = build_model(load_config(config_path("nanodet_plus_m_1.5x.py")))
    got = [
        (k, to_torch_layout(np.asarray(v[...])).shape) for k, v in model_variables(model).items()
    ]
    assert len(got) == len(expected), (len(got), len(expected))
    wrong = [f"{g} != NanoDet's {e}" for g, e in zip(got, expected) if g != e]
    assert not wrong, f"{len(wrong)} keys differ: " + "; ".join(wrong[:3])
    inference = build_model(load_config(config_path("nanodet_plus_m_1.5x.py")), with_aux=False)
    assert list(model_variables(inference)) == [
        k for k, _ in expected if not k.startswith(("aux_fpn.", "aux_head."))
    ]


def test_split_overrides_keeps_positionals_apart():
    # For parsers with positionals (predict): values with spaces and the two-token form.
    argv = ["--config", "c.py", "--config.class_names=['a', 'b']", "x.jpg",
            "--config.test.nms_pre", "500", "--out-dir", "o", "folder/"]  # fmt: skip
    others, overrides = split_overrides(argv)
    assert others == ["--config", "c.py", "x.jpg", "--out-dir", "o", "folder/"]
    assert overrides == ["--config.class_names=['a', 'b']", "--config.test.nms_pre", "500"]
