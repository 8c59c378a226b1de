"""ONNX emitters (opset 11) of the EfficientNet-Lite, GhostNet and CustomCspNet backbones,
and of the Ghost modules GhostPAN shares with GhostNet.

GhostNet's gate ``relu6(x + 3) / 6`` is ONNX's ``HardSigmoid`` with ``alpha = 1/6`` and
``beta = 0.5`` (``max(0, min(1, x / 6 + 0.5))``, the same function), available in opset 11.
EfficientNet-Lite's drop connect is training-only and has no node.
"""

from __future__ import annotations

from nanodet_jax.deploy.onnx_graph import (
    OnnxGraph,
    Value,
    activation,
    add,
    concat,
    conv,
    conv_module,
    emit,
    register_emitter,
    sequential,
)
from nanodet_jax.models.backbones.custom_csp import CspBlock, CustomCspNet, MaxPool2d, TinyResBlock
from nanodet_jax.models.backbones.efficientnet_lite import EfficientNetLite, MBConvBlock
from nanodet_jax.models.backbones.ghostnet import (
    ConvBnAct,
    GhostBottleneck,
    GhostModule,
    GhostNet,
    SqueezeExcite,
)


@register_emitter(GhostModule)
def _ghost_module(g: OnnxGraph, x: Value, m: GhostModule) -> Value:
    x1 = sequential(g, x, m.primary_conv)
    return concat(g, [x1, sequential(g, x1, m.cheap_operation)])


@register_emitter(SqueezeExcite)
def _squeeze_excite(g: OnnxGraph, x: Value, m: SqueezeExcite) -> Value:
    pooled = Value(g.op("GlobalAveragePool", [x.name]), (x.shape[0], 1, 1))
    s = conv(g, activation(g, conv(g, pooled, m.conv_reduce), m.act1), m.conv_expand)
    gate = g.op("HardSigmoid", [s.name], alpha=1.0 / 6, beta=0.5)
    return Value(g.op("Mul", [x.name, gate]), x.shape)


@register_emitter(GhostBottleneck)
def _ghost_bottleneck(g: OnnxGraph, x: Value, m: GhostBottleneck) -> Value:
    y = _ghost_module(g, x, m.ghost1)
    if m.stride > 1:
        y = conv(g, y, m.conv_dw, m.bn_dw)
    if m.se is not None:
        y = _squeeze_excite(g, y, m.se)
    return add(g, _ghost_module(g, y, m.ghost2), sequential(g, x, m.shortcut))


@register_emitter(ConvBnAct)
def _conv_bn_act(g: OnnxGraph, x: Value, m: ConvBnAct) -> Value:
    return activation(g, conv(g, x, m.conv, m.bn1), m.act1)


@register_emitter(GhostNet)
def _ghostnet(g: OnnxGraph, x: Value, m: GhostNet) -> tuple[Value, ...]:
    x = activation(g, conv(g, x, m.conv_stem, m.bn1), m.act1)
    outs = []
    for i, stage in enumerate(m.blocks):
        x = sequential(g, x, stage)
        if i in m.out_stages:
            outs.append(x)
    return tuple(outs)


@register_emitter(MBConvBlock)
def _mbconv(g: OnnxGraph, x: Value, m: MBConvBlock) -> Value:
    y = x
    if m.expand_ratio != 1:
        y = activation(g, conv(g, y, m._expand_conv, m._bn0), m._relu)
    y = activation(g, conv(g, y, m._depthwise_conv, m._bn1), m._relu)
    y = conv(g, y, m._project_conv, m._bn2)
    return add(g, y, x) if m.has_residual else y


@register_emitter(EfficientNetLite)
def _efficientnet_lite(g: OnnxGraph, x: Value, m: EfficientNetLite) -> tuple[Value, ...]:
    x = sequential(g, x, m.stem)
    outs = []
    for j, stage in enumerate(m.blocks):
        for block in stage:
            x = _mbconv(g, x, block)
        if j in m.out_stages:
            outs.append(x)
    return tuple(outs)


@register_emitter(MaxPool2d)
def _max_pool(g: OnnxGraph, x: Value, m: MaxPool2d) -> Value:
    k, s, p = m.kernel_size, m.stride, m.padding
    out = g.op("MaxPool", [x.name], kernel_shape=[k, k], strides=[s, s], pads=[p] * 4)
    c, h, w = x.shape
    return Value(out, (c, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1))


@register_emitter(TinyResBlock)
def _tiny_res_block(g: OnnxGraph, x: Value, m: TinyResBlock) -> Value:
    x = conv_module(g, x, m.in_conv)
    x1 = conv_module(g, x, m.mid_conv)
    if m.res_type == "add":
        return conv_module(g, add(g, x, x1), m.out_conv)
    return concat(g, [x1, x])


@register_emitter(CspBlock)
def _csp_block(g: OnnxGraph, x: Value, m: CspBlock) -> Value:
    x = conv_module(g, x, m.in_conv)
    return concat(g, [conv_module(g, sequential(g, x, m.res_blocks), m.res_out_conv), x])


@register_emitter(CustomCspNet)
def _custom_csp(g: OnnxGraph, x: Value, m: CustomCspNet) -> tuple[Value, ...]:
    outs = []
    for i, stage in enumerate(m.stages):
        x = emit(g, x, stage)
        if i in m.out_stages:
            outs.append(x)
    return tuple(outs)
