"""EfficientNet-Lite backbone (NanoDet's variant: MBConv stages 0-6, no head conv, no SE).

The Lite family drops squeeze-excitation and fixes the stem (32 channels) and the last
stage's repeats regardless of the width/depth multipliers; NanoDet also leaves out the
classifier's 1280-channel head conv, so the outputs are MBConv stage outputs.

Two NanoDet details are kept on purpose:

* ``activation`` only reaches the stem: NanoDet builds every MBConv block with its
  default ReLU6, whatever the config says.
* Drop connect (stochastic depth) runs in training only, on every residual block, with
  NanoDet's fixed base rate 0.2 scaled by ``block index / number of stages`` (7, not the
  number of blocks, so later blocks drop with up to 0.2 * 15 / 7 = 0.43 in Lite0). The
  legacy EfficientNet-Lite recipes therefore train with it. Each sample's residual branch
  is kept with probability ``keep = 1 - rate`` (mask ``floor(keep + U[0, 1))``) and scaled
  by ``1 / keep``. The uniforms come from an explicit ``dropout`` RNG stream forked from
  the ``rngs`` given at construction (``nnx.Rngs(params=..., dropout=...)``; without a
  ``dropout`` stream the default one is used); ``model.eval()`` turns it off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nanodet_jax.models.layers import Activation, Conv2d, Sequential, random_normal
from nanodet_jax.models.norm import BatchNorm2d

# width multiplier, depth multiplier, ImageNet resolution, classifier dropout (unused here)
EFFICIENTNET_LITE_PARAMS: dict[str, tuple[float, float, int, float]] = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": (1.4, 1.8, 300, 0.3),
}

# Per stage: repeats, kernel, stride, expansion, input width, output width.
MB_BLOCK_SETTINGS: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),  # 0
    (2, 3, 2, 6, 16, 24),  # 1  1/4
    (2, 5, 2, 6, 24, 40),  # 2  1/8
    (3, 3, 2, 6, 40, 80),  # 3
    (3, 5, 1, 6, 80, 112),  # 4  1/16
    (4, 5, 2, 6, 112, 192),  # 5
    (1, 3, 1, 6, 192, 320),  # 6  1/32
)
DROP_CONNECT_RATE = 0.2
BN_MOMENTUM = 0.01  # PyTorch convention (weight of the new batch), i.e. TF's 0.99
BN_EPS = 1e-3
STEM_CHANNELS = 32


def round_filters(filters: int, multiplier: float, divisor: int = 8) -> int:
    """Scale a width by ``multiplier``, rounded to a multiple of 8 and never >10% down."""
    if not multiplier:
        return filters
    scaled = filters * multiplier
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def round_repeats(repeats: int, multiplier: float) -> int:
    return repeats if not multiplier else int(math.ceil(multiplier * repeats))


def _effnet_init(key, shape, dtype=jnp.float32):
    # NanoDet's EfficientNet-Lite init: N(0, sqrt(2 / (k * k * out_channels))).
    kh, kw, _, cout = shape
    return random_normal(key, shape, math.sqrt(2.0 / (kh * kw * cout))).astype(dtype)


def _uniform(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    """The drop-connect draw (a module-level function so tests can feed recorded values)."""
    return jax.random.uniform(key, shape, dtype)


def drop_connect(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Zero whole samples with probability ``rate``, scale the kept ones by 1 / (1 - rate)."""
    keep = 1.0 - rate
    mask = jnp.floor(keep + _uniform(key, (x.shape[0], 1, 1, 1), x.dtype))
    return x / keep * mask


