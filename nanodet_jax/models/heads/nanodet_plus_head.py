"""NanoDet-Plus detection head.

It returns the raw prediction ``[B, num_priors, num_classes + 4 * (reg_max + 1)]``:
class logits then, per box side, ``reg_max + 1`` distribution logits. Priors are
ordered level by level (stride 8 first) and row-major inside a level, as NanoDet's
``flatten(start_dim=2)`` orders them.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nanodet_jax.models.layers import Buffer, Conv2d, ConvModule, DepthwiseConvModule, normal

CLS_BIAS_INIT = -4.595  # sigmoid(-4.595) ~= 0.01: start with confident background


def flatten_levels(per_level: Sequence[jax.Array]) -> jax.Array:
    return jnp.concatenate([x.reshape(x.shape[0], -1, x.shape[-1]) for x in per_level], axis=1)


class Integral(nnx.Module):
    """Holds NanoDet's fixed ``project`` buffer [0, 1, ..., reg_max] (part of the state_dict)."""

    def __init__(self, reg_max: int):
        self.project = Buffer(jnp.linspace(0, reg_max, reg_max + 1, dtype=jnp.float32))


class NanoDetPlusHead(nnx.Module):
    """Per-level stacks of (depthwise) conv modules followed by one 1x1 ``gfl_cls`` conv."""

    def __init__(
        self,
        num_classes: int,
        input_channel: int,
        feat_channels: int = 96,
        stacked_convs: int = 2,
        kernel_size: int = 5,
        strides: Sequence[int] = (8, 16, 32),
        conv_type: str = "DWConv",
        norm_cfg: dict | None = None,
        reg_max: int = 7,
        activation: str = "LeakyReLU",
        *,
        rngs: nnx.Rngs,
    ):
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.strides = tuple(strides)
        norm_cfg = dict(norm_cfg or {"type": "BN"})
        module = ConvModule if conv_type == "Conv" else DepthwiseConvModule
        self.distribution_project = Integral(reg_max)
        self.cls_convs = nnx.List(
            [
                nnx.List(
                    [
                        module(
                            input_channel if i == 0 else feat_channels,
                            feat_channels,
                            kernel_size,
                            stride=1,
                            padding=kernel_size // 2,
                            norm_cfg=norm_cfg,
                            bias=False,
                            activation=activation,
                            kernel_init=normal(0.01),
                            rngs=rngs,
                        )
                        for i in range(stacked_convs)
                    ]
                )
                for _ in self.strides
            ]
        )
        out_channels = num_classes + 4 * (reg_max + 1)
        self.gfl_cls = nnx.List(
            [
                Conv2d(
                    feat_channels,
                    out_channels,
                    1,
                    kernel_init=normal(0.01),
                    bias_init=CLS_BIAS_INIT,
                    rngs=rngs,
                )
                for _ in self.strides
            ]
        )

    def __call__(self, feats: Sequence[jax.Array]) -> jax.Array:
        outputs = []
        for feat, convs, gfl_cls in zip(feats, self.cls_convs, self.gfl_cls):
            for conv in convs:
                feat = conv(feat)
            outputs.append(gfl_cls(feat))
        return flatten_levels(outputs)
