"""ResNet backbone (NanoDet's variant: configurable activation and output stages).

Depths 18/34 use BasicBlock, 50/101/152 Bottleneck, as torchvision's ImageNet models do;
the state_dict keys are torchvision's (``layer1.0.conv1.weight``, ``layer2.0.downsample.0``
...), which is why NanoDet can load those checkpoints (see ``pretrained.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from nanodet_jax.models.layers import (
    Activation,
    Conv2d,
    Sequential,
    kaiming_normal,
    max_pool_3x3_s2,
)
from nanodet_jax.models.norm import BatchNorm2d


def _conv(cin: int, cout: int, k: int, stride: int, padding: int, rngs: nnx.Rngs) -> Conv2d:
    # NanoDet's random init (pretrain=False): kaiming_normal(fan_out) with a=0, whose gain is
    # sqrt(2) for both its "relu" and "leaky_relu" choices; BatchNorm stays at (1, 0).
    return Conv2d(
        cin, cout, k, stride, padding, bias=False, kernel_init=kaiming_normal(), rngs=rngs
    )


class BasicBlock(nnx.Module):
    BN_FOLDS = (("conv1", "bn1"), ("conv2", "bn2"))  # see batchnorm_folding
    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Sequential | None = None,
        activation: str = "ReLU",
        *,
        rngs: nnx.Rngs,
    ):
        self.conv1 = _conv(inplanes, planes, 3, stride, 1, rngs)
        self.bn1 = BatchNorm2d(planes)
        self.act = Activation(activation)
        self.conv2 = _conv(planes, planes, 3, 1, 1, rngs)
        self.bn2 = BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.act(out + residual)


class Bottleneck(nnx.Module):
    BN_FOLDS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Sequential | None = None,
        activation: str = "ReLU",
        *,
        rngs: nnx.Rngs,
    ):
        self.conv1 = _conv(inplanes, planes, 1, 1, 0, rngs)
        self.bn1 = BatchNorm2d(planes)
        # The stride sits on the 3x3 conv (torchvision's "ResNet v1.5"), as in NanoDet.
        self.conv2 = _conv(planes, planes, 3, stride, 1, rngs)
        self.bn2 = BatchNorm2d(planes)
        self.conv3 = _conv(planes, planes * self.expansion, 1, 1, 0, rngs)
        self.bn3 = BatchNorm2d(planes * self.expansion)
        self.act = Activation(activation)
        self.downsample = downsample
        self.stride = stride

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.act(out + residual)


class ResNet(nnx.Module):
    """Returns the feature maps of ``out_stages`` (a subset of 1..4), strides 4/8/16/32."""

    BN_FOLDS = (("conv1", "bn1"),)

    # depth -> (block type, blocks per stage). A subclass may override it (the parity
    # fixture checks a shallow Bottleneck ResNet this way, as it does with NanoDet's class).
    resnet_spec: dict[int, tuple[type, tuple[int, ...]]] = {
        18: (BasicBlock, (2, 2, 2, 2)),
        34: (BasicBlock, (3, 4, 6, 3)),
        50: (Bottleneck, (3, 4, 6, 3)),
        101: (Bottleneck, (3, 4, 23, 3)),
        152: (Bottleneck, (3, 8, 36, 3)),
    }

    def __init__(
        self,
        depth: int,
        out_stages: Sequence[int] = (1, 2, 3, 4),
        activation: str = "ReLU",
        # NanoDet's ImageNet switch (its default True downloads torchvision's weights);
        # accepted so its configs build, loaded after the build by pretrained.py.
        pretrain: bool | str | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        if depth not in self.resnet_spec:
            raise ValueError(
                f"invalid resnet depth {depth}; choose one of {list(self.resnet_spec)}"
            )
        if not set(out_stages) <= {1, 2, 3, 4}:
            raise ValueError(f"out_stages must be a subset of (1, 2, 3, 4), got {out_stages}")
        self.depth = depth  # which torchvision checkpoint fits (pretrained.py)
        self.out_stages = tuple(out_stages)
        self.activation = activation
        block, layers = self.resnet_spec[depth]
        self.conv1 = _conv(3, 64, 7, 2, 3, rngs)
        self.bn1 = BatchNorm2d(64)
        self.act = Activation(activation)
        inplanes = 64
        widths = []
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            layer, inplanes = self._make_layer(block, inplanes, planes, blocks, stride, rngs)
            setattr(self, f"layer{i + 1}", layer)
            widths.append(inplanes)
        self.out_channels = [widths[s - 1] for s in self.out_stages]

    def _make_layer(
        self, block: type, inplanes: int, planes: int, blocks: int, stride: int, rngs: nnx.Rngs
    ) -> tuple[Sequential, int]:
        out = planes * block.expansion
        downsample = None
        if stride != 1 or inplanes != out:
            downsample = Sequential([_conv(inplanes, out, 1, stride, 0, rngs), BatchNorm2d(out)])
        layers = [block(inplanes, planes, stride, downsample, self.activation, rngs=rngs)]
        layers += [
            block(out, planes, activation=self.activation, rngs=rngs) for _ in range(blocks - 1)
        ]
        return Sequential(layers), out

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        x = max_pool_3x3_s2(self.act(self.bn1(self.conv1(x))))
        outputs = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            if i in self.out_stages:
                outputs.append(x)
        return tuple(outputs)
