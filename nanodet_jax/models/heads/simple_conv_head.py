"""The auxiliary head of NanoDet-Plus's Assign Guidance Module (NanoDet's SimpleConvHead).

Same output layout as ``NanoDetPlusHead``: ``[B, num_priors, num_classes + 4 * (reg_max + 1)]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nanodet_jax.models.heads.gfl_head import GFLTowers
from nanodet_jax.models.heads.nanodet_plus_head import flatten_levels
from nanodet_jax.precision import at_least_f32


class SimpleConvHead(GFLTowers):
    """GFLHead's towers (GroupNorm, LeakyReLU by default) as NanoDet-Plus's aux head: no
    legacy options, outputs concatenated in (at least) float32."""

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
        super().__init__(
            num_classes,
            input_channel,
            feat_channels,
            stacked_convs,
            strides,
            norm_cfg,
            activation,
            reg_max,
            rngs=rngs,
        )

    def __call__(self, feats: Sequence[jax.Array]) -> jax.Array:
        return flatten_levels(
            [
                jnp.concatenate([at_least_f32(cls), at_least_f32(reg)], axis=-1)
                for cls, reg in self.level_outputs(feats)
            ]
        )