def _bn(channels: int) -> BatchNorm2d:
    return BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nnx.Module):
    """Inverted residual: [1x1 expand] -> depthwise kxk -> 1x1 linear projection [+ input]."""

    # conv -> norm pairs applied back to back (batchnorm_folding)
    BN_FOLDS = (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))

    def __init__(
        self,
        inp: int,
        final_oup: int,
        k: int,
        s: int,
        expand_ratio: int,
        activation: str = "ReLU6",
        *,
        rngs: nnx.Rngs,
    ):
        self.input_filters = inp
        self.output_filters = final_oup
        self.stride = s
        self.expand_ratio = expand_ratio
        oup = inp * expand_ratio

        def conv(cin, cout, kernel, stride=1, groups=1):
            return Conv2d(
                cin,
                cout,
                kernel,
                stride,
                (kernel - 1) // 2,
                groups,
                bias=False,
                kernel_init=_effnet_init,
                rngs=rngs,
            )

        if expand_ratio != 1:
            self._expand_conv = conv(inp, oup, 1)
            self._bn0 = _bn(oup)
        self._depthwise_conv = conv(oup, oup, k, s, groups=oup)
        self._bn1 = _bn(oup)
        self._project_conv = conv(oup, final_oup, 1)
        self._bn2 = _bn(final_oup)
        self._relu = Activation(activation)

    @property
    def has_residual(self) -> bool:
        return self.stride == 1 and self.input_filters == self.output_filters

    def __call__(
        self, x: jax.Array, drop_connect_rate: float = 0.0, key: jax.Array | None = None
    ) -> jax.Array:
        """``key`` given (training): the residual branch is drop-connected at that rate."""
        identity = x
        if self.expand_ratio != 1:
            x = self._relu(self._bn0(self._expand_conv(x)))
        x = self._relu(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        if not self.has_residual:
            return x
        if drop_connect_rate and key is not None:
            x = drop_connect(x, drop_connect_rate, key)
        return x + identity


class EfficientNetLite(nnx.Module):
    """Returns the outputs of ``out_stages`` (a subset of the MBConv stages 0..6)."""

    def __init__(
        self,
        model_name: str,
        out_stages: Sequence[int] = (2, 4, 6),
        activation: str = "ReLU6",
        # NanoDet's ImageNet switch, accepted so its configs build; construction reads no
        # files (see nanodet_jax.models.backbones.pretrained).
        pretrain: bool | str | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        if model_name not in EFFICIENTNET_LITE_PARAMS:
            raise ValueError(f"model_name must be one of {list(EFFICIENTNET_LITE_PARAMS)}")
        if not set(out_stages) <= set(range(len(MB_BLOCK_SETTINGS))):
            raise ValueError(f"out_stages must be a subset of 0..6, got {out_stages}")
        self.model_name = model_name
        self.out_stages = tuple(out_stages)
        self.drop_connect_rate = DROP_CONNECT_RATE
        self.deterministic = False  # model.train() / model.eval() set it, as for nnx.Dropout
        width, depth, _, _ = EFFICIENTNET_LITE_PARAMS[model_name]
        self.stem = Sequential(
            [
                Conv2d(3, STEM_CHANNELS, 3, 2, 1, bias=False, kernel_init=_effnet_init, rngs=rngs),
                _bn(STEM_CHANNELS),
                Activation(activation),
            ]
        )
        last = len(MB_BLOCK_SETTINGS) - 1
        stages, widths = [], []
        for i, (repeats, k, s, expand, cin, cout) in enumerate(MB_BLOCK_SETTINGS):
            # Lite keeps the stem-fed input width and the first and last stages' repeats.
            cin = cin if i == 0 else round_filters(cin, width)
            cout = round_filters(cout, width)
            repeats = repeats if i in (0, last) else round_repeats(repeats, depth)
            blocks = [MBConvBlock(cin, cout, k, s, expand, rngs=rngs)]
            blocks += [MBConvBlock(cout, cout, k, 1, expand, rngs=rngs) for _ in range(repeats - 1)]
            stages.append(nnx.List(blocks))
            widths.append(cout)
        self.blocks = nnx.List(stages)
        self.out_channels = [widths[i] for i in self.out_stages]
        stream = rngs["dropout"] if "dropout" in rngs else rngs.default
        self.rngs = stream.fork()

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        x = self.stem(x)
        outputs, idx = [], 0
        training = not self.deterministic and self.drop_connect_rate > 0
        for j, stage in enumerate(self.blocks):
            for block in stage:
                rate = self.drop_connect_rate * idx / len(self.blocks)
                key = self.rngs() if training and rate > 0 and block.has_residual else None
                x = block(x, rate, key)
                idx += 1
            if j in self.out_stages:
                outputs.append(x)
        return tuple(outputs)
