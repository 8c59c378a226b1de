"""Export a detector to ONNX with the contract of NanoDet's ``tools/export_onnx.py``.

    nanodet-export --config configs/nanodet_plus_m_416.py \
        --torch-weights nanodet-plus-m_416.pth --out nanodet-plus-m_416.onnx

The file is what NanoDet's deploy demos (ncnn, MNN, OpenVINO) load:

* input ``data``: float32 ``[1, 3, H, W]``, NCHW, **already normalised** (BGR,
  ``(pixel - mean) / std`` with the config's val mean/std); the graph does not
  normalise, as NanoDet's export does not (its demos normalise on the host).
  ``H, W`` are the config's val input size rounded up to 32 (``Predictor``'s canvas).
* output ``output``: float32 ``[1, num_priors, num_classes + 4 * (reg_max + 1)]``,
  priors in NanoDet's order; class scores are **sigmoid probabilities**, the
  rest raw distribution (DFL) logits (NanoDet's ``_forward_onnx``).
* opset 11 (NanoDet's), standard domain only; weights are initializers, not inputs.

FCOS (``onnx_fcos.py``) takes the same input and returns ``model(images)``'s dict as
three outputs, ``cls_logits [1, N, C]``, ``bbox_regression [1, N, 4]`` and
``bbox_ctrness [1, N, 1]``, raw (no sigmoid), in torchvision's point order.

The graph is written directly from the model's parameters (no tracing): the detector's
``onnx_graph`` calls the emitters of ``onnx_graph.py`` (shared layers) and of its family
(``onnx_nanodet.py``; ``onnx_backbones_2.py`` for EfficientNet-Lite, GhostNet and
CustomCspNet; ``onnx_fcos.py`` for FCOS), each writing the ONNX nodes of one module's
``__call__`` (checked against it by ``tests/deploy/test_export_onnx.py``,
``tests/deploy/test_onnx_backbones_2.py`` and ``tests/deploy/test_export_onnx_fcos.py``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from nanodet_jax.data import transforms
from nanodet_jax.deploy import (
    onnx_backbones_1,  # noqa: F401  (ResNet, MobileNetV2, RepVGG)
    onnx_backbones_2,  # noqa: F401  (EfficientNet-Lite, GhostNet, CustomCspNet)
    onnx_convnext,  # noqa: F401  (TIMMWrapper's ConvNeXt)
    onnx_fcos,  # noqa: F401  (torchvision's FCOS: FPN with P6/P7, FCOS head)
    onnx_legacy,  # noqa: F401  (the legacy GFL heads' emitters)
    onnx_nanodet,  # noqa: F401  (registers NanoDet-Plus's emitters)
    onnx_necks,  # noqa: F401  (FPN, PAN, TAN)
)
from nanodet_jax.deploy.onnx_graph import OnnxGraph, Value, onnx
from nanodet_jax.models.detectors.base import Detector

OPSET = 11
INPUT_NAME = "data"
OUTPUT_NAME = "output"


def build_onnx_model(model: Detector, input_hw: tuple[int, int]) -> onnx.ModelProto:
    """The inference graph of ``model`` (its current weights) for a ``[1, 3, *input_hw]`` input:
    ``model.onnx_graph`` returns one value (``output``) or a dict of them (named by key)."""
    from onnx import TensorProto, helper

    h, w = input_hw
    g = OnnxGraph()
    result = model.onnx_graph(g, Value(INPUT_NAME, (3, h, w)))
    # One value is the contract's ``output``; a dict (FCOS) names its outputs by its keys.
    results = result if isinstance(result, dict) else {OUTPUT_NAME: result}
    outs = []
    for name, value in results.items():
        # The graph's output carries the contract's name: rename the value that produced it.
        producer = next(node for node in reversed(g.nodes) if value.name in node.output)
        producer.output[list(producer.output).index(value.name)] = name
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, *value.shape]))
    inp = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [1, 3, h, w])
    graph = helper.make_graph(g.nodes, type(model).__name__.lower(), [inp], outs, g.initializers)
    onnx_model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="nanodet_jax"
    )
    onnx_model.ir_version = 6  # opset 11's own IR version: older runtimes reject newer ones
    onnx.checker.check_model(onnx_model, full_check=True)  # also runs shape inference
    return onnx_model


def onnx_input_hw(config: Any) -> tuple[int, int]:
    """The exported input (H, W): val input_size (w, h) rounded up to 32, as Predictor's canvas."""
    return transforms.canvas_hw(config.data.val.input_size)


def export_onnx(model: Detector, config: Any, path: str) -> onnx.ModelProto:
    """Build the graph for ``config``'s input size, check it and save it to ``path``."""
    onnx_model = build_onnx_model(model, onnx_input_hw(config))
    onnx.save(onnx_model, path)
    return onnx_model


def onnxruntime_session(onnx_path: str, threads: int | None = None) -> Any:
    """A CPU onnxruntime session (all graph optimisations; ``threads`` intra-op threads)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])


def onnxruntime_latency(
    onnx_path: str, repeats: int = 20, warmup: int = 2, threads: int | None = None
) -> float:
    """Median seconds of one onnxruntime run on a random normalised input (batch 1)."""
    sess = onnxruntime_session(onnx_path, threads)
    shape = [int(d) for d in sess.get_inputs()[0].shape]
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)

    def once() -> float:
        start = time.perf_counter()
        sess.run(None, {INPUT_NAME: x})
        return time.perf_counter() - start

    for _ in range(warmup):
        once()
    return float(np.median([once() for _ in range(repeats)]))
