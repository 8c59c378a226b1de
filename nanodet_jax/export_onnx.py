"""Export NanoDet-Plus to ONNX with the contract of NanoDet's ``tools/export_onnx.py``.

    python -m nanodet_jax.export_onnx --config configs/nanodet_plus_m_416.py \
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

The graph is written directly from the model's parameters (no tracing): every module
type below emits the ONNX nodes of its ``__call__`` (checked against it by
``tests/test_export_onnx.py``). BatchNorm is folded into the preceding convolution,
as deploy runtimes (and onnx-simplifier) would do.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError as err:  # an optional extra: say which
    raise ImportError("ONNX export needs onnx: pip install 'nanodet-jax[onnx]'") from err

from nanodet_jax import cli, transforms
from nanodet_jax.backbone import ShuffleNetV2, ShuffleV2Block
from nanodet_jax.fpn import GhostBlocks, GhostBottleneck, GhostModule, GhostPAN
from nanodet_jax.head import NanoDetPlusHead
from nanodet_jax.layers import (
    Activation,
    Conv2d,
    ConvModule,
    DepthwiseConvModule,
    Sequential,
)
from nanodet_jax.model import NanoDetPlus
from nanodet_jax.norm import BatchNorm2d

OPSET = 11
INPUT_NAME = "data"
OUTPUT_NAME = "output"


@dataclasses.dataclass(frozen=True)
class _T:  # a graph value and its static (C, H, W) shape; batch is always 1
    name: str
    shape: tuple[int, int, int]


class _Graph:
    """Collects nodes and initializers; hands out unique value names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value: np.ndarray, hint: str = "const") -> str:
        name = self._name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str = "", **attrs: Any) -> str:
        out = out or self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def split(self, x: str, sizes: list[int]) -> list[str]:
        """Channel split (opset 11 takes the sizes as an attribute, 13+ as an input)."""
        outs = [self._name("split") for _ in sizes]
        self.nodes.append(helper.make_node("Split", [x], outs, name=outs[0], axis=1, split=sizes))
        return outs


def _f64(v: Any) -> np.ndarray:
    return np.asarray(v[...], np.float64)


def _fold_bn(conv: Conv2d, bn: BatchNorm2d | None) -> tuple[np.ndarray, np.ndarray | None]:
    """OIHW kernel and bias of ``bn(conv(x))`` as one conv (float64 maths, float32 result)."""
    kernel = _f64(conv.weight).transpose(3, 2, 0, 1)  # HWIO -> OIHW
    bias = None if conv.bias is None else _f64(conv.bias)
    if bn is not None:
        scale = _f64(bn.weight) / np.sqrt(_f64(bn.running_var) + bn.eps)
        kernel = kernel * scale[:, None, None, None]
        shift = _f64(bn.bias) - _f64(bn.running_mean) * scale
        bias = shift if bias is None else bias * scale + shift
    return kernel.astype(np.float32), None if bias is None else bias.astype(np.float32)


def _conv(g: _Graph, x: _T, conv: Conv2d, bn: BatchNorm2d | None = None) -> _T:
    kernel, bias = _fold_bn(conv, bn)
    cout, _, k, _ = kernel.shape
    inputs = [x.name, g.const(kernel, "weight")]
    if bias is not None:
        inputs.append(g.const(bias, "bias"))
    p, s = conv.padding, conv.stride
    attrs = dict(kernel_shape=[k, k], strides=[s, s], pads=[p] * 4, group=conv.groups)
    _, h, w = x.shape
    return _T(
        g.op("Conv", inputs, **attrs), (cout, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)
    )


# ONNX's Selu defaults are SELU's constants; LeakyRelu needs NanoDet's slope (ONNX's is 0.01).
_SIMPLE_ACTIVATIONS: dict[str, tuple[str, dict[str, float]]] = {
    "ReLU": ("Relu", {}),
    "LeakyReLU": ("LeakyRelu", {"alpha": 0.1}),
    "SELU": ("Selu", {}),
    "ELU": ("Elu", {"alpha": 1.0}),
}


