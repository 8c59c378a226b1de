"""ONNX export of torchvision's FCOS (``deploy/onnx_fcos.py``) against our JAX ``model(x)``,
run by onnxruntime: opset 11, the input ``data`` as for NanoDet, three raw outputs
``cls_logits``, ``bbox_regression``, ``bbox_ctrness`` in the model's point order.

Two models, every norm affine and running statistic random: the quickstart FCOS
(ResNet-18, trainable BatchNorm in eval mode, BGR input reversed by the model) and the
ResNet-50 model of ``configs/fcos_r50_fpn.py`` with a 64-channel FPN and head
(FrozenBatchNorm2d, RGB input). Two sizes: 128x128 and 96x144, where the P5 -> P4
upsampling goes from 5 to 9 columns and P6/P7 round odd sides up (3 -> 2, 5 -> 3 -> 2).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("onnx", reason="needs onnx (pip install 'nanodet-jax[onnx]')")
pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'nanodet-jax[onnx]')")

import onnx  # noqa: E402

from nanodet_jax.cli import export as export_cli  # noqa: E402
from nanodet_jax.config.loading import load_config  # noqa: E402
from nanodet_jax.deploy import onnx_export  # noqa: E402
from nanodet_jax.models import build_model  # noqa: E402
from nanodet_jax.models.detectors.fcos import level_grids  # noqa: E402
from nanodet_jax.models.heads.fcos_head import OUTPUT_KEYS  # noqa: E402
from nanodet_jax.testing import normal_input, randomise  # noqa: E402
from nanodet_jax.weights import checkpoint  # noqa: E402
from nanodet_jax.weights.pytorch import model_variables  # noqa: E402
from tests.conftest import config_path  # noqa: E402

TOL = 1e-4
SIZES = {"128x128": (128, 128), "96x144": (96, 144)}
CONFIGS = {
    "quickstart": ("fcos_quickstart.py", []),
    "r50_narrow": (
        "fcos_r50_fpn.py",
        [
            "--config.model.arch.fpn.out_channels=64",
            "--config.model.arch.head.in_channels=64",
            "--config.model.arch.input_channel_order=RGB",
        ],
    ),
}
# Standard opset-11 operators; no Gather/Slice: the BGR reversal lives in conv1's kernel.
OPS = {"Conv", "Relu", "MaxPool", "Add", "Resize", "Reshape", "InstanceNormalization", "Mul"}
OPS |= {"Concat", "Transpose"}


@functools.cache
def _model(name: str) -> nnx.Module:
    config_file, overrides = CONFIGS[name]
    return randomise(build_model(load_config(config_path(config_file), overrides)), seed=5)


def jax_outputs(model: nnx.Module, x_nchw: np.ndarray) -> dict[str, np.ndarray]:
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return jax.device_get(run(state, x_nchw.transpose(0, 2, 3, 1)))


def onnx_outputs(path: str, x_nchw: np.ndarray) -> dict[str, np.ndarray]:
    session = onnx_export.onnxruntime_session(path)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"data": x_nchw})))


def check_contract(proto: onnx.ModelProto, hw: tuple[int, int], num_classes: int) -> None:
    points = sum(h * w for h, w in level_grids(hw, 5))
    dims = lambda v: [d.dim_value for d in v.type.tensor_type.shape.dim]
    graph = proto.graph
    assert [(v.name, dims(v)) for v in graph.input] == [("data", [1, 3, *hw])]
    assert [(v.name, dims(v)) for v in graph.output] == [
        ("cls_logits", [1, points, num_classes]),
        ("bbox_regression", [1, points, 4]),
        ("bbox_ctrness", [1, points, 1]),
    ]
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 11)]
    assert {n.op_type for n in graph.node} <= OPS
    assert graph.node[0].op_type == "Conv" and graph.node[0].input[0] == "data"
    # Every BatchNorm folded: each conv has a bias and no normalisation op besides GN's.
    assert all(len(n.input) == 3 for n in graph.node if n.op_type == "Conv")


def assert_close(ours: dict, theirs: dict) -> dict[str, float]:
    errors = {}
    for key in OUTPUT_KEYS:
        assert theirs[key].shape == ours[key].shape, key
        scale = float(np.abs(ours[key]).max())
        assert scale > 0.5, key  # random weights must reach the outputs
        errors[key] = float(np.abs(theirs[key] - ours[key]).max()) / scale
    assert max(errors.values()) <= TOL, errors
    return errors


# Each model at one size (each run compiles the model, ~10 s): the BGR quickstart at the
# size whose P6/P7 grids round up (and whose P5 -> P4 upsampling goes 5 -> 9 columns), the
# FrozenBN R50 with RGB input at a multiple of 128.
CASES = [("quickstart", "96x144"), ("r50_narrow", "128x128")]


@pytest.mark.parametrize("name,size", CASES)
def test_onnx_matches_jax(name, size, tmp_path):
    model, hw = _model(name), SIZES[size]
    proto = onnx_export.build_onnx_model(model, hw)
    check_contract(proto, hw, model.num_classes)
    # The head is shared over the levels and stored once: no more numbers than the model
    # holds (per level it would be five times the head).
    stored = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    assert stored <= sum(np.asarray(v[...]).size for v in model_variables(model).values())
    path = str(tmp_path / "fcos.onnx")
    onnx.save(proto, path)
    x = normal_input(11, (1, 3, *hw))
    errors = assert_close(jax_outputs(model, x), onnx_outputs(path, x))
    print(name, size, errors)


def test_export_cli_writes_fcos(tmp_path, capsys):
    """``nanodet-export`` on an FCOS config and an orbax checkpoint: the config's canvas
    (128x128), the three outputs, onnxruntime agreeing with the restored model."""
    cfg = config_path("fcos_quickstart.py")
    config = load_config(cfg)
    saved = randomise(build_model(config), seed=7)
    checkpoint.save_weights(tmp_path / "ckpt", saved, config)
    path = str(tmp_path / "cli.onnx")
    export_cli.main(["--config", cfg, "--checkpoint", str(tmp_path / "ckpt"), "--out", path])
    printed = capsys.readouterr().out
    assert "opset 11" in printed
    assert (
        "data [1, 3, 128, 128] -> cls_logits [1, 341, 3], bbox_regression [1, 341, 4], "
        "bbox_ctrness [1, 341, 1]"
    ) in printed
    check_contract(onnx.load(path), (128, 128), 3)
    x = normal_input(12, (1, 3, 128, 128))
    assert_close(jax_outputs(saved, x), onnx_outputs(path, x))
