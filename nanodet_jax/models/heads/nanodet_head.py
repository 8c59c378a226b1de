"""NanoDet's legacy NanoDetHead (NanoDet-m and co.): GFLHead's outputs and objective
with light, per-level towers.

Each level has its own ``stacked_convs`` 3x3 tower of ConvModules (``conv_type="Conv"``)
or DepthwiseConvModules (``"DWConv"``), BatchNorm and LeakyReLU by default, and 1x1
``gfl_cls`` / ``gfl_reg`` convs. With ``share_cls_reg`` the class tower alone feeds a
``gfl_cls`` that predicts classes and distributions together; NanoDet still builds
(and saves) the unused ``gfl_reg`` convs then, and so does this module, so checkpoints
load. There is no ``Scale`` and no ``kernel_size`` option (NanoDet's towers are 3x3).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from nanodet_jax.models.heads.gfl_head import check_legacy_options
from nanodet_jax.models.heads.nanodet_plus_head import CLS_BIAS_INIT, Integral, flatten_levels
from nanodet_jax.models.layers import (
    Conv2d,
    ConvModule,
    DepthwiseConvModule,
    concat_channels,
    normal,
)


class NanoDetHead(nnx.Module):
    """NanoDet's ``NanoDetHead`` layers; output ``[B, P, num_classes + 4 * (reg_max + 1)]``."""

    def __init__(
        self,
        num_classes: int,
        input_channel: int,
        stacked_convs: int = 2,
        octave_base_scale: float = 5,
        conv_type: str = "DWConv",
        conv_cfg: dict | None = None,
        norm_cfg: dict | None = None,
        reg_max: int = 16,
        share_cls_reg: bool = False,
        activation: str = "LeakyReLU",
        feat_channels: int = 256,
        strides: Sequence[int] = (8, 16, 32),
        ignore_iof_thr: float = -1,
        scales_per_octave: int = 1,  # read by NanoDet's configs, used by no head
        *,
        rngs: nnx.Rngs,
    ):
        check_legacy_options(conv_cfg, ignore_iof_thr)
        if conv_type not in ("Conv", "DWConv"):
            raise ValueError(f"conv_type={conv_type!r}: use Conv or DWConv")
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.strides = tuple(strides)
        self.octave_base_scale = float(octave_base_scale)
        self.share_cls_reg = bool(share_cls_reg)
        # NanoDetHead's default is BN; an explicit None means plain convs with a bias.
        norm_cfg = {"type": "BN"} if norm_cfg is None else dict(norm_cfg)
        self.distribution_project = Integral(reg_max)
        module = ConvModule if conv_type == "Conv" else DepthwiseConvModule

        def tower() -> nnx.List:
            return nnx.List(
                [
                    module(
                        input_channel if i == 0 else feat_channels,
                        feat_channels,
                        3,
                        stride=1,
                        padding=1,
                        norm_cfg=norm_cfg,
                        bias=False,
                        activation=activation,
                        kernel_init=normal(0.01),
                        rngs=rngs,
                    )
                    for i in range(stacked_convs)
                ]
            )

        self.cls_convs = nnx.List([tower() for _ in self.strides])
        self.reg_convs = nnx.List(
            [nnx.List([]) if self.share_cls_reg else tower() for _ in self.strides]
        )
        reg_channels = 4 * (reg_max + 1)
        cls_channels = num_classes + (reg_channels if self.share_cls_reg else 0)
        self.gfl_cls = nnx.List(
            [
                Conv2d(
                    feat_channels,
                    cls_channels,
                    1,
                    kernel_init=normal(0.01),
                    bias_init=CLS_BIAS_INIT,
                    rngs=rngs,
                )
                for _ in self.strides
            ]
        )
        self.gfl_reg = nnx.List(
            [
                Conv2d(
                    feat_channels,
                    reg_channels,
                    1,
                    kernel_init=normal(0.01),
                    bias_init=0.0,
                    rngs=rngs,
                )
                for _ in self.strides
            ]
        )

    def level_outputs(self, feats: Sequence[jax.Array]) -> list[tuple[jax.Array, jax.Array]]:
        """Per level: class logits and distribution logits, NHWC."""
        outputs = []
        for x, cls_convs, reg_convs, gfl_cls, gfl_reg in zip(
            feats, self.cls_convs, self.reg_convs, self.gfl_cls, self.gfl_reg
        ):
            cls_feat, reg_feat = x, x
            for conv in cls_convs:
                cls_feat = conv(cls_feat)
            for conv in reg_convs:
                reg_feat = conv(reg_feat)
            if self.share_cls_reg:
                out = gfl_cls(cls_feat)
                outputs.append((out[..., : self.num_classes], out[..., self.num_classes :]))
            else:
                outputs.append((gfl_cls(cls_feat), gfl_reg(reg_feat)))
        return outputs

    def __call__(self, feats: Sequence[jax.Array]) -> jax.Array:
        return flatten_levels([concat_channels(o) for o in self.level_outputs(feats)])
