"""PyTorch <-> ours weight conversion: rule-based mapping, round trips, clear errors."""

from __future__ import annotations

import os

import numpy as np
import pytest

from nanodet_jax.models import build_model
from nanodet_jax.testing import random_state_dict
from nanodet_jax.weights.pytorch import (
    WeightMismatchError,
    extract_state_dict,
    load_torch_weights,
    model_variables,
    to_torch_layout,
)


def torch_shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: to_torch_layout(np.asarray(v[...])).shape for k, v in model_variables(model).items()}


def random_weights(model, seed=3) -> dict[str, np.ndarray]:
    return random_state_dict(torch_shapes(model), seed)


def our_weights_in_torch_layout(model) -> dict[str, np.ndarray]:
    return {k: to_torch_layout(np.asarray(v[...])) for k, v in model_variables(model).items()}


def test_keys_are_nanodet_names(small_model):
    keys = set(model_variables(small_model))
    assert "backbone.stage2.0.branch1.0.weight" in keys
    assert "fpn.top_down_blocks.0.blocks.0.shortcut.2.weight" in keys
    assert "head.cls_convs.0.1.pwnorm.running_var" in keys
    assert "head.distribution_project.project" in keys
    assert "aux_head.scales.3.scale" in keys
    assert "aux_head.cls_convs.0.gn.weight" in keys


def test_numpy_state_dict_round_trip_exact(small_config):
    model = build_model(small_config, seed=1)
    sd = random_weights(model)
    report = load_torch_weights(model, sd)
    assert not report.missing_aux and not report.reinitialized
    back = our_weights_in_torch_layout(model)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].shape == sd[k].shape, k
        np.testing.assert_array_equal(back[k], sd[k].astype(back[k].dtype), err_msg=k)


def test_wrong_architecture_lists_every_problem(small_config, m_config):
    big = build_model(m_config, with_aux=False)
    sd = random_weights(build_model(small_config, with_aux=False))
    with pytest.raises(WeightMismatchError) as err:
        load_torch_weights(big, sd)
    msg = str(err.value)
    assert "shape mismatch (528)" in msg
    assert (
        "backbone.stage2.0.branch1.2.weight: checkpoint (24, 24, 1, 1), model (58, 24, 1, 1)" in msg
    )


def test_missing_and_unexpected_keys_are_reported(small_model, small_config):
    sd = random_weights(small_model)
    del sd["fpn.reduce_layers.0.conv.weight"]
    sd["head.extra.weight"] = np.zeros(3, np.float32)
    model = build_model(small_config)
    with pytest.raises(WeightMismatchError) as err:
        load_torch_weights(model, sd)
    msg = str(err.value)
    assert "missing (1)" in msg and "fpn.reduce_layers.0.conv.weight" in msg
    assert "unexpected (1)" in msg and "head.extra.weight" in msg


def test_inference_checkpoint_into_models_with_and_without_aux(small_config):
    inference_model = build_model(small_config, with_aux=False)
    sd = random_weights(inference_model)
    assert not any(k.startswith("aux_") for k in sd)
    report = load_torch_weights(inference_model, sd)
    assert not report.missing_aux
    # Into a training model: the aux branch keeps its initialisation, with a notice.
    training_model = build_model(small_config)
    report = load_torch_weights(training_model, sd)
    assert report.missing_aux and all(k.startswith("aux_") for k in report.missing_aux)
    # A training checkpoint loads into the inference model; aux weights are ignored.
    full_sd = random_weights(build_model(small_config))
    load_torch_weights(build_model(small_config, with_aux=False), full_sd)


def test_lightning_checkpoint_prefers_ema(small_config):
    model = build_model(small_config, with_aux=False)
    raw = random_weights(model, seed=5)
    ema = random_weights(model, seed=6)
    ckpt = {
        "epoch": 3,
        "state_dict": {**{f"model.{k}": v for k, v in raw.items()},
                       **{f"avg_model.{k}": v for k, v in ema.items()}},
    }  # fmt: skip
    sd, which = extract_state_dict(ckpt)
    assert which == "EMA"
    np.testing.assert_array_equal(sd["head.gfl_cls.0.bias"], ema["head.gfl_cls.0.bias"])
    sd, which = extract_state_dict(ckpt, prefer_ema=False)
    assert which == "model"
    load_torch_weights(model, ckpt, prefer_ema=False)
    np.testing.assert_array_equal(
        np.asarray(model.head.gfl_cls[0].bias[...]), raw["head.gfl_cls.0.bias"]
    )


