"""CustomCspNet: NanoDet-g's backbone, a list of Conv / MaxPool / CspBlock stages.

``net_cfg`` is NanoDet's list format, one entry per stage::

    ["Conv", in_channels, out_channels, kernel_size, stride]
    ["MaxPool", kernel_size, stride]
    ["CspBlock", in_channels, num_res, kernel_size, stride]   # out = 2 * in_channels

Every convolution is a ConvModule (conv, BatchNorm, activation) with "same" padding
``(k - 1) // 2``; NanoDet initialises them with Kaiming-normal (fan_out, gain sqrt 2).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from nanodet_jax.models.layers import (
    ConvModule,
    Sequential,
    concat_channels,
    kaiming_normal,
    max_pool_3x3_s2,
)

DEFAULT_NORM = {"type": "BN", "requires_grad": True}


def _conv(cin, cout, k, stride, norm_cfg, activation, rngs) -> ConvModule:
    return ConvModule(
        cin,
        cout,
        k,
        stride,
        (k - 1) // 2,
        norm_cfg=norm_cfg,
        activation=activation,
        kernel_init=kaiming_normal("fan_out"),
        rngs=rngs,
    )


class MaxPool2d(nnx.Module):
    """``nn.MaxPool2d(k, stride, padding=(k - 1) // 2)`` on NHWC (padding never wins)."""

    def __init__(self, kernel_size: int, stride: int):
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = (kernel_size - 1) // 2

    def __call__(self, x: jax.Array) -> jax.Array:
        if (self.kernel_size, self.stride) == (3, 2):
            return max_pool_3x3_s2(x)  # PyTorch's gradient tie-breaking, and faster on CPU
        k, s, p = self.kernel_size, self.stride, self.padding
        return lax.reduce_window(
            x, -jnp.inf, lax.max, (1, k, k, 1), (1, s, s, 1), ((0, 0), (p, p), (p, p), (0, 0))
        )


class TinyResBlock(nnx.Module):
    """Halve the width, one more conv; concatenate both halves (or add and restore width)."""

    def __init__(
        self,
        in_channels: int,
        kernel_size: int,
        norm_cfg: dict,
        activation: str,
        res_type: str = "concat",
        *,
        rngs: nnx.Rngs,
    ):
        if in_channels % 2:
            raise ValueError(f"TinyResBlock needs an even width, got {in_channels}")
        if res_type not in ("concat", "add"):
            raise ValueError(f"res_type must be 'concat' or 'add', got {res_type!r}")
        self.res_type = res_type
        half = in_channels // 2
        self.in_conv = _conv(in_channels, half, kernel_size, 1, norm_cfg, activation, rngs)
        self.mid_conv = _conv(half, half, kernel_size, 1, norm_cfg, activation, rngs)
        if res_type == "add":
            self.out_conv = _conv(half, in_channels, kernel_size, 1, norm_cfg, activation, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.in_conv(x)
        x1 = self.mid_conv(x)
        if self.res_type == "add":
            return self.out_conv(x + x1)
        return concat_channels([x1, x])


class CspBlock(nnx.Module):
    """Strided conv, then [res blocks -> conv] concatenated with its input (2x the width)."""

    def __init__(
        self,
        in_channels: int,
        num_res: int,
        kernel_size: int = 3,
        stride: int = 0,
        norm_cfg: dict | None = None,
        activation: str = "LeakyReLU",
        *,
        rngs: nnx.Rngs,
    ):
        if in_channels % 2:
            raise ValueError(f"CspBlock needs an even width, got {in_channels}")
        norm_cfg = norm_cfg or DEFAULT_NORM
        c, k = in_channels, kernel_size
        self.in_conv = _conv(c, c, k, stride, norm_cfg, activation, rngs)
        self.res_blocks = Sequential(
            [TinyResBlock(c, k, norm_cfg, activation, rngs=rngs) for _ in range(num_res)]
        )
        self.res_out_conv = _conv(c, c, k, 1, norm_cfg, activation, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.in_conv(x)
        return concat_channels([self.res_out_conv(self.res_blocks(x)), x])


class CustomCspNet(nnx.Module):
    """Returns the outputs of ``out_stages`` (indices into ``net_cfg``)."""

    def __init__(
        self,
        net_cfg: Sequence[Sequence],
        out_stages: Sequence[int],
        norm_cfg: dict | None = None,
        activation: str = "LeakyReLU",
        *,
        rngs: nnx.Rngs,
    ):
        if not set(out_stages) <= set(range(len(net_cfg))):
            raise ValueError(f"out_stages {out_stages} must index net_cfg ({len(net_cfg)} stages)")
        norm_cfg = dict(norm_cfg or DEFAULT_NORM)
        self.out_stages = tuple(out_stages)
        stages, widths, width = [], [], 3
        for cfg in net_cfg:
            kind, *args = cfg
            if kind == "Conv":
                cin, width, k, s = args
                stages.append(_conv(cin, width, k, s, norm_cfg, activation, rngs))
            elif kind == "CspBlock":
                cin, num_res, k, s = args
                stages.append(CspBlock(cin, num_res, k, s, norm_cfg, activation, rngs=rngs))
                width = 2 * cin
            elif kind == "MaxPool":
                stages.append(MaxPool2d(*args))
            else:
                raise ValueError(f"unknown CustomCspNet stage {kind!r} (Conv, CspBlock, MaxPool)")
            widths.append(width)
        self.stages = nnx.List(stages)
        self.out_channels = [widths[i] for i in self.out_stages]

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        outputs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_stages:
                outputs.append(x)
        return tuple(outputs)
