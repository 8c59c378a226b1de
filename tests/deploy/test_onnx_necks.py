"""ONNX (opset 11) graphs of the legacy necks FPN, PAN and TAN agree with their JAX forward."""

from __future__ import annotations

import jax
import numpy as np
import pytest

pytest.importorskip("onnx", reason="needs onnx (pip install 'nanodet-jax[onnx]')")
pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'nanodet-jax[onnx]')")

import onnx  # noqa: E402
from flax import nnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from nanodet_jax.deploy import onnx_export  # noqa: E402  (registers every emitter)
from nanodet_jax.deploy.onnx_graph import OnnxGraph, Value  # noqa: E402
from nanodet_jax.models.necks import NECKS  # noqa: E402
from nanodet_jax.testing import random_state_dict  # noqa: E402
from nanodet_jax.weights.pytorch import (  # noqa: E402
    load_torch_weights,
    model_variables,
    to_torch_layout,
)

TOL = 1e-4  # max|onnx - jax| / max|jax|
LEVELS_HW = [(8, 12), (4, 6), (2, 3)]  # a 64x96 image at strides 8, 16, 32
IN_CHANNELS = [12, 24, 48]
CONFIGS = {
    "FPN": {"name": "FPN", "in_channels": IN_CHANNELS, "out_channels": 16, "num_outs": 3},
    "FPN_levels_bn": {
        "name": "FPN",
        "in_channels": IN_CHANNELS,
        "out_channels": 16,
        "num_outs": 2,
        "start_level": 1,
        "norm_cfg": {"type": "BN"},
        "activation": "LeakyReLU",
    },
    "PAN": {"name": "PAN", "in_channels": IN_CHANNELS, "out_channels": 16, "num_outs": 3},
    "TAN": {
        "name": "TAN",
        "in_channels": IN_CHANNELS,
        "out_channels": 32,
        "feature_hw": [4, 6],
        "num_heads": 8,
        "num_encoders": 2,
        "mlp_ratio": 4,
        "dropout_ratio": 0.1,
        "activation": "LeakyReLU",
    },
}
ALLOWED_OPS = {
    "Conv", "LeakyRelu", "Resize", "Add", "Concat", "Reshape", "Transpose", "MatMul", "Mul",
    "Sub", "Div", "Sqrt", "ReduceMean", "Softmax", "Relu",
}  # fmt: skip


def neck_graph(neck, shapes: list[tuple[int, int, int]]) -> onnx.ModelProto:
    g = OnnxGraph()
    outs = g.emit([Value(f"in{i}", s) for i, s in enumerate(shapes)], neck)
    for i, out in enumerate(outs):
        g.op("Identity", [out.name], out=f"out{i}")

    def tensor(name: str, shape: tuple[int, ...]) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, *shape])

    inputs = [tensor(f"in{i}", s) for i, s in enumerate(shapes)]
    outputs = [tensor(f"out{i}", o.shape) for i, o in enumerate(outs)]
    graph = helper.make_graph(g.nodes, "neck", inputs, outputs, g.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    proto.ir_version = 6
    onnx.checker.check_model(proto, full_check=True)
    return proto


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_neck_onnx_matches_jax(name: str, tmp_path) -> None:
    neck = NECKS.build(CONFIGS[name], rngs=nnx.Rngs(0))
    shapes = {
        k: to_torch_layout(np.asarray(v[...])).shape for k, v in model_variables(neck).items()
    }
    load_torch_weights(neck, random_state_dict(shapes, seed=3))
    neck.eval()
    rng = np.random.default_rng(4)
    xs = [
        rng.normal(size=(1, h, w, c)).astype(np.float32)
        for c, (h, w) in zip(IN_CHANNELS, LEVELS_HW)
    ]
    ours = jax.device_get(jax.jit(neck)(xs))

    proto = neck_graph(neck, [(c, h, w) for c, (h, w) in zip(IN_CHANNELS, LEVELS_HW)])
    assert {n.op_type for n in proto.graph.node} <= ALLOWED_OPS | {"Identity"}
    path = str(tmp_path / "neck.onnx")
    onnx.save(proto, path)
    feeds = {f"in{i}": x.transpose(0, 3, 1, 2) for i, x in enumerate(xs)}
    theirs = onnx_export.onnxruntime_session(path).run(None, feeds)
    assert len(theirs) == len(ours)
    for i, (t, o) in enumerate(zip(theirs, ours)):
        o = np.asarray(o).transpose(0, 3, 1, 2)
        assert t.shape == o.shape
        rel = np.abs(t - o).max() / np.abs(o).max()
        assert rel <= TOL, f"{name} output {i}: relative error {rel:.2e}"
