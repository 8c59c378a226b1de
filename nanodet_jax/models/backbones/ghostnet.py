"""GhostNet backbone (NanoDet's variant) and the Ghost modules GhostPAN also builds on.

GhostPAN (``models/necks/ghost_pan.py``) imports ``GhostModule`` / ``GhostBottleneck`` from
here, as NanoDet's GhostPAN imports them from its ``ghostnet.py``: one implementation of
each. GhostPAN keeps PyTorch's default conv initialisation; only :class:`GhostNet`
re-initialises its own layers (as NanoDet's ``_initialize_weights`` does).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nanodet_jax.models.layers import (
    Activation,
    Conv2d,
    Sequential,
    concat_channels,
    random_normal,
)
from nanodet_jax.models.norm import BatchNorm2d

# NanoDet's per-stage settings: (kernel, expansion width, out width, SE ratio, stride).
GHOSTNET_CFGS: tuple[tuple[tuple[int, int, int, float, int], ...], ...] = (
    ((3, 16, 16, 0, 1),),  # 0
    ((3, 48, 24, 0, 2),),  # 1
    ((3, 72, 24, 0, 1),),  # 2  1/4
    ((5, 72, 40, 0.25, 2),),  # 3
    ((5, 120, 40, 0.25, 1),),  # 4  1/8
    ((3, 240, 80, 0, 2),),  # 5
    (
        (3, 200, 80, 0, 1),
        (3, 184, 80, 0, 1),
        (3, 184, 80, 0, 1),
        (3, 480, 112, 0.25, 1),
        (3, 672, 112, 0.25, 1),
    ),  # 6  1/16
    ((5, 672, 160, 0.25, 2),),  # 7
    (
        (5, 960, 160, 0, 1),
        (5, 960, 160, 0.25, 1),
        (5, 960, 160, 0, 1),
        (5, 960, 160, 0.25, 1),
    ),  # 8
)  # stage 9 is a 1x1 ConvBnAct to the last expansion width (1/32)


def make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """Round ``v`` to a multiple of ``divisor``, never more than 10% below ``v``."""
    min_value = min_value or divisor
    rounded = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * v else rounded


def hard_sigmoid(x: jax.Array) -> jax.Array:
    """NanoDet's gate: relu6(x + 3) / 6 (== ONNX HardSigmoid with alpha 1/6, beta 0.5)."""
    return jax.nn.relu6(x + 3.0) / 6.0


class SqueezeExcite(nnx.Module):
    """Channel gate: global mean -> 1x1 reduce -> ReLU -> 1x1 expand -> hard sigmoid."""

    def __init__(self, in_chs: int, se_ratio: float = 0.25, divisor: int = 4, *, rngs: nnx.Rngs):
        reduced = make_divisible(in_chs * se_ratio, divisor)
        self.conv_reduce = Conv2d(in_chs, reduced, 1, bias=True, rngs=rngs)
        # NanoDet's GhostBottleneck builds its SE without passing the activation: always ReLU.
        self.act1 = Activation("ReLU")
        self.conv_expand = Conv2d(reduced, in_chs, 1, bias=True, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        s = self.conv_expand(self.act1(self.conv_reduce(s)))
        return x * hard_sigmoid(s)


class ConvBnAct(nnx.Module):
    BN_FOLDS = (("conv", "bn1"),)  # conv -> bn1 back to back (batchnorm_folding)

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        stride: int = 1,
        activation: str = "ReLU",
        *,
        rngs: nnx.Rngs,
    ):
        self.conv = Conv2d(
            in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False, rngs=rngs
        )
        self.bn1 = BatchNorm2d(out_chs)
        self.act1 = Activation(activation)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.act1(self.bn1(self.conv(x)))


