"""ONNX emitters of NanoDet's legacy heads (GFLHead, NanoDetHead) for OneStageDetector.

The output follows NanoDet's ``_forward_onnx`` of those heads: ``[1, num_priors,
num_classes + 4 * (reg_max + 1)]``, class scores as sigmoid probabilities, then the raw
DFL logits (GFLHead's already multiplied by its level's ``Scale``). Priors are in the
head's order; decoding them needs cell centres ``(j + 0.5) * stride``.

GroupNorm is written as InstanceNormalization (``onnx_graph.group_norm``), BatchNorm is
folded as everywhere else.
"""

from __future__ import annotations

import numpy as np

from nanodet_jax.deploy.onnx_graph import (
    FOLDED_NORMS,
    OnnxGraph,
    Value,
    activation,
    conv,
    group_norm,
    register_emitter,
)
from nanodet_jax.models.heads.gfl_head import GFLHead
from nanodet_jax.models.heads.nanodet_head import NanoDetHead
from nanodet_jax.models.layers import ConvModule, DepthwiseConvModule
from nanodet_jax.models.norm import GroupNorm


def _conv_norm(g: OnnxGraph, x: Value, layer, norm) -> Value:
    if norm is None or isinstance(norm, FOLDED_NORMS):
        return conv(g, x, layer, norm)
    if isinstance(norm, GroupNorm):
        return group_norm(g, conv(g, x, layer), norm)
    raise NotImplementedError(f"no ONNX export for {type(norm).__name__}")


def conv_block(g: OnnxGraph, x: Value, m: ConvModule | DepthwiseConvModule) -> Value:
    """A (depthwise) ConvModule with BatchNorm (folded), GroupNorm or no norm."""
    if isinstance(m, DepthwiseConvModule):
        x = activation(g, _conv_norm(g, x, m.depthwise, m.dwnorm), m.act)
        return activation(g, _conv_norm(g, x, m.pointwise, m.pwnorm), m.act)
    norm = getattr(m, m.norm_name) if m.norm_name else None
    return activation(g, _conv_norm(g, x, m.conv, norm), m.act)


def _join_levels(g: OnnxGraph, levels: list[tuple[Value, Value]], num_classes: int) -> Value:
    flat, num_priors, channels = [], 0, 0
    for cls_out, reg_out in levels:
        c = cls_out.shape[0] + reg_out.shape[0]
        _, h, w = cls_out.shape
        joined = g.op("Concat", [cls_out.name, reg_out.name], axis=1)
        flat.append(g.op("Reshape", [joined, g.shape(c, h * w)]))
        num_priors, channels = num_priors + h * w, c
    out = g.op("Concat", flat, axis=2)
    cls_part, reg_part = g.split(out, [num_classes, channels - num_classes])
    scored = g.op("Concat", [g.op("Sigmoid", [cls_part]), reg_part], axis=1)
    return Value(g.op("Transpose", [scored], perm=[0, 2, 1]), (num_priors, channels))


def _tower(g: OnnxGraph, x: Value, layers) -> Value:
    for layer in layers:
        x = conv_block(g, x, layer)
    return x


@register_emitter(GFLHead)
def _gfl_head(g: OnnxGraph, feats: list[Value], m: GFLHead) -> Value:
    levels = []
    for x, scale in zip(feats, m.scales):
        cls_out = conv(g, _tower(g, x, m.cls_convs), m.gfl_cls)
        reg_out = conv(g, _tower(g, x, m.reg_convs), m.gfl_reg)
        factor = g.const(np.asarray(scale.scale[...], np.float32), "scale")
        levels.append((cls_out, Value(g.op("Mul", [reg_out.name, factor]), reg_out.shape)))
    return _join_levels(g, levels, m.num_classes)


@register_emitter(NanoDetHead)
def _nanodet_head(g: OnnxGraph, feats: list[Value], m: NanoDetHead) -> Value:
    levels = []
    for x, cls_convs, reg_convs, gfl_cls, gfl_reg in zip(
        feats, m.cls_convs, m.reg_convs, m.gfl_cls, m.gfl_reg
    ):
        cls_feat = _tower(g, x, cls_convs)
        if m.share_cls_reg:
            out = conv(g, cls_feat, gfl_cls)
            c, h, w = out.shape
            cls_name, reg_name = g.split(out.name, [m.num_classes, c - m.num_classes])
            levels.append(
                (Value(cls_name, (m.num_classes, h, w)), Value(reg_name, (c - m.num_classes, h, w)))
            )
        else:
            reg_out = conv(g, _tower(g, x, reg_convs), gfl_reg)
            levels.append((conv(g, cls_feat, gfl_cls), reg_out))
    return _join_levels(g, levels, m.num_classes)
