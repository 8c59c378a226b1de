"""ONNX emitters (opset 11) of NanoDet's legacy necks: FPN, PAN and TAN.

Resizing is ``Resize`` (linear, half_pixel), which clamps source coordinates at the
border as PyTorch does and reads two source pixels per output pixel (no antialiasing):
by scales where NanoDet passes a scale factor (FPN/PAN), by sizes where it passes a
size (TAN). TAN's encoder works on ``[1, tokens, C]`` values; opset 11 has no
LayerNormalization, so it is written as ReduceMean / Sub / Mul / Sqrt / Div.
"""

from __future__ import annotations

import math

import numpy as np

from nanodet_jax.deploy.onnx_graph import (
    OnnxGraph,
    Value,
    activation,
    add,
    concat,
    conv_module,
    emit,
    register_emitter,
    upsample,
)
from nanodet_jax.models.necks.fpn import FPN
from nanodet_jax.models.necks.pan import PAN
from nanodet_jax.models.necks.tan import TAN
from nanodet_jax.models.norm import LayerNorm
from nanodet_jax.models.transformer import (
    MLP,
    Linear,
    MultiheadAttention,
    TransformerBlock,
    TransformerEncoder,
)


def resize_bilinear(
    g: OnnxGraph, x: Value, size: tuple[int, int] | None = None, scale: float | None = None
) -> Value:
    """``F.interpolate(mode="bilinear")`` by ``size`` or by ``scale`` (as models/resize.py)."""
    c, h, w = x.shape
    roi = g.const(np.zeros(0, np.float32), "roi")
    attrs = {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}
    if scale is not None:
        scales = g.const(np.array([1, 1, scale, scale], np.float32), "scales")
        out = g.op("Resize", [x.name, roi, scales], **attrs)
        return Value(out, (c, int(math.floor(h * scale)), int(math.floor(w * scale))))
    return upsample(g, x, "bilinear", size)


def _laterals(g: OnnxGraph, inputs: list[Value], m: FPN) -> list[Value]:
    laterals = [conv_module(g, inputs[i + m.start_level], c) for i, c in enumerate(m.lateral_convs)]
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = add(g, laterals[i - 1], resize_bilinear(g, laterals[i], scale=2.0))
    return laterals


@register_emitter(FPN)
def _fpn(g: OnnxGraph, inputs: list[Value], m: FPN) -> list[Value]:
    return _laterals(g, inputs, m)


@register_emitter(PAN)
def _pan(g: OnnxGraph, inputs: list[Value], m: PAN) -> list[Value]:
    outs = _laterals(g, inputs, m)
    for i in range(len(outs) - 1):
        outs[i + 1] = add(g, outs[i + 1], resize_bilinear(g, outs[i], scale=0.5))
    return outs


# Token values are [1, L, C] names; the helpers below take and return plain names.


def _linear(g: OnnxGraph, x: str, m: Linear) -> str:
    w = np.asarray(m.weight[...], np.float32).T  # [in, out]
    y = g.op("MatMul", [x, g.const(w, "weight")])
    return g.op("Add", [y, g.const(np.asarray(m.bias[...], np.float32), "bias")])


def _layer_norm(g: OnnxGraph, x: str, m: LayerNorm) -> str:
    mean = g.op("ReduceMean", [x], axes=[-1], keepdims=1)
    centered = g.op("Sub", [x, mean])
    var = g.op("ReduceMean", [g.op("Mul", [centered, centered])], axes=[-1], keepdims=1)
    std = g.op("Sqrt", [g.op("Add", [var, g.const(np.float32(m.eps), "eps")])])
    y = g.op(
        "Mul",
        [g.op("Div", [centered, std]), g.const(np.asarray(m.weight[...], np.float32), "weight")],
    )
    return g.op("Add", [y, g.const(np.asarray(m.bias[...], np.float32), "bias")])


def _heads(g: OnnxGraph, x: str, tokens: int, heads: int, dim: int, perm: list[int]) -> str:
    split = g.op("Reshape", [x, g.shape(tokens, heads, dim)])
    return g.op("Transpose", [split], perm=perm)


