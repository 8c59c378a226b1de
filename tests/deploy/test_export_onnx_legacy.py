"""ONNX export of OneStageDetector (GFLHead, NanoDetHead) against our JAX model, run by
onnxruntime: NanoDet's contract (opset 11, ``[1, P, C + 4(R+1)]``, sigmoid class scores
then raw DFL logits) with GroupNorm written as InstanceNormalization."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

pytest.importorskip("onnx", reason="needs onnx (pip install 'nanodet-jax[onnx]')")
pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'nanodet-jax[onnx]')")

from nanodet_jax.deploy import onnx_export  # noqa: E402
from nanodet_jax.models import build_model  # noqa: E402
from nanodet_jax.testing import normal_input, random_state_dict  # noqa: E402
from nanodet_jax.weights.pytorch import load_torch_weights, model_variables, to_torch_layout  # noqa: E402

HEADS = {
    "gfl_gn": {"name": "GFLHead", "norm_cfg": {"type": "GN", "num_groups": 8}},
    "nanodet_dw_bn_shared": {
        "name": "NanoDetHead", "conv_type": "DWConv", "share_cls_reg": True,
        "norm_cfg": {"type": "BN"},
    },
    "nanodet_conv_gn": {
        "name": "NanoDetHead", "conv_type": "Conv", "share_cls_reg": False,
        "norm_cfg": {"type": "GN", "num_groups": 4}, "activation": "ReLU",
    },
}  # fmt: skip


def _model(head: dict):
    arch = {
        "name": "OneStageDetector",
        "backbone": {"name": "ShuffleNetV2", "model_size": "0.5x", "out_stages": [2, 3, 4]},
        "fpn": {
            "name": "GhostPAN", "in_channels": [48, 96, 192], "out_channels": 32,
            "num_extra_level": 0,
        },
        "head": {
            "num_classes": 3, "input_channel": 32, "feat_channels": 32, "stacked_convs": 2,
            "strides": [8, 16, 32], "reg_max": 7, **head,
        },
    }  # fmt: skip
    model = build_model(ml_collections.ConfigDict({"arch": arch}))
    shapes = {
        k: to_torch_layout(np.asarray(v[...])).shape for k, v in model_variables(model).items()
    }
    load_torch_weights(model, random_state_dict(shapes, seed=5))
    return model


@pytest.mark.parametrize("head", list(HEADS))
def test_onnx_matches_jax(head, tmp_path):
    model = _model(HEADS[head])
    proto = onnx_export.build_onnx_model(model, (64, 64))
    dims = [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [1, 64 + 16 + 4, 3 + 32]
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 11)]
    ops = {n.op_type for n in proto.graph.node}
    assert ("InstanceNormalization" in ops) == ("gn" in head)
    path = tmp_path / "legacy.onnx"
    path.write_bytes(proto.SerializeToString())

    x = normal_input(3, (1, 3, 64, 64))
    ours = np.array(model(jnp.asarray(x.transpose(0, 2, 3, 1))), np.float64)
    ours[..., :3] = 1.0 / (1.0 + np.exp(-ours[..., :3]))
    got = onnx_export.onnxruntime_session(str(path)).run(None, {"data": x})[0]
    rel = np.abs(got - ours).max() / np.abs(ours).max()
    assert rel <= 1e-4, (head, rel)
