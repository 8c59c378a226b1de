"""MobileNetV2 backbone (NanoDet's variant: seven stages, any of which can be an output)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import jax
from flax import nnx

from nanodet_jax.models.layers import Activation, Conv2d, Sequential, normal
from nanodet_jax.models.norm import BatchNorm2d

# Per stage: expansion t, output channels c, blocks n, first stride s (the paper's table).
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# NanoDet's init: every conv N(0, 0.001), BatchNorm at (1, 0).
_INIT = normal(0.001)


def conv_bn_act(
    cin: int, cout: int, kernel_size: int, stride: int, groups: int, activation: str, rngs: nnx.Rngs
) -> Sequential:
    """NanoDet's ``ConvBNReLU`` (an ``nn.Sequential``: keys ``.0.weight``, ``.1.running_mean``)."""
    pad = (kernel_size - 1) // 2
    conv = Conv2d(
        cin, cout, kernel_size, stride, pad, groups, bias=False, kernel_init=_INIT, rngs=rngs
    )
    return Sequential([conv, BatchNorm2d(cout), Activation(activation)])


class InvertedResidual(nnx.Module):
    def __init__(
        self,
        inp: int,
        oup: int,
        stride: int,
        expand_ratio: float,
        activation: str = "ReLU",
        *,
        rngs: nnx.Rngs,
    ):
        if stride not in (1, 2):
            raise ValueError(f"InvertedResidual stride must be 1 or 2, got {stride}")
        self.stride = stride
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = []
        if expand_ratio != 1:  # pointwise expansion
            layers.append(conv_bn_act(inp, hidden, 1, 1, 1, activation, rngs))
        layers += [
            conv_bn_act(hidden, hidden, 3, stride, hidden, activation, rngs),  # depthwise
            # linear pointwise projection: no activation after it
            Conv2d(hidden, oup, 1, bias=False, kernel_init=_INIT, rngs=rngs),
            BatchNorm2d(oup),
        ]
        self.conv = Sequential(layers)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nnx.Module):
    """Returns the outputs of ``out_stages`` (a subset of 0..6; strides 2, 4, 8, 16, 16, 32,
    32). Stage 6 ends with a 1x1 conv to ``last_channel`` (not scaled by ``width_mult``)."""

    def __init__(
        self,
        width_mult: float = 1.0,
        out_stages: Sequence[int] = (1, 2, 4, 6),
        last_channel: int = 1280,
        activation: str = "ReLU",
        act: str | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        if not set(out_stages) <= set(range(7)):
            raise ValueError(f"out_stages must be a subset of 0..6, got {out_stages}")
        if act is not None:  # NanoDet's deprecated spelling, honoured as it does
            warnings.warn("MobileNetV2: `act` is deprecated, use `activation`", stacklevel=2)
            activation = act
        self.width_mult = width_mult
        self.out_stages = tuple(out_stages)
        self.last_channel = last_channel
        self.activation = activation
        cin = int(32 * width_mult)
        self.first_layer = conv_bn_act(3, cin, 3, 2, 1, activation, rngs)
        widths = []
        for i, (t, c, n, s) in enumerate(INVERTED_RESIDUAL_SETTING):
            cout = int(c * width_mult)
            blocks = []
            for j in range(n):
                blocks.append(
                    InvertedResidual(cin, cout, s if j == 0 else 1, t, activation, rngs=rngs)
                )
                cin = cout
            if i == 6:
                blocks.append(conv_bn_act(cin, last_channel, 1, 1, 1, activation, rngs))
                cin = last_channel
            setattr(self, f"stage{i}", Sequential(blocks))
            widths.append(cin)
        self.out_channels = [widths[s] for s in self.out_stages]

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        x = self.first_layer(x)
        outputs = []
        for i in range(7):
            x = getattr(self, f"stage{i}")(x)
            if i in self.out_stages:
                outputs.append(x)
        return tuple(outputs)
