"""ONNX export: NanoDet's deploy contract, and onnxruntime agreeing with our JAX forward."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

pytest.importorskip("onnx", reason="needs onnx (pip install 'nanodet-jax[onnx]')")
pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'nanodet-jax[onnx]')")

import jax.numpy as jnp  # noqa: E402
import onnx  # noqa: E402
from flax import nnx  # noqa: E402

from nanodet_jax.cli import export as export_cli
from nanodet_jax.data import transforms  # noqa: E402
from nanodet_jax.deploy import onnx_export as export_onnx
from nanodet_jax.deploy import onnx_graph
from nanodet_jax.evaluation import postprocess
from nanodet_jax.models import build_model, layers
from nanodet_jax.testing import random_state_dict  # noqa: E402
from nanodet_jax.weights import pytorch as convert
from tests.conftest import config_path  # noqa: E402

TOL = 1e-4


def sigmoid_classes(raw: np.ndarray, num_classes: int) -> np.ndarray:
    """Our raw output in the ONNX contract: sigmoid on the class logits, DFL logits as they are."""
    out = np.array(raw, np.float32)
    out[..., :num_classes] = 1.0 / (1.0 + np.exp(-out[..., :num_classes].astype(np.float64)))
    return out


def run_onnx(path: str, x_nchw: np.ndarray) -> np.ndarray:
    return export_onnx.onnxruntime_session(str(path)).run(None, {"data": x_nchw})[0]


def check_contract(model_proto: onnx.ModelProto, hw: tuple[int, int], priors: int, channels: int):
    """What NanoDet's tools/export_onnx.py produces and its ncnn/MNN/OpenVINO demos expect."""
    graph = model_proto.graph
    dims = lambda v: [d.dim_value for d in v.type.tensor_type.shape.dim]
    assert [(v.name, dims(v)) for v in graph.input] == [("data", [1, 3, *hw])]
    assert [(v.name, dims(v)) for v in graph.output] == [("output", [1, priors, channels])]
    assert [(o.domain, o.version) for o in model_proto.opset_import] == [("", 11)]
    assert {n.domain for n in graph.node} == {""}  # standard operators only
    assert {n.op_type for n in graph.node} <= {
        "Conv", "LeakyRelu", "MaxPool", "Split", "Concat", "Reshape", "Transpose",
        "Resize", "Add", "Sigmoid",
    }  # fmt: skip
    onnx.checker.check_model(model_proto, full_check=True)


def small_random_model(config):
    """The small NanoDet-Plus with random weights whose logits are in a real model's range."""
    model = build_model(config, with_aux=False, seed=0)
    shapes = {
        k: convert.to_torch_layout(np.asarray(v[...])).shape
        for k, v in convert.model_variables(model).items()
    }
    convert.load_torch_weights(model, random_state_dict(shapes, seed=5))
    # Random weights blow the head output up to ~600, where float32 rounding alone exceeds
    # 1e-4 (our own FFI and lax depthwise backends differ by 8e-4 there). Scaling the last
    # conv brings the logits to the real model's range without changing any other layer.
    for gfl in model.head.gfl_cls:
        gfl.weight[...] = gfl.weight[...] * 0.02
        gfl.bias[...] = gfl.bias[...] * 0.02
    return model


def test_small_model_matches_jax(small_config, tmp_path):
    model = small_random_model(small_config)
    path = tmp_path / "small.onnx"
    proto = export_onnx.export_onnx(model, small_config, str(path))
    hw = export_onnx.onnx_input_hw(small_config)
    assert hw == (320, 320)
    # 40^2 + 20^2 + 10^2 + 5^2 priors; 5 classes + 4 * 8 distribution bins.
    check_contract(onnx.load(str(path)), hw, 2125, 37)
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == 110 and all(len(n.input) == 3 for n in convs)  # BatchNorm folded in

    x = np.random.default_rng(0).normal(size=(1, *hw, 3)).astype(np.float32)
    ours = sigmoid_classes(jax.jit(model)(x), model.num_classes)
    theirs = run_onnx(path, x.transpose(0, 3, 1, 2))
    assert theirs.shape == ours.shape
    assert 5 < np.abs(ours).max() < 50
    assert np.abs(theirs - ours).max() <= TOL


def test_dynamic_batch_runs_batch_1_and_3(small_config, tmp_path):
    model = small_random_model(small_config)
    path = tmp_path / "dyn.onnx"
    export_onnx.export_onnx(model, small_config, str(path), dynamic_batch=True)
    proto = onnx.load(str(path))
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    assert dims(proto.graph.input[0]) == ["batch", 3, 320, 320]
    assert dims(proto.graph.output[0]) == ["batch", 2125, 37]
    # No Reshape may name batch 1: each target's first entry is 0 (the input's batch).
    targets = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    reshapes = [n for n in proto.graph.node if n.op_type == "Reshape"]
    assert reshapes and all(targets[n.input[1]][0] == 0 for n in reshapes)

    hw = export_onnx.onnx_input_hw(small_config)
    x = np.random.default_rng(3).normal(size=(3, *hw, 3)).astype(np.float32)
    ours = sigmoid_classes(jax.jit(model)(x), model.num_classes)
    sess = export_onnx.onnxruntime_session(str(path))
    for batch in (x[:1], x):  # one file, two batch sizes
        theirs = sess.run(None, {"data": batch.transpose(0, 3, 1, 2)})[0]
        assert theirs.shape == (len(batch), 2125, 37)
        assert np.abs(theirs - ours[: len(batch)]).max() <= TOL


