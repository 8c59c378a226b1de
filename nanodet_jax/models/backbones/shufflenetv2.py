"""ShuffleNetV2 backbone (NanoDet's variant: configurable activation and output stages)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nanodet_jax.models.layers import (
    Activation,
    Conv2d,
    Sequential,
    max_pool_3x3_s2,
    random_normal,
)
from nanodet_jax.models.norm import BatchNorm2d

STAGE_OUT_CHANNELS = {
    "0.5x": [24, 48, 96, 192, 1024],
    "1.0x": [24, 116, 232, 464, 1024],
    "1.5x": [24, 176, 352, 704, 1024],
    "2.0x": [24, 244, 488, 976, 2048],
}
STAGE_REPEATS = (4, 8, 4)


def _shufflenet_init(key, shape, dtype=jnp.float32):
    # NanoDet's ShuffleNetV2 init: N(0, 1 / weight.shape[1]) in OIHW, i.e. 1 / (cin / groups).
    return random_normal(key, shape, 1.0 / shape[2]).astype(dtype)


def _bn(channels: int) -> BatchNorm2d:
    bn = BatchNorm2d(channels)
    bn.bias[...] = jnp.full((channels,), 1e-4, jnp.float32)  # NanoDet sets BN bias to 1e-4
    return bn


class ShuffleV2Block(nnx.Module):
    # Stride 1: branch2 takes the second half of the input's channels; once folded, its
    # first (fused 1x1) convolution may read them in place (``input_channel_offset``),
    # and its last may store the channel shuffle of the block's output
    # (``Sequential.interleaved_with``).
    SPLIT_INPUT_BRANCH = "branch2"
    INTERLEAVED_BRANCH = "branch2"

    def __init__(self, inp: int, oup: int, stride: int, activation: str, *, rngs: nnx.Rngs):
        if not 1 <= stride <= 3:
            raise ValueError(f"illegal stride {stride}")
        branch = oup // 2
        if stride == 1 and inp != branch * 2:
            raise ValueError(f"stride-1 ShuffleV2Block needs inp == oup ({inp} != {oup})")
        self.stride = stride

        def conv(cin, cout, k, s=1, p=0, groups=1):
            return Conv2d(
                cin, cout, k, s, p, groups, bias=False, kernel_init=_shufflenet_init, rngs=rngs
            )

        if stride > 1:
            self.branch1 = Sequential(
                [
                    conv(inp, inp, 3, stride, 1, groups=inp),
                    _bn(inp),
                    conv(inp, branch, 1),
                    _bn(branch),
                    Activation(activation),
                ]
            )
        else:
            self.branch1 = Sequential([])
        self.branch2 = Sequential(
            [
                conv(inp if stride > 1 else branch, branch, 1),
                _bn(branch),
                Activation(activation),
                conv(branch, branch, 3, stride, 1, groups=branch),
                _bn(branch),
                conv(branch, branch, 1),
                _bn(branch),
                Activation(activation),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.stride == 1:
            half = x.shape[-1] // 2
            x2 = x if self.branch2[0].input_channel_offset == half else x[..., half:]
            return self.branch2.interleaved_with(x, x2)  # x's first half passes through
        return self.branch2.interleaved_with(self.branch1(x), x)


class ShuffleNetV2(nnx.Module):
    """Returns the feature maps of ``out_stages`` (a subset of 2, 3, 4), strides 8/16/32."""

    # BatchNorm folding may hand the max pool after conv1 to its fused stem kernel.
    STEM_MAX_POOL = "conv1"

    def __init__(
        self,
        model_size: str = "1.5x",
        out_stages: Sequence[int] = (2, 3, 4),
        with_last_conv: bool = False,
        kernal_size: int = 3,  # NanoDet's (misspelt) argument; the blocks always use 3x3
        activation: str = "ReLU",
        # NanoDet's ImageNet switch, accepted so its configs build; the weights are loaded
        # after the build by nanodet_jax.models.backbones.pretrained (construction reads no files).
        pretrain: bool | str | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        if model_size not in STAGE_OUT_CHANNELS:
            raise ValueError(f"model_size must be one of {list(STAGE_OUT_CHANNELS)}")
        if not set(out_stages) <= {2, 3, 4}:
            raise ValueError(f"out_stages must be a subset of (2, 3, 4), got {out_stages}")
        if with_last_conv:
            raise NotImplementedError("with_last_conv=True is not used by NanoDet-Plus")
        self.out_stages = tuple(out_stages)
        self.model_size = model_size  # which torchvision checkpoint fits (pretrained.py)
        channels = STAGE_OUT_CHANNELS[model_size]
        self.conv1 = Sequential(
            [
                Conv2d(
                    3, channels[0], 3, 2, 1, bias=False, kernel_init=_shufflenet_init, rngs=rngs
                ),
                _bn(channels[0]),
                Activation(activation),
            ]
        )
        cin = channels[0]
        for name, repeats, cout in zip(
            ("stage2", "stage3", "stage4"), STAGE_REPEATS, channels[1:4]
        ):
            blocks = [ShuffleV2Block(cin, cout, 2, activation, rngs=rngs)]
            blocks += [
                ShuffleV2Block(cout, cout, 1, activation, rngs=rngs) for _ in range(repeats - 1)
            ]
            setattr(self, name, Sequential(blocks))
            cin = cout
        self.out_channels = [channels[s - 1] for s in self.out_stages]

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        x = self.conv1(x)
        if not self.conv1[0].max_pool:  # else pooled by the (folded, fused) convolution
            x = max_pool_3x3_s2(x)
        outputs = []
        for i, stage in ((2, self.stage2), (3, self.stage3), (4, self.stage4)):
            x = stage(x)
            if i in self.out_stages:
                outputs.append(x)
        return tuple(outputs)
