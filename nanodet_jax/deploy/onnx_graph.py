"""Writing ONNX graphs from our modules' parameters, one emitter per module type.

An emitter ``(graph, x, module) -> value`` writes the ONNX nodes of ``module.__call__``
for the input value ``x`` (a :class:`Value`, or a list of them for necks and heads).
Layers shared by every architecture are here; each family registers its own modules'
emitters with :func:`register_emitter` (``deploy/onnx_nanodet.py``). BatchNorm (trainable
in eval mode, or torchvision's FrozenBatchNorm2d) is folded into the preceding
convolution, as deploy runtimes (and onnx-simplifier) would do.

GroupNorm cannot be folded into a convolution and opset 11 has no GroupNormalization
(opset 18, and few runtimes have it): it is written as InstanceNormalization over a
``[1, groups, C / groups * H * W]`` view (each group's mean and variance over its
channels and pixels), then the per-channel affine.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np

try:
    import onnx
    from onnx import helper, numpy_helper
except ImportError as err:  # an optional extra: say which
    raise ImportError("ONNX export needs onnx: pip install 'nanodet-jax[onnx]'") from err

from nanodet_jax.models.batchnorm_folding import NORMS as FOLDED_NORMS
from nanodet_jax.models.batchnorm_folding import folded_conv_hwio
from nanodet_jax.models.frozen import FrozenBatchNorm2d
from nanodet_jax.models.layers import (
    Activation,
    Conv2d,
    ConvModule,
    DepthwiseConvModule,
    Sequential,
)
from nanodet_jax.models.norm import BatchNorm2d, GroupNorm


@dataclasses.dataclass(frozen=True)
class Value:  # a graph value and its static (C, H, W) shape; the batch axis is not in it
    name: str
    shape: tuple[int, int, int]


class OnnxGraph:
    """Collects nodes and initializers; hands out unique value names."""

    def emit(self, x: Any, module: Any) -> Any:
        return emit(self, x, module)

    def __init__(self, dynamic_batch: bool = False) -> None:
        self.dynamic_batch = dynamic_batch
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0
        self._consts: dict[tuple, str] = {}

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value: np.ndarray, hint: str = "const") -> str:
        """An initializer holding ``value``; equal values share one (a head shared over the
        pyramid levels, as FCOS's and GFLHead's are, is then stored once, not per level)."""
        value = np.asarray(value)
        key = (value.dtype.str, value.shape, hashlib.blake2b(value.tobytes()).digest())
        if key not in self._consts:
            self._consts[key] = self._name(hint)
            self.initializers.append(numpy_helper.from_array(value, self._consts[key]))
        return self._consts[key]

    def op(self, op_type: str, inputs: list[str], out: str = "", **attrs: Any) -> str:
        out = out or self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def shape(self, *dims: int) -> str:
        """A Reshape target ``[batch, *dims]``. With a dynamic batch axis the batch entry is
        0, which Reshape reads as "the input's own dim 0": a literal 1 would pin the file
        to batch 1 (TensorRT and onnxruntime then reject any other batch)."""
        return self.const(np.array([0 if self.dynamic_batch else 1, *dims], np.int64), "shape")

    def batch_sizes(self, x: str, dims: tuple[int, ...]) -> str:
        """Resize's ``sizes`` input ``[batch, *dims]`` for value ``x``. Resize has no "copy
        this dim" code as Reshape has, so a dynamic batch is read from ``Shape(x)``."""
        if not self.dynamic_batch:
            return self.const(np.array([1, *dims], np.int64), "sizes")
        zero, one = self.const(np.array([0], np.int64)), self.const(np.array([1], np.int64))
        batch = self.op("Slice", [self.op("Shape", [x]), zero, one, zero])
        return self.op("Concat", [batch, self.const(np.array(dims, np.int64), "sizes")], axis=0)

    def split(self, x: str, sizes: list[int]) -> list[str]:
        """Channel split (opset 11 takes the sizes as an attribute, 13+ as an input)."""
        outs = [self._name("split") for _ in sizes]
        self.nodes.append(helper.make_node("Split", [x], outs, name=outs[0], axis=1, split=sizes))
        return outs


