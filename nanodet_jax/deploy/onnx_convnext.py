"""ONNX emitters (opset 11) of the ConvNeXt backbone (``TIMMWrapper``).

Values are NCHW, so ConvNeXt's LayerNorm (over channels) reduces axis 1; opset 11 has no
LayerNormalization, so it is written as ReduceMean / Sub / Mul / Sqrt / Div, and the
exact-erf GELU comes from ``onnx_graph.activation``. The MLP is a pair of 1x1 ``Conv``
whether the weights are 1x1 convs or ``nn.Linear`` (the same map on a feature map).
Drop path is a training-time op and has no node.
"""

from __future__ import annotations

import numpy as np

from nanodet_jax.deploy.onnx_graph import (
    OnnxGraph,
    Value,
    activation,
    add,
    conv,
    register_emitter,
    sequential,
)
from nanodet_jax.models.backbones.timm_convnext import (
    ConvMlp,
    ConvNeXtBlock,
    ConvNeXtFeatures,
    ConvNeXtStage,
    LayerNorm2d,
    TIMMWrapper,
)
from nanodet_jax.models.layers import Conv2d
from nanodet_jax.models.norm import LayerNorm
from nanodet_jax.models.transformer import Linear


def _channels(values: np.ndarray) -> np.ndarray:
    """A per-channel vector shaped to broadcast over ``[1, C, H, W]``."""
    return np.asarray(values, np.float32).reshape(-1, 1, 1)


@register_emitter(LayerNorm2d)
def _layer_norm_2d(g: OnnxGraph, x: Value, m: LayerNorm) -> Value:
    mean = g.op("ReduceMean", [x.name], axes=[1], keepdims=1)
    centered = g.op("Sub", [x.name, mean])
    var = g.op("ReduceMean", [g.op("Mul", [centered, centered])], axes=[1], keepdims=1)
    std = g.op("Sqrt", [g.op("Add", [var, g.const(np.float32(m.eps), "eps")])])
    y = g.op("Mul", [g.op("Div", [centered, std]), g.const(_channels(m.weight[...]), "weight")])
    return Value(g.op("Add", [y, g.const(_channels(m.bias[...]), "bias")]), x.shape)


def _fc(g: OnnxGraph, x: Value, layer: Conv2d | Linear) -> Value:
    if isinstance(layer, Conv2d):
        return conv(g, x, layer)
    weight = np.asarray(layer.weight[...], np.float32)  # [out, in] = OIHW without H, W
    inputs = [x.name, g.const(weight[:, :, None, None], "weight")]
    inputs.append(g.const(np.asarray(layer.bias[...], np.float32), "bias"))
    out = g.op("Conv", inputs, kernel_shape=[1, 1], strides=[1, 1], pads=[0, 0, 0, 0])
    return Value(out, (weight.shape[0], *x.shape[1:]))


@register_emitter(ConvMlp)
def _mlp(g: OnnxGraph, x: Value, m: ConvMlp) -> Value:
    return _fc(g, activation(g, _fc(g, x, m.fc1), m.act), m.fc2)


@register_emitter(ConvNeXtBlock)
def _block(g: OnnxGraph, x: Value, m: ConvNeXtBlock) -> Value:
    # The channel-last LayerNorm of the Linear variants normalises the same axis.
    y = _layer_norm_2d(g, conv(g, x, m.conv_dw), m.norm)
    y = _mlp(g, y, m.mlp)
    scaled = g.op("Mul", [y.name, g.const(_channels(m.gamma[...]), "gamma")])
    return add(g, Value(scaled, y.shape), x)


@register_emitter(ConvNeXtStage)
def _stage(g: OnnxGraph, x: Value, m: ConvNeXtStage) -> Value:
    if m.downsample is not None:
        x = sequential(g, x, m.downsample)
    return sequential(g, x, m.blocks)


@register_emitter(ConvNeXtFeatures)
def _features(g: OnnxGraph, x: Value, m: ConvNeXtFeatures) -> tuple[Value, ...]:
    x = _layer_norm_2d(g, conv(g, x, m.stem_0), m.stem_1)
    outs = []
    for i in range(m.num_stages):
        x = _stage(g, x, getattr(m, f"stages_{i}"))
        if i in m.out_indices:
            outs.append(x)
    return tuple(outs)


@register_emitter(TIMMWrapper)
def _wrapper(g: OnnxGraph, x: Value, m: TIMMWrapper) -> tuple[Value, ...]:
    return _features(g, x, m.timm)