class GhostModule(nnx.Module):
    """A 1x1 'primary' conv producing half the channels, a cheap depthwise conv the rest."""

    def __init__(
        self,
        inp: int,
        oup: int,
        kernel_size: int = 1,
        ratio: int = 2,
        dw_size: int = 3,
        stride: int = 1,
        activation: str | None = "ReLU",
        *,
        rngs: nnx.Rngs,
    ):
        init_channels = math.ceil(oup / ratio)
        new_channels = init_channels * (ratio - 1)

        def act() -> list[Activation]:
            # An absent activation is an empty nn.Sequential in NanoDet: no parameters either way.
            return [Activation(activation)] if activation else []

        self.primary_conv = Sequential(
            [
                Conv2d(
                    inp, init_channels, kernel_size, stride, kernel_size // 2, bias=False, rngs=rngs
                ),
                BatchNorm2d(init_channels),
                *act(),
            ]
        )
        self.cheap_operation = Sequential(
            [
                Conv2d(
                    init_channels,
                    new_channels,
                    dw_size,
                    1,
                    dw_size // 2,
                    groups=init_channels,
                    bias=False,
                    rngs=rngs,
                ),
                BatchNorm2d(new_channels),
                *act(),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x1 = self.primary_conv(x)
        return concat_channels([x1, self.cheap_operation(x1)])


class GhostBottleneck(nnx.Module):
    """Ghost bottleneck with optional squeeze-excitation (GhostPAN uses it without)."""

    BN_FOLDS = (("conv_dw", "bn_dw"),)

    def __init__(
        self,
        in_chs: int,
        mid_chs: int,
        out_chs: int,
        dw_kernel_size: int = 3,
        stride: int = 1,
        activation: str = "ReLU",
        se_ratio: float = 0.0,
        *,
        rngs: nnx.Rngs,
    ):
        self.stride = stride
        self.ghost1 = GhostModule(in_chs, mid_chs, activation=activation, rngs=rngs)
        if stride > 1:
            self.conv_dw = Conv2d(
                mid_chs,
                mid_chs,
                dw_kernel_size,
                stride,
                (dw_kernel_size - 1) // 2,
                groups=mid_chs,
                bias=False,
                rngs=rngs,
            )
            self.bn_dw = BatchNorm2d(mid_chs)
        has_se = se_ratio is not None and se_ratio > 0.0
        self.se = SqueezeExcite(mid_chs, se_ratio, rngs=rngs) if has_se else None
        self.ghost2 = GhostModule(mid_chs, out_chs, activation=None, rngs=rngs)
        if in_chs == out_chs and stride == 1:
            self.shortcut = Sequential([])
        else:
            self.shortcut = Sequential(
                [
                    Conv2d(
                        in_chs,
                        in_chs,
                        dw_kernel_size,
                        stride,
                        (dw_kernel_size - 1) // 2,
                        groups=in_chs,
                        bias=False,
                        rngs=rngs,
                    ),
                    BatchNorm2d(in_chs),
                    Conv2d(in_chs, out_chs, 1, bias=False, rngs=rngs),
                    BatchNorm2d(out_chs),
                ]
            )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.ghost1(x)
        if self.stride > 1:
            y = self.bn_dw(self.conv_dw(y))
        if self.se is not None:
            y = self.se(y)
        return self.ghost2(y) + self.shortcut(x)


class GhostNet(nnx.Module):
    """Returns the outputs of ``out_stages`` (indices into stages 0..9; default 1/8, 1/16, 1/32)."""

    BN_FOLDS = (("conv_stem", "bn1"),)

    def __init__(
        self,
        width_mult: float = 1.0,
        out_stages: Sequence[int] = (4, 6, 9),
        activation: str = "ReLU",
        # NanoDet's ImageNet switch, accepted so its configs build; construction reads no
        # files (the weights, if any, are loaded after the build).
        pretrain: bool | str | None = None,
        act: str | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        if not set(out_stages) <= set(range(10)):
            raise ValueError(f"out_stages must be a subset of 0..9, got {out_stages}")
        if act is not None:  # NanoDet's deprecated spelling, still honoured there
            warnings.warn("GhostNet: `act` is deprecated, use `activation`", stacklevel=2)
            activation = act
        self.width_mult = width_mult
        self.out_stages = tuple(out_stages)
        channels = make_divisible(16 * width_mult, 4)
        self.conv_stem = Conv2d(3, channels, 3, 2, 1, bias=False, rngs=rngs)
        self.bn1 = BatchNorm2d(channels)
        self.act1 = Activation(activation)
        stages, widths = [], []
        for cfg in GHOSTNET_CFGS:
            layers = []
            for k, exp_size, c, se_ratio, s in cfg:
                out = make_divisible(c * width_mult, 4)
                mid = make_divisible(exp_size * width_mult, 4)
                layers.append(
                    GhostBottleneck(channels, mid, out, k, s, activation, se_ratio, rngs=rngs)
                )
                channels = out
            stages.append(Sequential(layers))
            widths.append(channels)
        last = make_divisible(GHOSTNET_CFGS[-1][-1][1] * width_mult, 4)
        stages.append(Sequential([ConvBnAct(channels, last, 1, activation=activation, rngs=rngs)]))
        widths.append(last)
        self.blocks = Sequential(stages)
        self.out_channels = [widths[i] for i in self.out_stages]
        _initialize_weights(self, rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        x = self.act1(self.bn1(self.conv_stem(x)))
        outputs = []
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if i in self.out_stages:
                outputs.append(x)
        return tuple(outputs)


def _initialize_weights(model: GhostNet, rngs: nnx.Rngs) -> None:
    """NanoDet's GhostNet init: stem N(0, 0.01), other convs N(0, 1 / (cin / groups)), zero
    conv biases, BatchNorm weight 1 and bias 1e-4 (running statistics stay 0 / 1)."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Conv2d):
            shape = node.weight[...].shape  # HWIO: cin / groups is axis 2
            std = 0.01 if "conv_stem" in path else 1.0 / shape[2]
            node.weight[...] = random_normal(rngs.params(), shape, std)
            if node.bias is not None:
                node.bias[...] = jnp.zeros_like(node.bias[...])
        elif isinstance(node, BatchNorm2d):
            node.weight[...] = jnp.ones_like(node.weight[...])
            node.bias[...] = jnp.full_like(node.bias[...], 1e-4)
