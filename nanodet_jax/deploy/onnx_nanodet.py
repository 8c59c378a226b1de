"""ONNX emitters of NanoDet-Plus's modules: ShuffleNetV2, GhostPAN, NanoDetPlusHead.

The head's output follows NanoDet's ``_forward_onnx``: ``[1, num_priors, num_classes +
4 * (reg_max + 1)]``, class scores as sigmoid probabilities, the rest raw DFL logits.
"""

from __future__ import annotations

# GhostPAN's bottlenecks are GhostNet's: their emitters live with GhostNet's.
from nanodet_jax.deploy import onnx_backbones_2  # noqa: F401  (registers them)
from nanodet_jax.deploy.onnx_graph import (
    OnnxGraph,
    Value,
    add,
    concat,
    conv,
    conv_module,
    emit,
    register_emitter,
    sequential,
    upsample,
)
from nanodet_jax.models.backbones.shufflenetv2 import ShuffleNetV2, ShuffleV2Block
from nanodet_jax.models.heads.nanodet_plus_head import NanoDetPlusHead
from nanodet_jax.models.necks.ghost_pan import GhostBlocks, GhostPAN


@register_emitter(ShuffleV2Block)
def _shuffle_block(g: OnnxGraph, x: Value, m: ShuffleV2Block) -> Value:
    c, h, w = x.shape
    if m.stride == 1:
        half = c // 2
        left, right = g.split(x.name, [half, half])
        right_out = sequential(g, Value(right, (half, h, w)), m.branch2)
        out = concat(g, [Value(left, (half, h, w)), right_out])
    else:
        out = concat(g, [sequential(g, x, m.branch1), sequential(g, x, m.branch2)])
    # Channel shuffle as Reshape-Transpose-Reshape: the pattern ncnn/MNN map to ShuffleChannel.
    c, h, w = out.shape
    grouped = g.op("Reshape", [out.name, g.shape(2, c // 2, h, w)])
    swapped = g.op("Transpose", [grouped], perm=[0, 2, 1, 3, 4])
    flat = g.op("Reshape", [swapped, g.shape(c, h, w)])
    return Value(flat, out.shape)


@register_emitter(ShuffleNetV2)
def _backbone(g: OnnxGraph, x: Value, m: ShuffleNetV2) -> tuple[Value, ...]:
    x = sequential(g, x, m.conv1)
    c, h, w = x.shape
    pooled = g.op("MaxPool", [x.name], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    x = Value(pooled, (c, (h - 1) // 2 + 1, (w - 1) // 2 + 1))
    outs = []
    for i, stage in ((2, m.stage2), (3, m.stage3), (4, m.stage4)):
        x = sequential(g, x, stage)
        if i in m.out_stages:
            outs.append(x)
    return tuple(outs)


@register_emitter(GhostBlocks)
def _ghost_blocks(g: OnnxGraph, x: Value, m: GhostBlocks) -> Value:
    out = sequential(g, x, m.blocks)
    return add(g, out, conv_module(g, x, m.reduce_conv)) if m.use_res else out


@register_emitter(GhostPAN)
def _pan(g: OnnxGraph, inputs: tuple[Value, ...], m: GhostPAN) -> list[Value]:
    feats = [conv_module(g, x, r) for x, r in zip(inputs, m.reduce_layers)]
    n = len(feats)
    inner = [feats[-1]]
    for idx in range(n - 1, 0, -1):
        merged = concat(g, [upsample(g, inner[0], m.upsample_mode), feats[idx - 1]])
        inner.insert(0, _ghost_blocks(g, merged, m.top_down_blocks[n - 1 - idx]))
    outs = [inner[0]]
    for idx in range(n - 1):
        down = emit(g, outs[-1], m.downsamples[idx])
        outs.append(_ghost_blocks(g, concat(g, [down, inner[idx + 1]]), m.bottom_up_blocks[idx]))
    for extra_in, extra_out in zip(m.extra_lvl_in_conv, m.extra_lvl_out_conv):
        outs.append(add(g, emit(g, feats[-1], extra_in), emit(g, outs[-1], extra_out)))
    return outs


@register_emitter(NanoDetPlusHead)
def _head(g: OnnxGraph, feats: list[Value], m: NanoDetPlusHead) -> Value:
    """Levels as [1, C+4(R+1), h*w], joined, class rows sigmoided -> a [1, P, C+4(R+1)]
    value, whose ``shape`` is (P, C+4(R+1))."""
    flat, num_priors = [], 0
    for feat, convs, gfl in zip(feats, m.cls_convs, m.gfl_cls):
        for layer in convs:
            feat = emit(g, feat, layer)
        out = conv(g, feat, gfl)
        c, h, w = out.shape
        num_priors += h * w
        flat.append(g.op("Reshape", [out.name, g.shape(c, h * w)]))
    joined = g.op("Concat", flat, axis=2)
    cls_part, reg_part = g.split(joined, [m.num_classes, 4 * (m.reg_max + 1)])
    scored = g.op("Concat", [g.op("Sigmoid", [cls_part]), reg_part], axis=1)
    out = g.op("Transpose", [scored], perm=[0, 2, 1])
    return Value(out, (num_priors, m.num_classes + 4 * (m.reg_max + 1)))
