"""GhostPAN: NanoDet-Plus's path-aggregation neck built from Ghost bottlenecks.

The bottleneck is GhostNet's (``models/backbones/ghostnet.py``), without squeeze-excitation,
as NanoDet's GhostPAN imports it from its GhostNet backbone.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from nanodet_jax.models.backbones.ghostnet import GhostBottleneck
from nanodet_jax.models.layers import (
    ConvModule,
    DepthwiseConvModule,
    Sequential,
    concat_channels,
    upsample_bilinear_2x,
    upsample_nearest_2x,
)


class GhostBlocks(nnx.Module):
    """A stack of GhostBottlenecks with an optional 1x1 residual projection."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        expand: float = 1,
        kernel_size: int = 5,
        num_blocks: int = 1,
        use_res: bool = False,
        activation: str = "LeakyReLU",
        *,
        rngs: nnx.Rngs,
    ):
        self.use_res = use_res
        if use_res:
            self.reduce_conv = ConvModule(
                in_channels, out_channels, 1, activation=activation, rngs=rngs
            )
        # NanoDet feeds every block the stack's input width; only num_blocks == 1 is consistent.
        self.blocks = Sequential(
            [
                GhostBottleneck(
                    in_channels,
                    int(out_channels * expand),
                    out_channels,
                    dw_kernel_size=kernel_size,
                    activation=activation,
                    rngs=rngs,
                )
                for _ in range(num_blocks)
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.blocks(x)
        if self.use_res:
            out = out + self.reduce_conv(x)
        return out


class GhostPAN(nnx.Module):
    """Top-down then bottom-up aggregation of backbone features, plus extra coarser levels."""

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int,
        use_depthwise: bool = False,
        kernel_size: int = 5,
        expand: float = 1,
        num_blocks: int = 1,
        use_res: bool = False,
        num_extra_level: int = 0,
        upsample_cfg: dict | None = None,
        norm_cfg: dict | None = None,
        activation: str = "LeakyReLU",
        *,
        rngs: nnx.Rngs,
    ):
        upsample_cfg = dict(upsample_cfg or {"scale_factor": 2, "mode": "bilinear"})
        norm_cfg = dict(norm_cfg or {"type": "BN"})
        if (
            upsample_cfg.get("scale_factor") != 2
            or upsample_cfg.get("mode") not in ("bilinear", "nearest")
            or upsample_cfg.get("align_corners")
        ):
            raise ValueError(
                f"unsupported upsample_cfg {upsample_cfg}: use scale_factor=2, "
                "mode bilinear (align_corners False) or nearest"
            )
        self.upsample_mode = upsample_cfg["mode"]
        self.in_channels = list(in_channels)
        conv = DepthwiseConvModule if use_depthwise else ConvModule
        n = len(self.in_channels)

        def blocks():
            return GhostBlocks(
                out_channels * 2,
                out_channels,
                expand,
                kernel_size=kernel_size,
                num_blocks=num_blocks,
                use_res=use_res,
                activation=activation,
                rngs=rngs,
            )

        def down():
            return conv(
                out_channels,
                out_channels,
                kernel_size,
                stride=2,
                padding=kernel_size // 2,
                norm_cfg=norm_cfg,
                activation=activation,
                rngs=rngs,
            )

        self.reduce_layers = nnx.List(
            [
                ConvModule(c, out_channels, 1, norm_cfg=norm_cfg, activation=activation, rngs=rngs)
                for c in self.in_channels
            ]
        )
        self.top_down_blocks = nnx.List([blocks() for _ in range(n - 1)])
        self.downsamples = nnx.List([down() for _ in range(n - 1)])
        self.bottom_up_blocks = nnx.List([blocks() for _ in range(n - 1)])
        self.extra_lvl_in_conv = nnx.List([down() for _ in range(num_extra_level)])
        self.extra_lvl_out_conv = nnx.List([down() for _ in range(num_extra_level)])

    def _upsample(self, x: jax.Array) -> jax.Array:
        return (
            upsample_bilinear_2x(x) if self.upsample_mode == "bilinear" else upsample_nearest_2x(x)
        )

    def __call__(self, inputs: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"GhostPAN expects {len(self.in_channels)} inputs, got {len(inputs)}")
        feats = [reduce(x) for x, reduce in zip(inputs, self.reduce_layers)]
        # Top-down: start at the coarsest level, upsample and merge with the next finer one.
        inner = [feats[-1]]
        for idx in range(len(feats) - 1, 0, -1):
            block = self.top_down_blocks[len(feats) - 1 - idx]
            merged = concat_channels([self._upsample(inner[0]), feats[idx - 1]])
            inner.insert(0, block(merged))
        # Bottom-up: downsample and merge with the next coarser top-down output.
        outs = [inner[0]]
        for idx in range(len(feats) - 1):
            down = self.downsamples[idx](outs[-1])
            outs.append(self.bottom_up_blocks[idx](concat_channels([down, inner[idx + 1]])))
        for extra_in, extra_out in zip(self.extra_lvl_in_conv, self.extra_lvl_out_conv):
            outs.append(extra_in(feats[-1]) + extra_out(outs[-1]))
        return tuple(outs)
