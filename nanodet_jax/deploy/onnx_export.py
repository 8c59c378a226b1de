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
* ``dynamic_batch=True`` (``nanodet-export --dynamic-batch``): the batch axis of the input
  and outputs is the symbolic ``batch`` instead of 1, so one file runs any batch size
  (TensorRT optimisation profiles, batched onnxruntime); the graph's Reshapes copy the
  batch from their input (0) rather than naming it.

A NanoDet-Plus or legacy NanoDet (OneStageDetector) export also writes ``<name>.json``
beside the ``.onnx`` (:func:`deploy_metadata`): what a host needs to go from an image to
detections without this package (input size, keep_ratio, mean/std, strides, reg_max,
prior offset, class names, score threshold, NMS IoU, top-k); ``tools/onnx_predict.py``
reads it.

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

import json
import os
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
from nanodet_jax.evaluation.predictor import config_label_names
from nanodet_jax.models.detectors.base import Detector

OPSET = 11
INPUT_NAME = "data"
OUTPUT_NAME = "output"
BATCH_DIM = "batch"  # the symbolic batch axis of a dynamic-batch export


def build_onnx_model(
    model: Detector, input_hw: tuple[int, int], dynamic_batch: bool = False
) -> onnx.ModelProto:
    """The inference graph of ``model`` (its current weights) for a ``[1, 3, *input_hw]`` input
    (``[batch, 3, *input_hw]`` with ``dynamic_batch``): ``model.onnx_graph`` returns one
    value (``output``) or a dict of them (named by key)."""
    from onnx import TensorProto, helper

    h, w = input_hw
    batch = BATCH_DIM if dynamic_batch else 1
    g = OnnxGraph(dynamic_batch)
    result = model.onnx_graph(g, Value(INPUT_NAME, (3, h, w)))
    # One value is the contract's ``output``; a dict (FCOS) names its outputs by its keys.
    results = result if isinstance(result, dict) else {OUTPUT_NAME: result}
    outs = []
    for name, value in results.items():
        # The graph's output carries the contract's name: rename the value that produced it.
        producer = next(node for node in reversed(g.nodes) if value.name in node.output)
        producer.output[list(producer.output).index(value.name)] = name
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, *value.shape]))
    inp = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [batch, 3, h, w])
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


def sidecar_path(onnx_path: str) -> str:
    """``nanodet.onnx`` -> ``nanodet.json``: where :func:`export_onnx` writes the metadata."""
    return os.path.splitext(onnx_path)[0] + ".json"


def deploy_metadata(model: Detector, config: Any, dynamic_batch: bool = False) -> dict | None:
    """What a host-side decoder of the file needs, from the model and the config Predictor
    reads; None where the host would need more than this (a detector without
    ``onnx_decode``, FCOS, or a torchvision-style ``data.val.resize`` rule)."""
    val = config.data.val
    decode = model.onnx_decode()
    if decode is None or val.get("resize") is not None:
        return None
    mean, std = (list(map(float, v)) for v in val.pipeline.normalize)
    names = config_label_names(config) or [str(i) for i in range(model.num_classes)]
    return {
        "format": "nanodet_jax onnx sidecar 1",
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "dynamic_batch": dynamic_batch,
        "input_wh": [int(v) for v in val.input_size],  # the warp target
        "canvas_hw": list(onnx_input_hw(config)),  # the network input: input_wh padded to 32
        "keep_ratio": bool(val.keep_ratio),
        "mean": mean,  # BGR, 0-255 pixels
        "std": std,
        "strides": [int(s) for s in decode["strides"]],
        "reg_max": int(decode["reg_max"]),
        "prior_offset": float(decode["prior_offset"]),
        "num_classes": int(model.num_classes),
        "class_names": names,
        "score_thr": float(config.test.score_thr),
        "nms_iou": float(config.test.nms_iou),
        "max_per_img": int(config.test.max_per_img),
        "nms_pre": int(config.test.nms_pre),
    }


def export_onnx(
    model: Detector, config: Any, path: str, dynamic_batch: bool = False
) -> onnx.ModelProto:
    """Build the graph for ``config``'s input size, check it and save it to ``path``; where
    the detector describes its decoding also write :func:`deploy_metadata` to
    :func:`sidecar_path`."""
    onnx_model = build_onnx_model(model, onnx_input_hw(config), dynamic_batch)
    onnx.save(onnx_model, path)
    meta = deploy_metadata(model, config, dynamic_batch)
    if meta is not None:
        with open(sidecar_path(path), "w") as f:
            json.dump(meta, f, indent=1)
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
    onnx_path: str,
    repeats: int = 20,
    warmup: int = 2,
    threads: int | None = None,
    batch: int = 1,
) -> float:
    """Median seconds of one onnxruntime run on a random normalised input (``batch``
    images where the export has a dynamic batch axis, else its static batch)."""
    sess = onnxruntime_session(onnx_path, threads)
    # A dynamic batch axis reads as its name ("batch").
    shape = [d if isinstance(d, int) else batch for d in sess.get_inputs()[0].shape]
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)

    def once() -> float:
        start = time.perf_counter()
        sess.run(None, {INPUT_NAME: x})
        return time.perf_counter() - start

    for _ in range(warmup):
        once()
    return float(np.median([once() for _ in range(repeats)]))
