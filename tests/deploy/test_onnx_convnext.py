"""ONNX (opset 11) graphs of the ConvNeXt backbone (TIMMWrapper) agree with its JAX forward."""

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
from nanodet_jax.models.backbones import BACKBONES  # noqa: E402
from nanodet_jax.testing import random_state_dict  # noqa: E402
from nanodet_jax.weights.pytorch import (  # noqa: E402
    load_torch_weights,
    model_variables,
    to_torch_layout,
)

TOL = 1e-4  # max|onnx - jax| / max|jax|
HW = (64, 64)
REDUCED = {"depths": [1, 1, 2, 1], "dims": [16, 24, 32, 40]}
CONFIGS = {
    # 1x1-conv MLPs (the small variants), every stage out.
    "conv_mlp": {"model_name": "convnext_atto", "out_indices": [0, 1, 2, 3], **REDUCED},
    # nn.Linear MLPs (convnext_tiny), per-stage kernels, NanoDet's out_indices.
    "linear_mlp": {
        "model_name": "convnext_tiny",
        "out_indices": [1, 2, 3],
        "kernel_sizes": [7, 5, 3, 7],
        **REDUCED,
    },
}
ALLOWED_OPS = {"Conv", "ReduceMean", "Sub", "Mul", "Sqrt", "Add", "Div", "Erf", "Identity"}


def backbone_graph(backbone, hw: tuple[int, int]) -> onnx.ModelProto:
    g = OnnxGraph()
    outs = g.emit(Value("data", (3, *hw)), backbone)
    for i, out in enumerate(outs):
        g.op("Identity", [out.name], out=f"out{i}")

    def tensor(name: str, shape: tuple[int, ...]) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, *shape])

    outputs = [tensor(f"out{i}", o.shape) for i, o in enumerate(outs)]
    graph = helper.make_graph(g.nodes, "backbone", [tensor("data", (3, *hw))], outputs,
                              g.initializers)  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    proto.ir_version = 6
    onnx.checker.check_model(proto, full_check=True)
    return proto


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_convnext_onnx_matches_jax(name: str, tmp_path) -> None:
    backbone = BACKBONES.build({"name": "TIMMWrapper", **CONFIGS[name]}, rngs=nnx.Rngs(0))
    shapes = {
        k: to_torch_layout(np.asarray(v[...])).shape for k, v in model_variables(backbone).items()
    }
    load_torch_weights(backbone, random_state_dict(shapes, seed=7))
    backbone.eval()
    x = np.random.default_rng(8).normal(size=(1, *HW, 3)).astype(np.float32)
    ours = jax.device_get(jax.jit(backbone)(x))

    proto = backbone_graph(backbone, HW)
    assert {n.op_type for n in proto.graph.node} <= ALLOWED_OPS
    path = str(tmp_path / "backbone.onnx")
    onnx.save(proto, path)
    theirs = onnx_export.onnxruntime_session(path).run(None, {"data": x.transpose(0, 3, 1, 2)})
    assert len(theirs) == len(ours) == len(CONFIGS[name]["out_indices"])
    for i, (t, o) in enumerate(zip(theirs, ours)):
        o = np.asarray(o).transpose(0, 3, 1, 2)
        assert t.shape == o.shape
        rel = np.abs(t - o).max() / np.abs(o).max()
        assert rel <= TOL, f"{name} output {i}: relative error {rel:.2e}"
