"""The auxiliary head of NanoDet-Plus's Assign Guidance Module (NanoDet's SimpleConvHead).

Same output layout as ``NanoDetPlusHead``: ``[B, num_priors, num_classes + 4 * (reg_max + 1)]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nanodet_jax.models.heads.nanodet_plus_head import CLS_BIAS_INIT, flatten_levels
from nanodet_jax.models.layers import Conv2d, ConvModule, Scale, normal
from nanodet_jax.precision import at_least_f32


class SimpleConvHead(nnx.Module):
    """Separate classification and regression conv towers shared across levels (GroupNorm)."""

    def __init__(
        self,
        num_classes: int,
        input_channel: int,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        strides: Sequence[int] = (8, 16, 32),
        conv_cfg: dict | None = None,
        norm_cfg: dict | None = None,
        activation: str = "LeakyReLU",
        reg_max: int = 16,
        *,
        rngs: nnx.Rngs,
    ):
        if conv_cfg is not None:
            raise ValueError("SimpleConvHead: conv_cfg is not supported")
        norm_cfg = dict(norm_cfg or {"type": "GN", "num_groups": 32})
        norm_cfg.pop("requires_grad", None)
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.strides = tuple(strides)

        def tower():
            return nnx.List(
                [
                    ConvModule(
                        input_channel if i == 0 else feat_channels,
                        feat_channels,
                        3,
                        1,
                        1,
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

    def __call__(self, feats: Sequence[jax.Array]) -> jax.Array:
        outputs = []
        for x, scale in zip(feats, self.scales):
            cls_feat, reg_feat = x, x
            for conv in self.cls_convs:
                cls_feat = conv(cls_feat)
            for conv in self.reg_convs:
                reg_feat = conv(reg_feat)
            cls_score = self.gfl_cls(cls_feat)
            bbox_pred = at_least_f32(scale(self.gfl_reg(reg_feat)))
            outputs.append(jnp.concatenate([at_least_f32(cls_score), bbox_pred], axis=-1))
        return flatten_levels(outputs)
