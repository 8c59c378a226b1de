"""ONNX emitters (opset 11) of torchvision's FCOS: the ResNet body, the FPN with P6/P7
and the FCOS head (``models/detectors/fcos.py``).

The graph's contract (``onnx_export.build_onnx_model`` names the values):

* input ``data``: float32 ``[1, 3, H, W]``, NCHW, normalised as the config's pipeline
  normalises (our FCOS configs: BGR with the ImageNet mean / std in 0-255 units), as for
  NanoDet. With ``input_channel_order="BGR"`` the model reverses the channels to RGB
  before the body; the graph does the same by reversing conv1's input channels in its
  kernel, so the reversal costs no node (``onnx_graph.fold_bn``).
* three outputs, ``model(images)``'s dict in torchvision's point order (level, row,
  column): ``cls_logits [1, N, C]`` (logits, no sigmoid), ``bbox_regression [1, N, 4]``
  (relu'd left/top/right/bottom distances in units of the level's anchor size) and
  ``bbox_ctrness [1, N, 1]`` (centerness logit). Decoding them is ``FCOS.decode``: points
  ``(j * stride_w, i * stride_h)`` with ``stride = input size // grid size`` per level.

The body's BatchNorms (FrozenBatchNorm2d, or trainable BatchNorm with its running
statistics) fold into the convolutions; the head's GroupNorms are InstanceNormalization
over grouped views (``onnx_graph.group_norm``). The top-down path is nearest ``Resize``
to the lateral's size (exactly PyTorch's floor rule, also where a side is odd); P6 and P7
are stride-2 convs with explicit padding 1, so odd sides round up as in the model.
"""

from __future__ import annotations

from nanodet_jax.deploy.onnx_backbones_1 import resnet
from nanodet_jax.deploy.onnx_graph import (
    OnnxGraph,
    Value,
    add,
    conv,
    register_emitter,
    sequential,
    upsample,
)
from nanodet_jax.models.backbones.resnet import ResNet
from nanodet_jax.models.detectors.fcos import FCOS
from nanodet_jax.models.heads.fcos_head import OUTPUT_KEYS, FCOSHead
from nanodet_jax.models.necks.fpn_p6p7 import FeaturePyramidNetwork, LastLevelP6P7


def _relu(g: OnnxGraph, x: Value) -> Value:
    return Value(g.op("Relu", [x.name]), x.shape)


def _p6p7(g: OnnxGraph, p: list[Value], c: list[Value], m: LastLevelP6P7) -> list[Value]:
    p6 = conv(g, p[-1] if m.use_P5 else c[-1], m.p6)
    return [*p, p6, conv(g, _relu(g, p6), m.p7)]


@register_emitter(FeaturePyramidNetwork)
def _fpn(g: OnnxGraph, inputs: list[Value], m: FeaturePyramidNetwork) -> list[Value]:
    inputs = list(inputs)
    last = sequential(g, inputs[-1], m.inner_blocks[-1])
    results = [sequential(g, last, m.layer_blocks[-1])]
    for i in range(len(inputs) - 2, -1, -1):
        lateral = sequential(g, inputs[i], m.inner_blocks[i])
        size = lateral.shape[1:]
        top_down = last if last.shape[1:] == size else upsample(g, last, "nearest", size)
        last = add(g, lateral, top_down)
        results.insert(0, sequential(g, last, m.layer_blocks[i]))
    if m.extra_blocks is not None:
        results = _p6p7(g, results, inputs, m.extra_blocks)
    return results


def _join_levels(g: OnnxGraph, levels: list[Value]) -> Value:
    """Per-level ``[1, c, h, w]`` maps -> ``[1, sum(h * w), c]`` (value shape ``(N, c)``)."""
    flat = []
    for v in levels:
        c, h, w = v.shape
        flat.append(g.op("Reshape", [v.name, g.shape(c, h * w)]))
    joined = g.op("Concat", flat, axis=2)
    total = sum(v.shape[1] * v.shape[2] for v in levels)
    return Value(g.op("Transpose", [joined], perm=[0, 2, 1]), (total, levels[0].shape[0]))


@register_emitter(FCOSHead)
def _head(g: OnnxGraph, feats: list[Value], m: FCOSHead) -> dict[str, Value]:
    cls_head, reg_head = m.classification_head, m.regression_head
    cls, reg, ctr = [], [], []
    for f in feats:
        cls.append(conv(g, sequential(g, f, cls_head.conv), cls_head.cls_logits))
        tower = sequential(g, f, reg_head.conv)
        reg.append(_relu(g, conv(g, tower, reg_head.bbox_reg)))
        ctr.append(conv(g, tower, reg_head.bbox_ctrness))
    return {k: _join_levels(g, v) for k, v in zip(OUTPUT_KEYS, (cls, reg, ctr))}


@register_emitter(FCOS)
def _fcos(g: OnnxGraph, image: Value, m: FCOS) -> dict[str, Value]:
    body = m.backbone.body
    if not isinstance(body, ResNet):  # freeze_body_layers already needs ResNet's layout
        raise NotImplementedError(f"no ONNX export for an FCOS body {type(body).__name__}")
    feats = resnet(g, image, body, reverse_input_channels=m.input_channel_order == "BGR")
    return _head(g, _fpn(g, list(feats), m.backbone.fpn), m.head)
