"""TAN: NanoDet-t's transformer attention neck.

Three 1x1 lateral ConvModules (BatchNorm + activation) bring the levels to
``out_channels``; the finest and coarsest are bilinearly resized to the middle level's
size and the three are concatenated along channels. A :class:`TransformerBlock`
(1x1 conv to ``out_channels``, a learned position embedding of ``feature_hw`` tokens,
``num_encoders`` encoder layers) attends over the middle level's positions, and its
output is resized back and added to every lateral. The position embedding has a fixed
number of tokens, so the middle level must be ``feature_hw`` (the input size / 16).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nanodet_jax.models.layers import ConvModule, concat_channels, random_normal
from nanodet_jax.models.resize import interpolate_bilinear
from nanodet_jax.models.transformer import TransformerBlock

# NanoDet's TAN init: Linear layers and the position embedding N(0, 0.02) (truncated at
# +-2 absolute: no truncation in practice), zero biases. Its convs get
# ``normal_init(m, 0.01)``, whose second parameter is the *mean*: N(0.01, 1), not
# N(0, 0.01); reproduced as NanoDet trains it.
CONV_MEAN, CONV_STD = 0.01, 1.0
LINEAR_STD = 0.02


def _conv_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    return (CONV_MEAN + random_normal(key, shape, CONV_STD)).astype(dtype)


class TAN(nnx.Module):
    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int,
        feature_hw: Sequence[int],
        num_heads: int,
        num_encoders: int,
        mlp_ratio: float,
        dropout_ratio: float,
        activation: str = "LeakyReLU",
        *,
        rngs: nnx.Rngs,
    ):
        if not isinstance(in_channels, (list, tuple)) or len(in_channels) != 3:
            raise ValueError(f"TAN takes exactly 3 input levels, got in_channels={in_channels!r}")
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.feature_hw = (int(feature_hw[0]), int(feature_hw[1]))
        self.lateral_convs = nnx.List(
            [
                ConvModule(
                    c,
                    out_channels,
                    1,
                    norm_cfg={"type": "BN"},
                    activation=activation,
                    kernel_init=_conv_init,
                    rngs=rngs,
                )
                for c in self.in_channels
            ]
        )
        self.transformer = TransformerBlock(
            out_channels * len(self.in_channels),
            out_channels,
            num_heads,
            num_encoders,
            mlp_ratio,
            dropout_ratio,
            activation=activation,
            conv_init=_conv_init,
            linear_std=LINEAR_STD,
            rngs=rngs,
        )
        tokens = self.feature_hw[0] * self.feature_hw[1]
        self.pos_embed = nnx.Param(
            random_normal(rngs.params(), (tokens, 1, out_channels), LINEAR_STD)
        )

    def __call__(self, inputs: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        if len(inputs) != 3:
            raise ValueError(f"TAN expects 3 inputs, got {len(inputs)}")
        laterals = [conv(x) for x, conv in zip(inputs, self.lateral_convs)]
        mid_hw = tuple(laterals[1].shape[1:3])
        if mid_hw != self.feature_hw:
            raise ValueError(
                f"TAN's middle level is {mid_hw[0]}x{mid_hw[1]} but its position embedding "
                f"was built for feature_hw {list(self.feature_hw)} (input size / 16)"
            )
        mid = concat_channels(
            [
                interpolate_bilinear(laterals[0], size=mid_hw),
                laterals[1],
                interpolate_bilinear(laterals[2], size=mid_hw),
            ]
        )
        mid = self.transformer(mid, self.pos_embed[...])
        return (
            laterals[0] + interpolate_bilinear(mid, size=tuple(laterals[0].shape[1:3])),
            laterals[1] + mid,
            laterals[2] + interpolate_bilinear(mid, size=tuple(laterals[2].shape[1:3])),
        )