def fold_bn(
    conv: Conv2d, bn: BatchNorm2d | FrozenBatchNorm2d | None, reverse_input_channels: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """OIHW kernel and bias of ``bn(conv(x))`` as one conv (``folded_conv_hwio``);
    ``reverse_input_channels``: of ``bn(conv(x[:, ::-1]))`` instead (BGR -> RGB)."""
    kernel, bias = folded_conv_hwio(conv, bn)
    kernel = kernel.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if reverse_input_channels:
        if conv.groups != 1:
            raise ValueError("reversing the input channels needs an ungrouped conv")
        kernel = kernel[:, ::-1]
    return np.ascontiguousarray(kernel), bias


def conv(
    g: OnnxGraph,
    x: Value,
    layer: Conv2d,
    bn: BatchNorm2d | FrozenBatchNorm2d | None = None,
    reverse_input_channels: bool = False,
) -> Value:
    """``bn(layer(x))`` as one Conv; ``reverse_input_channels`` folds a channel reversal of
    ``x`` into the kernel (a model's BGR -> RGB step then costs no node)."""
    kernel, bias = fold_bn(layer, bn, reverse_input_channels)
    cout, _, k, _ = kernel.shape
    inputs = [x.name, g.const(kernel, "weight")]
    if bias is not None:
        inputs.append(g.const(bias, "bias"))
    p, s = layer.padding, layer.stride
    attrs = dict(kernel_shape=[k, k], strides=[s, s], pads=[p] * 4, group=layer.groups)
    _, h, w = x.shape
    return Value(
        g.op("Conv", inputs, **attrs), (cout, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)
    )


# ONNX's Selu defaults are SELU's constants; LeakyRelu needs NanoDet's slope (ONNX's is 0.01).
_SIMPLE_ACTIVATIONS: dict[str, tuple[str, dict[str, float]]] = {
    "ReLU": ("Relu", {}),
    "LeakyReLU": ("LeakyRelu", {"alpha": 0.1}),
    "SELU": ("Selu", {}),
    "ELU": ("Elu", {"alpha": 1.0}),
}


def activation(g: OnnxGraph, x: Value, act: Activation) -> Value:
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
    return Value(out, x.shape)


def sequential(g: OnnxGraph, x: Value, seq: Sequential) -> Value:
    layers = list(seq)
    i = 0
    while i < len(layers):
        layer = layers[i]
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(layer, Conv2d) and isinstance(nxt, FOLDED_NORMS):
            x, i = conv(g, x, layer, nxt), i + 2
        else:
            x, i = emit(g, x, layer), i + 1  # a BatchNorm not after a conv is rejected here
    return x


def conv_module(g: OnnxGraph, x: Value, m: ConvModule) -> Value:
    norm = getattr(m, m.norm_name) if m.norm_name else None
    if norm is not None and not isinstance(norm, FOLDED_NORMS):
        raise NotImplementedError("ONNX export supports BatchNorm ConvModules only (not GN)")
    return activation(g, conv(g, x, m.conv, norm), m.act)


def dw_conv_module(g: OnnxGraph, x: Value, m: DepthwiseConvModule) -> Value:
    x = activation(g, conv(g, x, m.depthwise, m.dwnorm), m.act)
    return activation(g, conv(g, x, m.pointwise, m.pwnorm), m.act)


def concat(g: OnnxGraph, xs: list[Value]) -> Value:
    c = sum(x.shape[0] for x in xs)
    return Value(g.op("Concat", [x.name for x in xs], axis=1), (c, *xs[0].shape[1:]))


def add(g: OnnxGraph, a: Value, b: Value) -> Value:
    return Value(g.op("Add", [a.name, b.name]), a.shape)


def upsample(g: OnnxGraph, x: Value, mode: str, size: tuple[int, int] | None = None) -> Value:
    """x2 upsampling, or to ``size`` (H, W) when given (``F.interpolate(size=...)``)."""
    # Half-pixel bilinear clamps source coordinates at the border, as PyTorch and
    # layers.upsample_bilinear_2x do; nearest is torch's floor(asymmetric) rule: source
    # index floor(i * in / out), which models/necks/fpn_p6p7.nearest_resize computes too.
    if mode == "bilinear":
        attrs = {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}
    else:
        attrs = {
            "mode": "nearest",
            "coordinate_transformation_mode": "asymmetric",
            "nearest_mode": "floor",
        }
    roi = g.const(np.zeros(0, np.float32), "roi")
    c, h, w = x.shape
    if size is None:
        scales = g.const(np.array([1, 1, 2, 2], np.float32), "scales")
        return Value(g.op("Resize", [x.name, roi, scales], **attrs), (c, 2 * h, 2 * w))
    # Opset 11 takes sizes as the fourth input, with an empty scales tensor.
    empty = g.const(np.zeros(0, np.float32), "scales")
    sizes = g.batch_sizes(x.name, (c, *size))
    return Value(g.op("Resize", [x.name, roi, empty, sizes], **attrs), (c, *size))


def group_norm(g: OnnxGraph, x: Value, gn: GroupNorm) -> Value:
    c, h, w = x.shape
    groups = gn.num_groups
    grouped = g.op("Reshape", [x.name, g.shape(groups, -1)])
    ones = g.const(np.ones(groups, np.float32), "gn_scale")
    zeros = g.const(np.zeros(groups, np.float32), "gn_shift")
    normed = g.op("InstanceNormalization", [grouped, ones, zeros], epsilon=float(gn.eps))
    back = g.op("Reshape", [normed, g.shape(c, h, w)])
    weight = np.asarray(gn.weight[...], np.float32).reshape(c, 1, 1)
    bias = np.asarray(gn.bias[...], np.float32).reshape(c, 1, 1)
    scaled = g.op("Mul", [back, g.const(weight, "gn_weight")])
    return Value(g.op("Add", [scaled, g.const(bias, "gn_bias")]), x.shape)


EMITTERS: dict[type, Callable[[OnnxGraph, Any, Any], Any]] = {
    Sequential: sequential,
    Conv2d: conv,
    Activation: activation,
    ConvModule: conv_module,
    DepthwiseConvModule: dw_conv_module,
    GroupNorm: group_norm,
}


def register_emitter(module_type: type) -> Callable:
    """Decorator: ``@register_emitter(MyBlock)`` on ``def emit_block(graph, x, module)``."""

    def add(fn: Callable) -> Callable:
        EMITTERS[module_type] = fn
        return fn

    return add


def emit(g: OnnxGraph, x: Any, module: Any) -> Any:
    emitter = EMITTERS.get(type(module))
    if emitter is None:
        raise NotImplementedError(f"no ONNX export for {type(module).__name__}")
    return emitter(g, x, module)