def _activation(g: _Graph, x: _T, act: Activation) -> _T:
    """Opset-11 forms of the activations in ``layers.ACTIVATIONS``."""
    kind, v = act.name, x.name
    if kind is None:
        return x
    if kind in _SIMPLE_ACTIVATIONS:
        op_type, attrs = _SIMPLE_ACTIVATIONS[kind]
        out = g.op(op_type, [v], **attrs)
    elif kind == "ReLU6":
        out = g.op("Clip", [v, g.const(np.float32(0)), g.const(np.float32(6))])
    elif kind == "GELU":  # exact GELU (Gelu itself needs opset 20)
        scaled = g.op("Div", [v, g.const(np.float32(np.sqrt(2.0)))])
        one_plus = g.op("Add", [g.op("Erf", [scaled]), g.const(np.float32(1))])
        out = g.op("Mul", [g.op("Mul", [v, one_plus]), g.const(np.float32(0.5))])
    elif kind == "SiLU":
        out = g.op("Mul", [v, g.op("Sigmoid", [v])])
    elif kind in ("HardSwish", "Hardswish"):  # HardSwish itself needs opset 14
        out = g.op("Mul", [v, g.op("HardSigmoid", [v], alpha=1.0 / 6, beta=0.5)])
    else:
        raise NotImplementedError(f"no ONNX export for activation {kind!r}")
    return _T(out, x.shape)


def _sequential(g: _Graph, x: _T, seq: Sequential) -> _T:
    layers = list(seq)
    i = 0
    while i < len(layers):
        layer = layers[i]
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(layer, Conv2d) and isinstance(nxt, BatchNorm2d):
            x, i = _conv(g, x, layer, nxt), i + 2
        else:
            x, i = _emit(g, x, layer), i + 1  # a BatchNorm not after a conv is rejected here
    return x


def _conv_module(g: _Graph, x: _T, m: ConvModule) -> _T:
    norm = getattr(m, m.norm_name) if m.norm_name else None
    if norm is not None and not isinstance(norm, BatchNorm2d):
        raise NotImplementedError("ONNX export supports BatchNorm ConvModules only (not GN)")
    return _activation(g, _conv(g, x, m.conv, norm), m.act)


def _dw_conv_module(g: _Graph, x: _T, m: DepthwiseConvModule) -> _T:
    x = _activation(g, _conv(g, x, m.depthwise, m.dwnorm), m.act)
    return _activation(g, _conv(g, x, m.pointwise, m.pwnorm), m.act)


def _concat(g: _Graph, xs: list[_T]) -> _T:
    c = sum(x.shape[0] for x in xs)
    return _T(g.op("Concat", [x.name for x in xs], axis=1), (c, *xs[0].shape[1:]))


def _add(g: _Graph, a: _T, b: _T) -> _T:
    return _T(g.op("Add", [a.name, b.name]), a.shape)


