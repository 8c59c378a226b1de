"""Every ``name`` a config carries selects a registry entry; an unknown one fails naming the
field and listing what exists (``nanodet_jax/registry.py``)."""

from __future__ import annotations

import copy

import pytest

from nanodet_jax.config.loading import apply_overrides
from nanodet_jax.evaluation import evaluator_from_config
from nanodet_jax.losses.gfl_head import build_loss_terms
from nanodet_jax.models import build_model
from nanodet_jax.registry import Registry, UnknownNameError
from nanodet_jax.training import trainer
from nanodet_jax.training.optim import build_optimizer


def test_registry_lists_what_exists_and_registers_temporarily():
    reg = Registry("model.arch.thing", {"B": 2, "A": 1})
    with pytest.raises(
        UnknownNameError, match=r"^unknown model.arch.thing name 'C'; available: A, B$"
    ):
        reg.get("C")
    with reg.registered("C", 3):
        assert reg["C"] == 3 and reg.names() == ["A", "B", "C"]
    assert "C" not in reg
    with pytest.raises(ValueError, match="already registered"):
        reg.register("A", 5)


@pytest.mark.parametrize(
    "field,known",
    [
        ("model.arch.backbone.name", "ShuffleNetV2"),
        ("model.arch.fpn.name", "GhostPAN"),
        ("model.arch.head.name", "NanoDetPlusHead"),
        ("model.arch.aux_head.name", "SimpleConvHead"),
    ],
)
def test_unknown_module_names(small_config, field, known):
    config = copy.deepcopy(small_config)
    apply_overrides(config, [f"--config.{field}=Nope"])
    kind = field.rsplit(".", 1)[0].replace("aux_head", "head")
    with pytest.raises(
        UnknownNameError, match=rf"unknown {kind} name 'Nope'; available: .*{known}"
    ):
        build_model(config)


def test_unknown_assigner_name(small_config):
    config = copy.deepcopy(small_config)
    with config.unlocked():
        config.model.arch.head.assigner_cfg = {"name": "ATSS", "topk": 9}
    expected = r"assigner_cfg name 'ATSS'; available: ATSSAssigner, Dynamic"
    with pytest.raises(UnknownNameError, match=expected):
        build_model(config)


@pytest.mark.parametrize("term", ["loss_qfl", "loss_dfl", "loss_bbox"])
def test_unknown_loss_names(small_config, term):
    loss_cfg = small_config.model.arch.head.loss.to_dict()
    assert sorted(build_loss_terms(loss_cfg)) == ["loss_bbox", "loss_dfl", "loss_qfl"]
    loss_cfg[term]["name"] = "FocalLoss"
    with pytest.raises(UnknownNameError, match=rf"loss.{term} name 'FocalLoss'; available: "):
        build_loss_terms(loss_cfg)


def test_unknown_loss_option(small_config):
    loss_cfg = small_config.model.arch.head.loss.to_dict()
    loss_cfg["loss_qfl"]["reduction"] = "sum"
    with pytest.raises(ValueError, match="QualityFocalLoss: reduction='sum' is not supported"):
        build_loss_terms(loss_cfg)


def test_unknown_evaluator_and_weight_averager(small_config, small_model):
    config = copy.deepcopy(small_config)
    apply_overrides(config, ["--config.evaluator.name=VOCEvaluator"])
    with pytest.raises(UnknownNameError, match=r"evaluator name 'VOCEvaluator'; available: Coco"):
        evaluator_from_config(config)
    apply_overrides(config, ["--config.model.weight_averager.name=SWA"])
    tx = build_optimizer(config, steps_per_epoch=10)
    graphdef, _, _ = trainer.split_model(copy.deepcopy(small_model))
    with pytest.raises(UnknownNameError, match=r"weight_averager name 'SWA'; available: ExpMov"):
        trainer.make_train_step(graphdef, tx, config, phase="joint")


def test_nanodet_plus_refuses_another_assigner(small_config):
    config = copy.deepcopy(small_config)
    with config.unlocked():
        config.model.arch.head.assigner_cfg = {"name": "ATSSAssigner", "topk": 9}
    with pytest.raises(ValueError, match="NanoDetPlus assigns with DynamicSoftLabelAssigner"):
        build_model(config)