def _attention(g: OnnxGraph, x: str, m: MultiheadAttention, tokens: int, c: int) -> str:
    h = m.num_heads
    d = c // h
    weight = np.asarray(m.in_proj_weight[...], np.float32)
    bias = np.asarray(m.in_proj_bias[...], np.float32)
    q, k, v = (
        g.op(
            "Add",
            [
                g.op("MatMul", [x, g.const(weight[i * c : (i + 1) * c].T, "weight")]),
                g.const(bias[i * c : (i + 1) * c], "bias"),
            ],
        )
        for i in range(3)
    )
    q = g.op("Mul", [q, g.const(np.float32(1.0 / math.sqrt(d)), "scaling")])
    q = _heads(g, q, tokens, h, d, [0, 2, 1, 3])  # [1, h, L, d]
    k = _heads(g, k, tokens, h, d, [0, 2, 3, 1])  # [1, h, d, L]
    v = _heads(g, v, tokens, h, d, [0, 2, 1, 3])
    # Opset 11's Softmax normalises over all axes from `axis` on: the last one here.
    weights = g.op("Softmax", [g.op("MatMul", [q, k])], axis=3)
    out = g.op("Transpose", [g.op("MatMul", [weights, v])], perm=[0, 2, 1, 3])
    out = g.op("Reshape", [out, g.shape(tokens, c)])
    return _linear(g, out, m.out_proj)


def _mlp(g: OnnxGraph, x: str, m: MLP, tokens: int) -> str:
    hidden = _linear(g, x, m.fc1)
    # activation() only reads and passes on the shape; (features, tokens, 1) stands in.
    act = activation(g, Value(hidden, (m.fc1.weight[...].shape[0], tokens, 1)), m.act)
    return _linear(g, act.name, m.fc2)


def _encoder(g: OnnxGraph, x: str, m: TransformerEncoder, tokens: int, c: int) -> str:
    x = g.op("Add", [x, _attention(g, _layer_norm(g, x, m.norm1), m.attn, tokens, c)])
    return g.op("Add", [x, _mlp(g, _layer_norm(g, x, m.norm2), m.mlp, tokens)])


def transformer_block(g: OnnxGraph, x: Value, m: TransformerBlock, pos_embed: np.ndarray) -> Value:
    """``m(x, pos_embed)``: NCHW -> [1, h * w, C] tokens -> encoders -> NCHW."""
    x = emit(g, x, m.conv)
    c, h, w = x.shape
    flat = g.op("Reshape", [x.name, g.shape(c, h * w)])
    tokens = g.op("Transpose", [flat], perm=[0, 2, 1])
    tokens = g.op("Add", [tokens, g.const(np.asarray(pos_embed, np.float32)[:, 0, :])])
    for layer in m.encoders:
        tokens = _encoder(g, tokens, layer, h * w, c)
    back = g.op("Transpose", [tokens], perm=[0, 2, 1])
    return Value(g.op("Reshape", [back, g.shape(c, h, w)]), (c, h, w))


@register_emitter(TAN)
def _tan(g: OnnxGraph, inputs: list[Value], m: TAN) -> list[Value]:
    laterals = [conv_module(g, x, c) for x, c in zip(inputs, m.lateral_convs)]
    mid_hw = laterals[1].shape[1:]
    if tuple(mid_hw) != m.feature_hw:
        raise ValueError(f"TAN's middle level is {mid_hw}, its position embedding {m.feature_hw}")
    mid = concat(
        g,
        [
            resize_bilinear(g, laterals[0], size=mid_hw),
            laterals[1],
            resize_bilinear(g, laterals[2], size=mid_hw),
        ],
    )
    mid = transformer_block(g, mid, m.transformer, np.asarray(m.pos_embed[...]))
    return [
        add(g, laterals[0], resize_bilinear(g, mid, size=laterals[0].shape[1:])),
        add(g, laterals[1], mid),
        add(g, laterals[2], resize_bilinear(g, mid, size=laterals[2].shape[1:])),
    ]