def test_dynamic_batch_group_norm_and_sized_resize(tmp_path):
    """The two other batch-carrying ops (FCOS's GroupNorm view, Resize to a size): batch 2
    in one run equals each image alone."""
    from onnx import TensorProto, helper

    from nanodet_jax.models.norm import GroupNorm

    g = onnx_graph.OnnxGraph(dynamic_batch=True)
    normed = onnx_graph.group_norm(g, onnx_graph.Value("data", (4, 5, 7)), GroupNorm(2, 4))
    up = onnx_graph.upsample(g, normed, "nearest", (9, 11))
    g.op("Identity", [up.name], out="y")
    graph = helper.make_graph(
        g.nodes,
        "dyn",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["batch", 4, 5, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 9, 11])],
        g.initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    proto.ir_version = 6
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(tmp_path / "dyn.onnx"))
    x = np.random.default_rng(2).normal(size=(2, 4, 5, 7)).astype(np.float32)
    both = run_onnx(tmp_path / "dyn.onnx", x)
    assert both.shape == (2, 4, 9, 11)
    alone = [run_onnx(tmp_path / "dyn.onnx", x[i : i + 1])[0] for i in range(2)]
    np.testing.assert_array_equal(both, np.stack(alone))


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_resize_matches_our_upsampling_at_the_borders(mode, tmp_path):
    from onnx import TensorProto, helper

    g = onnx_graph.OnnxGraph()
    up = onnx_graph.upsample(g, onnx_graph.Value("data", (3, 5, 7)), mode)
    g.op("Identity", [up.name], out="y")
    graph = helper.make_graph(
        g.nodes,
        "up",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 5, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 10, 14])],
        g.initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    proto.ir_version = 6
    onnx.save(proto, str(tmp_path / "up.onnx"))
    x = np.random.default_rng(1).normal(size=(1, 3, 5, 7)).astype(np.float32)
    fn = layers.upsample_bilinear_2x if mode == "bilinear" else layers.upsample_nearest_2x
    ours = np.asarray(fn(x.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(run_onnx(tmp_path / "up.onnx", x), ours, rtol=0, atol=1e-6)


def detections(raw_dfl: np.ndarray, scores: np.ndarray, predictor) -> tuple[np.ndarray, ...]:
    """NanoDet's decode + NMS with the class scores given as probabilities."""
    model = nnx.merge(predictor.graphdef, predictor.state)
    boxes, _ = model.decode(jnp.asarray(raw_dfl), predictor.canvas_hw)
    det = postprocess.batched_multiclass_nms(boxes, scores, **predictor.nms_kwargs)
    [(b, s, lbl)] = postprocess.to_numpy_detections(det.boxes, det.scores, det.labels, det.num_dets)
    return b, s, lbl


def test_real_weights_on_bus_match_jax(shared_data, tmp_path, capsys):
    from nanodet_jax.cli.predict import load_predictor

    cfg = config_path("nanodet_plus_m_416.py")
    weights = os.path.join(shared_data, "weights", "nanodet-plus-m_416.pth")
    path = tmp_path / "m416.onnx"
    export_cli.main(["--config", cfg, "--torch-weights", weights, "--out", str(path)])
    assert "opset 11" in capsys.readouterr().out
    check_contract(onnx.load(str(path)), (416, 416), 3598, 112)

    import cv2

    predictor = load_predictor(cfg, torch_weights=weights)
    prepared = predictor.prepare(cv2.imread(os.path.join(shared_data, "images", "bus.jpg")))
    x = transforms.normalize(
        prepared.canvas[None], predictor.mean, predictor.std, np.array([prepared.valid_hw])
    )
    raw = np.asarray(predictor.raw_outputs(x))
    theirs = run_onnx(path, np.asarray(x).transpose(0, 3, 1, 2))
    c = predictor.num_classes
    assert np.abs(theirs - sigmoid_classes(raw, c)).max() <= TOL

    ours_det = detections(raw, np.asarray(jax.nn.sigmoid(raw[..., :c])), predictor)
    onnx_det = detections(theirs, theirs[..., :c], predictor)
    assert len(ours_det[2]) >= 5  # a bus and people
    np.testing.assert_array_equal(onnx_det[2], ours_det[2])
    np.testing.assert_allclose(onnx_det[0], ours_det[0], rtol=0, atol=2e-3)  # pixels
    np.testing.assert_allclose(onnx_det[1], ours_det[1], rtol=0, atol=1e-5)
