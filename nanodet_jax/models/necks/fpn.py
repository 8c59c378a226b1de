"""FPN: NanoDet's legacy feature pyramid (1x1 lateral convs and a top-down sum).

NanoDet's FPN has no 3x3 output convs: each output level is its lateral plus the
bilinearly upsampled (scale factor 2) coarser level, computed from the coarsest
level down.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nanodet_jax.models.layers import ConvModule, Initializer, random_uniform
from nanodet_jax.models.resize import interpolate_bilinear


def xavier_uniform(gain: float = 1.0) -> Initializer:
    """``nn.init.xavier_uniform_`` for an HWIO kernel: U(+-gain * sqrt(6 / (fan_in + fan_out)))."""

    def init(key, shape, dtype=jnp.float32):
        kh, kw, cin, cout = shape
        fan_in, fan_out = cin * kh * kw, cout * kh * kw
        bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
        return random_uniform(key, shape, bound).astype(dtype)

    return init


def pyramid_levels(
    num_ins: int, num_outs: int, start_level: int, end_level: int
) -> tuple[int, int]:
    """(first, one past last) backbone level of the pyramid, with NanoDet's argument rules."""
    if not 0 <= start_level < num_ins:
        raise ValueError(f"start_level {start_level} is not one of the {num_ins} input levels")
    if end_level == -1:
        if num_outs < num_ins - start_level:
            raise ValueError(
                f"num_outs {num_outs} < the {num_ins - start_level} levels from start_level "
                f"{start_level} on"
            )
        return start_level, num_ins
    if not start_level < end_level <= num_ins:
        raise ValueError(f"end_level {end_level} must be in ({start_level}, {num_ins}] or -1")
    if num_outs != end_level - start_level:
        raise ValueError(f"num_outs {num_outs} must be end_level - start_level with end_level set")
    return start_level, end_level


class FPN(nnx.Module):
    """NanoDet's ``FPN``; outputs one map per used level (start_level .. end_level).

    As in NanoDet, ``num_outs`` larger than the number of used levels adds no extra
    levels, and ``conv_cfg`` has no effect (NanoDet's ConvModule always builds a plain
    ``nn.Conv2d``); ``norm_cfg`` and ``activation`` go to the lateral ConvModules.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int,
        num_outs: int,
        start_level: int = 0,
        end_level: int = -1,
        conv_cfg: dict | None = None,
        norm_cfg: dict | None = None,
        activation: str | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        if not isinstance(in_channels, (list, tuple)):
            raise ValueError(f"in_channels must be a list of ints, got {in_channels!r}")
        if conv_cfg is not None and not isinstance(conv_cfg, dict):
            raise ValueError(f"conv_cfg must be None or a dict, got {conv_cfg!r}")
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.num_outs = num_outs
        self.start_level, self.backbone_end_level = pyramid_levels(
            len(self.in_channels), num_outs, start_level, end_level
        )
        # NanoDet re-initialises every conv with xavier_uniform (bias 0) after ConvModule's
        # kaiming init.
        self.lateral_convs = nnx.List(
            [
                ConvModule(
                    self.in_channels[i],
                    out_channels,
                    1,
                    norm_cfg=norm_cfg,
                    activation=activation,
                    kernel_init=xavier_uniform(),
                    rngs=rngs,
                )
                for i in range(self.start_level, self.backbone_end_level)
            ]
        )

    def laterals(self, inputs: Sequence[jax.Array]) -> list[jax.Array]:
        """Lateral convs of the used levels, then the top-down path (coarsest first)."""
        if len(inputs) != len(self.in_channels):
            raise ValueError(
                f"{type(self).__name__} expects {len(self.in_channels)} inputs, got {len(inputs)}"
            )
        laterals = [conv(inputs[i + self.start_level]) for i, conv in enumerate(self.lateral_convs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + interpolate_bilinear(laterals[i], scale_factor=2)
        return laterals

    def __call__(self, inputs: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        return tuple(self.laterals(inputs))