def _shuffle_block(g: _Graph, x: _T, m: ShuffleV2Block) -> _T:
    c, h, w = x.shape
    if m.stride == 1:
        half = c // 2
        left, right = g.split(x.name, [half, half])
        right_out = _sequential(g, _T(right, (half, h, w)), m.branch2)
        out = _concat(g, [_T(left, (half, h, w)), right_out])
    else:
        out = _concat(g, [_sequential(g, x, m.branch1), _sequential(g, x, m.branch2)])
    # Channel shuffle as Reshape-Transpose-Reshape: the pattern ncnn/MNN map to ShuffleChannel.
    c, h, w = out.shape
    grouped = g.op("Reshape", [out.name, g.const(np.array([1, 2, c // 2, h, w], np.int64))])
    swapped = g.op("Transpose", [grouped], perm=[0, 2, 1, 3, 4])
    flat = g.op("Reshape", [swapped, g.const(np.array([1, c, h, w], np.int64))])
    return _T(flat, out.shape)


def _backbone(g: _Graph, x: _T, m: ShuffleNetV2) -> tuple[_T, ...]:
    x = _sequential(g, x, m.conv1)
    c, h, w = x.shape
    pooled = g.op("MaxPool", [x.name], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    x = _T(pooled, (c, (h - 1) // 2 + 1, (w - 1) // 2 + 1))
    outs = []
    for i, stage in ((2, m.stage2), (3, m.stage3), (4, m.stage4)):
        x = _sequential(g, x, stage)
        if i in m.out_stages:
            outs.append(x)
    return tuple(outs)


def _ghost_module(g: _Graph, x: _T, m: GhostModule) -> _T:
    x1 = _sequential(g, x, m.primary_conv)
    return _concat(g, [x1, _sequential(g, x1, m.cheap_operation)])


def _ghost_bottleneck(g: _Graph, x: _T, m: GhostBottleneck) -> _T:
    y = _ghost_module(g, x, m.ghost1)
    if m.stride > 1:
        y = _conv(g, y, m.conv_dw, m.bn_dw)
    return _add(g, _ghost_module(g, y, m.ghost2), _sequential(g, x, m.shortcut))


def _ghost_blocks(g: _Graph, x: _T, m: GhostBlocks) -> _T:
    out = _sequential(g, x, m.blocks)
    return _add(g, out, _conv_module(g, x, m.reduce_conv)) if m.use_res else out


def _upsample(g: _Graph, x: _T, mode: str) -> _T:
    # Half-pixel bilinear clamps source coordinates at the border, as PyTorch and
    # layers.upsample_bilinear_2x do; nearest x2 is torch's floor(asymmetric) rule.
    if mode == "bilinear":
        attrs = {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}
    else:
        attrs = {
            "mode": "nearest",
            "coordinate_transformation_mode": "asymmetric",
            "nearest_mode": "floor",
        }
    roi = g.const(np.zeros(0, np.float32), "roi")
    scales = g.const(np.array([1, 1, 2, 2], np.float32), "scales")
    c, h, w = x.shape
    return _T(g.op("Resize", [x.name, roi, scales], **attrs), (c, 2 * h, 2 * w))


def _pan(g: _Graph, inputs: tuple[_T, ...], m: GhostPAN) -> list[_T]:
    feats = [_conv_module(g, x, r) for x, r in zip(inputs, m.reduce_layers)]
    n = len(feats)
    inner = [feats[-1]]
    for idx in range(n - 1, 0, -1):
        merged = _concat(g, [_upsample(g, inner[0], m.upsample_mode), feats[idx - 1]])
        inner.insert(0, _ghost_blocks(g, merged, m.top_down_blocks[n - 1 - idx]))
    outs = [inner[0]]
    for idx in range(n - 1):
        down = _emit(g, outs[-1], m.downsamples[idx])
        outs.append(_ghost_blocks(g, _concat(g, [down, inner[idx + 1]]), m.bottom_up_blocks[idx]))
    for extra_in, extra_out in zip(m.extra_lvl_in_conv, m.extra_lvl_out_conv):
        outs.append(_add(g, _emit(g, feats[-1], extra_in), _emit(g, outs[-1], extra_out)))
    return outs


def _head(g: _Graph, feats: list[_T], m: NanoDetPlusHead) -> int:
    """Levels as [1, C+4(R+1), h*w], joined, class rows sigmoided, -> [1, P, ...]; returns P."""
    flat, num_priors = [], 0
    for feat, convs, gfl in zip(feats, m.cls_convs, m.gfl_cls):
        for conv in convs:
            feat = _emit(g, feat, conv)
        out = _conv(g, feat, gfl)
        c, h, w = out.shape
        num_priors += h * w
        flat.append(g.op("Reshape", [out.name, g.const(np.array([1, c, h * w], np.int64))]))
    joined = g.op("Concat", flat, axis=2)
    cls_part, reg_part = g.split(joined, [m.num_classes, 4 * (m.reg_max + 1)])
    scored = g.op("Concat", [g.op("Sigmoid", [cls_part]), reg_part], axis=1)
    g.op("Transpose", [scored], out=OUTPUT_NAME, perm=[0, 2, 1])
    return num_priors


_EMITTERS: dict[type, Callable[[_Graph, _T, Any], _T]] = {
    Sequential: _sequential,
    Conv2d: _conv,
    Activation: _activation,
    ConvModule: _conv_module,
    DepthwiseConvModule: _dw_conv_module,
    ShuffleV2Block: _shuffle_block,
    GhostModule: _ghost_module,
    GhostBottleneck: _ghost_bottleneck,
    GhostBlocks: _ghost_blocks,
}


def _emit(g: _Graph, x: _T, module: Any) -> _T:
    emitter = _EMITTERS.get(type(module))
    if emitter is None:
        raise NotImplementedError(f"no ONNX export for {type(module).__name__}")
    return emitter(g, x, module)


def build_onnx_model(model: NanoDetPlus, input_hw: tuple[int, int]) -> onnx.ModelProto:
    """The inference graph of ``model`` (its current weights) for a ``[1, 3, *input_hw]`` input."""
    if not isinstance(model.backbone, ShuffleNetV2) or not isinstance(model.fpn, GhostPAN):
        raise NotImplementedError("ONNX export supports ShuffleNetV2 + GhostPAN models")
    if not isinstance(model.head, NanoDetPlusHead):
        raise NotImplementedError("ONNX export supports NanoDetPlusHead only")
    h, w = input_hw
    g = _Graph()
    feats = _pan(g, _backbone(g, _T(INPUT_NAME, (3, h, w)), model.backbone), model.fpn)
    num_priors = _head(g, feats, model.head)
    channels = model.num_classes + 4 * (model.reg_max + 1)
    inp = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [1, 3, h, w])
    out = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [1, num_priors, channels])
    graph = helper.make_graph(g.nodes, "nanodet_plus", [inp], [out], g.initializers)
    onnx_model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="nanodet_jax"
    )
    onnx_model.ir_version = 6  # opset 11's own IR version: older runtimes reject newer ones
    onnx.checker.check_model(onnx_model, full_check=True)  # also runs shape inference
    return onnx_model


def onnx_input_hw(config: Any) -> tuple[int, int]:
    """The exported input (H, W): val input_size (w, h) rounded up to 32, as Predictor's canvas."""
    return transforms.canvas_hw(config.data.val.input_size)


def export_onnx(model: NanoDetPlus, config: Any, path: str) -> onnx.ModelProto:
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


def main(argv: list[str] | None = None) -> None:
    from nanodet_jax.config_utils import load_config
    from nanodet_jax.model import build_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True)
    cli.add_weight_args(p)
    p.add_argument("--out", default="nanodet.onnx", help="output .onnx path")
    p.add_argument("--benchmark", type=int, default=0, help="also time N onnxruntime runs")
    args, overrides = p.parse_known_args(argv)
    cli.setup_logging()
    config = load_config(args.config, overrides)
    model = build_model(config, with_aux=False)
    cli.load_weights(model, args)
    start = time.perf_counter()
    onnx_model = export_onnx(model, config, args.out)
    graph = onnx_model.graph
    inp, out = (
        [d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*graph.input, *graph.output)
    )
    print(
        f"wrote {args.out} (opset {OPSET}, {len(graph.node)} nodes, "
        f"{time.perf_counter() - start:.1f} s): {INPUT_NAME} {inp} -> {OUTPUT_NAME} {out}"
    )
    if args.benchmark:
        ms = onnxruntime_latency(args.out, args.benchmark) * 1e3
        print(f"onnxruntime CPU latency (batch 1, median of {args.benchmark}): {ms:.1f} ms")


if __name__ == "__main__":
    main()
