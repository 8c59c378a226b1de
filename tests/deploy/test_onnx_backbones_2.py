"""ONNX emitters of EfficientNet-Lite, GhostNet and CustomCspNet: onnxruntime on the
written opset-11 graph agrees with our JAX eval forward (random weights, every BatchNorm
statistic randomised, BatchNorm folded into the convolutions)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("onnx", reason="needs onnx (pip install 'nanodet-jax[onnx]')")
pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'nanodet-jax[onnx]')")

import onnx  # noqa: E402
from flax import nnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from nanodet_jax.deploy import onnx_export  # noqa: E402  (registers every emitter)
from nanodet_jax.deploy.onnx_graph import OnnxGraph, Value  # noqa: E402
from nanodet_jax.models.backbones import BACKBONES  # noqa: E402
from nanodet_jax.testing import normal_input, random_state_dict  # noqa: E402
from nanodet_jax.weights.pytorch import (  # noqa: E402
    load_torch_weights,
    model_variables,
    to_torch_layout,
)

TOL = 1e-4  # max|onnxruntime - ours| / max|ours| per output stage
HW = (64, 64)
CSP_HALF = [
    ["Conv", 3, 16, 3, 2],
    ["MaxPool", 3, 2],
    ["CspBlock", 16, 1, 3, 1],
    ["CspBlock", 32, 2, 3, 2],
    ["CspBlock", 64, 2, 3, 2],
    ["CspBlock", 128, 3, 3, 2],
]
CONFIGS = {
    "efficientnet_lite0": {"name": "EfficientNetLite", "model_name": "efficientnet_lite0"},
    "ghostnet": {"name": "GhostNet"},
    "custom_csp": {"name": "CustomCspNet", "net_cfg": CSP_HALF, "out_stages": [3, 4, 5]},
    # nanodet-g only pools 3x3 / 2 (max_pool_3x3_s2): the generic pooling path too.
    "custom_csp_pool5": {
        "name": "CustomCspNet",
        "net_cfg": [["Conv", 3, 16, 3, 2], ["MaxPool", 5, 1], ["CspBlock", 16, 1, 3, 2]],
        "out_stages": [1, 2],
    },
}
# Operators the written graphs may use (all in opset 11's standard domain).
OPS = {"Conv", "Relu", "Clip", "LeakyRelu", "Add", "Concat", "MaxPool", "GlobalAveragePool"}
OPS |= {"HardSigmoid", "Mul"}


def backbone_onnx(model: nnx.Module, hw: tuple[int, int]) -> onnx.ModelProto:
    """The backbone alone as an ONNX model, one graph output per output stage."""
    g = OnnxGraph()
    outs = g.emit(Value("data", (3, *hw)), model)
    inp = helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, *hw])
    outputs = [
        helper.make_tensor_value_info(v.name, TensorProto.FLOAT, [1, *v.shape]) for v in outs
    ]
    graph = helper.make_graph(g.nodes, "backbone", [inp], outputs, g.initializers)
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", onnx_export.OPSET)], producer_name="test"
    )
    proto.ir_version = 6
    onnx.checker.check_model(proto, full_check=True)
    return proto


@pytest.mark.parametrize("net", CONFIGS)
def test_backbone_onnx_matches_jax(net: str, tmp_path) -> None:
    model = BACKBONES.build(CONFIGS[net], rngs=nnx.Rngs(0))
    shapes = {
        k: to_torch_layout(np.asarray(v[...])).shape for k, v in model_variables(model).items()
    }
    load_torch_weights(model, random_state_dict(shapes, seed=7))
    model.eval()
    x = normal_input(3, (1, *HW, 3))
    ours = jax.device_get(nnx.jit(lambda m, v: m(v))(model, jnp.asarray(x)))

    proto = backbone_onnx(model, HW)
    assert {n.op_type for n in proto.graph.node} <= OPS
    path = tmp_path / f"{net}.onnx"
    onnx.save(proto, str(path))
    got = onnx_export.onnxruntime_session(str(path)).run(None, {"data": x.transpose(0, 3, 1, 2)})
    assert len(got) == len(ours)
    for i, (o, r) in enumerate(zip(got, ours)):
        ref = np.asarray(r).transpose(0, 3, 1, 2)
        assert o.shape == ref.shape, (i, o.shape, ref.shape)
        rel = float(np.abs(o - ref).max() / np.abs(ref).max())
        print(f"{net} stage {i}: rel {rel:.2e}")
        assert rel <= TOL, f"{net} output {i}: rel {rel:.2e} > {TOL}"