def test_allow_reinit_keeps_class_dependent_layers(small_config):
    # train.py's CLASS_DEPENDENT: the outputs whose shape follows the class count.
    class_dependent = ("head.gfl_cls.", "aux_head.gfl_cls.")
    sd = random_weights(build_model(small_config))
    # Pretend the checkpoint was trained with 7 classes, not 5 (2 more output channels).
    rng = np.random.default_rng(8)
    for k in [k for k in sd if k.startswith(class_dependent)]:
        sd[k] = rng.normal(size=(sd[k].shape[0] + 2, *sd[k].shape[1:])).astype(np.float32)
    other = build_model(small_config, seed=2)
    with pytest.raises(WeightMismatchError):
        load_torch_weights(other, sd)
    report = load_torch_weights(other, sd, allow_reinit=class_dependent)
    # 4 levels x (weight, bias) in the head, one conv in the aux head.
    assert sorted(report.reinitialized) == sorted(k for k in sd if k.startswith(class_dependent))
    assert len(report.reinitialized) == 10
    fresh = our_weights_in_torch_layout(build_model(small_config, seed=2))
    loaded = our_weights_in_torch_layout(other)
    for k, v in loaded.items():
        if k in report.reinitialized:
            # The fresh model's own initialisation, bit for bit ...
            np.testing.assert_array_equal(v, fresh[k], err_msg=k)
        else:  # ... and everything else exactly the checkpoint's.
            np.testing.assert_array_equal(v, sd[k].astype(v.dtype), err_msg=k)
    # ... which is NanoDet's init: normal(std 0.01) weights, bias -4.595 (sigmoid ~0.01).
    for k in report.reinitialized:
        if k.endswith("bias"):
            np.testing.assert_array_equal(loaded[k], np.float32(-4.595), err_msg=k)
        else:  # >= 1184 samples: sample std 0.01 +- 2e-4, mean 0 +- 3e-4 (and seeded)
            std = float(loaded[k].std())
            assert abs(std - 0.01) < 1e-3, f"{k}: std {std:.3g}, NanoDet initialises 0.01"
            assert abs(float(loaded[k].mean())) < 1e-3, k


@pytest.mark.needs_torch
def test_torch_file_round_trip_and_strict_load(tmp_path, small_config):
    import torch

    from nanodet_jax.weights.pytorch import save_torch_weights

    model = build_model(small_config)
    sd = random_weights(model)
    path = os.path.join(tmp_path, "w.pth")
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
    load_torch_weights(model, path)
    out = os.path.join(tmp_path, "back.pth")
    save_torch_weights(model, out)
    back = torch.load(out, weights_only=True)
    assert list(back) == list(sd)  # NanoDet's keys in NanoDet's order
    for k, v in sd.items():
        assert back[k].dtype == (
            torch.int64 if k.endswith("num_batches_tracked") else torch.float32
        )
        np.testing.assert_array_equal(back[k].numpy(), v, err_msg=k)

    # PyTorch's strict load: a module with exactly the original keys and shapes (what
    # NanoDet's model has; no nanodet checkout in CI) takes the written file as is.
    target = torch.nn.Module()
    for k, v in sd.items():
        *parents, leaf = k.split(".")
        node = target
        for name in parents:
            if not hasattr(node, name):
                node.add_module(name, torch.nn.Module())
            node = getattr(node, name)
        node.register_buffer(leaf, torch.zeros(v.shape, dtype=back[k].dtype))
    result = target.load_state_dict(back, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in target.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), sd[k], err_msg=k)

    # Ours is strict the same way: one key too many or one missing (outside the aux
    # branch, which an inference checkpoint may lack) is an error naming the key.
    extra = {**back, "head.extra.weight": torch.zeros(3)}
    with pytest.raises(WeightMismatchError, match=r"unexpected \(1\):\n +head\.extra\.weight"):
        load_torch_weights(build_model(small_config), extra)
    short = {k: v for k, v in back.items() if k != "fpn.reduce_layers.0.conv.weight"}
    torch.save(short, path)
    with pytest.raises(WeightMismatchError, match=r"missing \(1\):\n +fpn\.reduce_layers\.0"):
        load_torch_weights(build_model(small_config), path)


@pytest.mark.needs_torch
def test_real_weights_round_trip(shared_data, m_config):
    import torch

    from nanodet_jax.weights.pytorch import torch_state_dict

    path = os.path.join(shared_data, "weights", "nanodet-plus-m_320.pth")
    original = torch.load(path, weights_only=True)
    model = build_model(m_config, with_aux=False)
    load_torch_weights(model, path)
    back = torch_state_dict(model)
    assert list(back) == list(original)  # same keys, same order as NanoDet's state_dict
    for k, v in original.items():
        assert torch.equal(back[k], v), k


def test_bad_files_give_clear_errors(tmp_path, small_model):
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        load_torch_weights(small_model, os.path.join(tmp_path, "absent.pth"))
    bad = os.path.join(tmp_path, "bad.pth")
    with open(bad, "wb") as f:
        f.write(b"not a checkpoint")
    pytest.importorskip("torch")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_torch_weights(small_model, bad)
