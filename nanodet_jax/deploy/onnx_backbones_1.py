"""ONNX emitters of the ResNet, MobileNetV2 and RepVGG backbones.

BatchNorm (or FrozenBatchNorm2d) folds into the convolution before it
(``onnx_graph.fold_bn``). A RepVGG block is always written as its single fused 3x3 conv,
as NanoDet exports it after ``repvgg_det_model_convert``: a three-branch (training-form)
block is fused on the fly with the same conversion, so the graph is the deploy model's
whichever form is exported.
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
from nanodet_jax.models.backbones.mobilenetv2 import InvertedResidual, MobileNetV2
from nanodet_jax.models.backbones.repvgg import RepVGG, RepVGGConvModule
from nanodet_jax.models.backbones.resnet import BasicBlock, Bottleneck, ResNet


def max_pool_3x3_s2(g: OnnxGraph, x: Value) -> Value:
    """``nn.MaxPool2d(3, 2, 1)``: ONNX pads with -inf too, so padding never wins."""
    c, h, w = x.shape
    out = g.op("MaxPool", [x.name], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    return Value(out, (c, (h - 1) // 2 + 1, (w - 1) // 2 + 1))


def _stages(g: OnnxGraph, x: Value, m, names: list[str], out_stages) -> tuple[Value, ...]:
    outs = []
    for i, name in names:
        x = sequential(g, x, getattr(m, name))
        if i in out_stages:
            outs.append(x)
    return tuple(outs)


def _residual(g: OnnxGraph, x: Value, m: BasicBlock | Bottleneck) -> Value:
    return x if m.downsample is None else sequential(g, x, m.downsample)


@register_emitter(BasicBlock)
def _basic_block(g: OnnxGraph, x: Value, m: BasicBlock) -> Value:
    out = activation(g, conv(g, x, m.conv1, m.bn1), m.act)
    out = conv(g, out, m.conv2, m.bn2)
    return activation(g, add(g, out, _residual(g, x, m)), m.act)


@register_emitter(Bottleneck)
def _bottleneck(g: OnnxGraph, x: Value, m: Bottleneck) -> Value:
    out = activation(g, conv(g, x, m.conv1, m.bn1), m.act)
    out = activation(g, conv(g, out, m.conv2, m.bn2), m.act)
    out = conv(g, out, m.conv3, m.bn3)
    return activation(g, add(g, out, _residual(g, x, m)), m.act)


@register_emitter(ResNet)
def resnet(
    g: OnnxGraph, x: Value, m: ResNet, reverse_input_channels: bool = False
) -> tuple[Value, ...]:
    """The ResNet's output stages; ``reverse_input_channels``: of ``m(x[..., ::-1])``, the
    reversal folded into conv1's kernel (FCOS's BGR input, ``deploy/onnx_fcos.py``)."""
    stem = conv(g, x, m.conv1, m.bn1, reverse_input_channels)
    x = max_pool_3x3_s2(g, activation(g, stem, m.act))
    return _stages(g, x, m, [(i, f"layer{i}") for i in range(1, 5)], m.out_stages)


@register_emitter(InvertedResidual)
def _inverted_residual(g: OnnxGraph, x: Value, m: InvertedResidual) -> Value:
    out = sequential(g, x, m.conv)
    return add(g, x, out) if m.use_res_connect else out


@register_emitter(MobileNetV2)
def _mobilenetv2(g: OnnxGraph, x: Value, m: MobileNetV2) -> tuple[Value, ...]:
    x = sequential(g, x, m.first_layer)
    return _stages(g, x, m, [(i, f"stage{i}") for i in range(7)], m.out_stages)


@register_emitter(RepVGGConvModule)
def _repvgg_block(g: OnnxGraph, x: Value, m: RepVGGConvModule) -> Value:
    if m.deploy:
        return activation(g, conv(g, x, m.rbr_reparam), m.act)
    kernel, bias = m.repvgg_convert()  # OIHW, as ONNX wants it
    stride = m.rbr_dense[0].stride
    inputs = [x.name, g.const(kernel.astype(np.float32), "weight"), g.const(bias, "bias")]
    attrs = dict(kernel_shape=[3, 3], strides=[stride, stride], pads=[1] * 4, group=m.groups)
    _, h, w = x.shape
    shape = (kernel.shape[0], (h - 1) // stride + 1, (w - 1) // stride + 1)
    return activation(g, Value(g.op("Conv", inputs, **attrs), shape), m.act)


@register_emitter(RepVGG)
def _repvgg(g: OnnxGraph, x: Value, m: RepVGG) -> tuple[Value, ...]:
    x = _repvgg_block(g, x, m.stage0)
    return _stages(g, x, m, [(i, f"stage{i}") for i in range(1, 5)], m.out_stages)
