"""NanoDet's GFLHead (Generalized Focal Loss head, the legacy heads' base).

Two towers of ``stacked_convs`` 3x3 ConvModules (GroupNorm by default, ReLU), shared by
every level: ``cls_convs`` feed a 3x3 ``gfl_cls`` conv (class logits), ``reg_convs`` a
3x3 ``gfl_reg`` conv (``4 * (reg_max + 1)`` distribution logits) whose output is
multiplied by a learnable ``Scale`` of its level. The output is
``[B, num_priors, num_classes + 4 * (reg_max + 1)]``, levels in stride order, row-major
inside a level, as NanoDet's ``flatten(start_dim=2)`` / ``permute`` order it.

Unlike NanoDet-Plus, the priors of this head sit at cell *centres*
(``assigners.atss.cell_centers``) and training assigns on grid cells of side
``octave_base_scale * stride`` (``assigners.atss.grid_cells``); the head keeps both
settings for the detector. NanoDet has no ``share_cls_reg`` for this head.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from nanodet_jax.models.heads.nanodet_plus_head import CLS_BIAS_INIT, Integral, flatten_levels
from nanodet_jax.models.layers import Conv2d, ConvModule, Scale, concat_channels, normal

DEFAULT_GN = {"type": "GN", "num_groups": 32, "requires_grad": True}


def check_legacy_options(conv_cfg: dict | None, ignore_iof_thr: float) -> None:
    # NanoDet accepts these, but no legacy config sets them and the padded-batch
    # pipeline has no ignored boxes; refusing beats silently training something else.
    if conv_cfg is not None:
        raise ValueError(f"conv_cfg={conv_cfg!r}: only plain convolutions are supported")
    if ignore_iof_thr > 0:
        raise ValueError("ignore_iof_thr > 0 needs ignored gt boxes, which are not supported")


class GFLTowers(nnx.Module):
    """The layers GFLHead and NanoDet-Plus's SimpleConvHead share, under NanoDet's names:
    ``cls_convs`` / ``reg_convs`` towers of 3x3 ConvModules (shared by every level), the
    ``gfl_cls`` / ``gfl_reg`` output convs and one ``scales`` entry per level."""

    def __init__(
        self,
        num_classes: int,
        input_channel: int,
        feat_channels: int,
        stacked_convs: int,
        strides: Sequence[int],
        norm_cfg: dict,
        activation: str,
        reg_max: int,
        *,
        rngs: nnx.Rngs,
    ):
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.strides = tuple(strides)

        def tower() -> nnx.List:
            return nnx.List(
                [
                    ConvModule(
                        input_channel if i == 0 else feat_channels,
                        feat_channels,
                        3,
                        stride=1,
                        padding=1,
                        norm_cfg=norm_cfg,
                        activation=activation,
                        kernel_init=normal(0.01),
                        rngs=rngs,
                    )
                    for i in range(stacked_convs)
                ]
            )

        self.cls_convs = tower()
        self.reg_convs = tower()
        self.gfl_cls = Conv2d(
            feat_channels,
            num_classes,
            3,
            padding=1,
            kernel_init=normal(0.01),
            bias_init=CLS_BIAS_INIT,
            rngs=rngs,
        )
        self.gfl_reg = Conv2d(
            feat_channels,
            4 * (reg_max + 1),
            3,
            padding=1,
            kernel_init=normal(0.01),
            bias_init=0.0,
            rngs=rngs,
        )
        self.scales = nnx.List([Scale(1.0) for _ in self.strides])

    def level_outputs(self, feats: Sequence[jax.Array]) -> list[tuple[jax.Array, jax.Array]]:
        """Per level: class logits and scaled distribution logits, NHWC."""
        outputs = []
        for x, scale in zip(feats, self.scales):
            cls_feat, reg_feat = x, x
            for conv in self.cls_convs:
                cls_feat = conv(cls_feat)
            for conv in self.reg_convs:
                reg_feat = conv(reg_feat)
            outputs.append((self.gfl_cls(cls_feat), scale(self.gfl_reg(reg_feat))))
        return outputs


class GFLHead(GFLTowers):
    """NanoDet's ``GFLHead`` layers (ReLU towers); the objective lives in
    ``losses/gfl_legacy.py``."""

    def __init__(
        self,
        num_classes: int,
        input_channel: int,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        octave_base_scale: float = 4,
        strides: Sequence[int] = (8, 16, 32),
        conv_cfg: dict | None = None,
        norm_cfg: dict | None = None,
        reg_max: int = 16,
        ignore_iof_thr: float = -1,
        scales_per_octave: int = 1,  # read by NanoDet's configs, used by no head
        *,
        rngs: nnx.Rngs,
    ):
        check_legacy_options(conv_cfg, ignore_iof_thr)
        super().__init__(
            num_classes,
            input_channel,
            feat_channels,
            stacked_convs,
            strides,
            dict(DEFAULT_GN if norm_cfg is None else norm_cfg),
            "ReLU",
            reg_max,
            rngs=rngs,
        )
        self.octave_base_scale = float(octave_base_scale)
        self.distribution_project = Integral(reg_max)

    def __call__(self, feats: Sequence[jax.Array]) -> jax.Array:
        return flatten_levels([concat_channels(o) for o in self.level_outputs(feats)])
