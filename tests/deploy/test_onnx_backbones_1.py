"""ONNX graphs of ResNet, MobileNetV2 and RepVGG (opset 11) against our JAX forward.

Each backbone gets random weights (every BatchNorm statistic random, so a wrongly folded
BatchNorm shows), runs in eval mode, and onnxruntime's outputs for every output stage must
be within 1e-4 of ours relative to the stage's largest value. RepVGG is exported fused:
from the three-branch model (fused on the fly) and from the deploy model.
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from nanodet_jax.deploy import onnx_export, onnx_graph
from nanodet_jax.models.backbones import BACKBONES
from nanodet_jax.models.backbones.repvgg import repvgg_model_convert
from nanodet_jax.models.backbones.resnet import Bottleneck, ResNet
from nanodet_jax.testing import normal_input, randomise

pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'nanodet-jax[onnx]')")
onnx = pytest.importorskip("onnx")

HW = (64, 64)
TOL = 1e-4


class ShortBottleneckResNet(ResNet):  # the Bottleneck path without ResNet-50's 23M weights
    resnet_spec = {50: (Bottleneck, (2, 1, 1, 1))}


def backbone_onnx(model: nnx.Module, path: str) -> int:
    """Write the backbone's graph with one output per stage; returns the number of outputs."""
    from onnx import TensorProto, helper

    g = onnx_graph.OnnxGraph()
    outs = g.emit(onnx_graph.Value("data", (3, *HW)), model)
    names = [g.op("Identity", [v.name], out=f"out{i}") for i, v in enumerate(outs)]
    graph = helper.make_graph(
        g.nodes,
        "backbone",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, *HW])],
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, *v.shape])
            for n, v in zip(names, outs)
        ],
        g.initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_export.OPSET)])
    proto.ir_version = 6
    onnx.checker.check_model(proto, full_check=True)  # shape inference agrees with Value shapes
    onnx.save(proto, path)
    return len(outs)


def check_against_jax(
    model: nnx.Module, path: str, jax_model: nnx.Module | None = None
) -> list[float]:
    n = backbone_onnx(model, path)
    x = normal_input(7, (1, 3, *HW))
    theirs = onnx_export.onnxruntime_session(path).run(None, {"data": x})
    ours = [
        np.asarray(o).transpose(0, 3, 1, 2) for o in (jax_model or model)(x.transpose(0, 2, 3, 1))
    ]
    assert len(theirs) == len(ours) == n
    rels = []
    for i, (a, b) in enumerate(zip(theirs, ours)):
        assert a.shape == b.shape, (i, a.shape, b.shape)
        rels.append(float(np.abs(a - b).max() / np.abs(b).max()))
    assert max(rels) <= TOL, rels
    return rels


@pytest.mark.parametrize(
    "name, cfg",
    [
        ("resnet18", {"name": "ResNet", "depth": 18, "activation": "LeakyReLU"}),
        ("mobilenetv2", {"name": "MobileNetV2", "width_mult": 1.0, "out_stages": (0, 2, 4, 6)}),
    ],
)
def test_backbone_graph_matches_jax(name, cfg, tmp_path):
    model = randomise(BACKBONES.build(cfg, rngs=nnx.Rngs(0)), 3)
    print(name, check_against_jax(model, str(tmp_path / f"{name}.onnx")))


def test_bottleneck_resnet_graph_matches_jax(tmp_path, monkeypatch):
    # Emitters are found by exact type: the subclass uses ResNet's.
    monkeypatch.setitem(onnx_graph.EMITTERS, ShortBottleneckResNet, onnx_graph.EMITTERS[ResNet])
    model = randomise(ShortBottleneckResNet(50, (3, 4), rngs=nnx.Rngs(0)), 4)
    print(check_against_jax(model, str(tmp_path / "resnet50_short.onnx")))


def test_repvgg_exports_as_its_fused_deploy_model(tmp_path):
    cfg = {"name": "RepVGG", "arch": "A0", "out_stages": (2, 3, 4), "last_channel": 512}
    train_form = randomise(BACKBONES.build(cfg, rngs=nnx.Rngs(0)), 5)
    # The three-branch model is written as one conv per block ...
    print(check_against_jax(train_form, str(tmp_path / "fused.onnx")))
    convs = [n for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node if n.op_type == "Conv"]
    assert len(convs) == 1 + 2 + 4 + 14 + 1
    # ... and the deploy model gives the same graph's outputs.
    deploy = repvgg_model_convert(
        train_form, BACKBONES.build({**cfg, "deploy": True}, rngs=nnx.Rngs(1))
    )
    check_against_jax(deploy, str(tmp_path / "deploy.onnx"), jax_model=train_form)
