"""torchvision's ``FeaturePyramidNetwork`` with the ``LastLevelP6P7`` extra block (FCOS,
RetinaNet), under torchvision's parameter names.

Unlike NanoDet's FPN (``fpn.py``), every level has a 3x3 output conv (``layer_blocks``),
the top-down path upsamples with nearest neighbour to the lateral's size, and two strided
3x3 convs add P6 (from P5, or from C5 when the extra block's input width differs from
the pyramid's) and P7 (from relu(P6)). Laterals and outputs are ``Conv2dNormActivation``
without norm or activation, i.e. a one-element ``nn.Sequential`` around a conv with bias:
their keys are ``inner_blocks.<i>.0.weight`` and ``layer_blocks.<i>.0.weight``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanodet_jax.models.layers import Conv2d, Initializer, Sequential, random_uniform


def kaiming_uniform_a1() -> Initializer:
    """``nn.init.kaiming_uniform_(w, a=1)`` for an HWIO kernel: gain 1, U(+-sqrt(3 / fan_in))."""

    def init(key, shape, dtype=jnp.float32):
        kh, kw, cin, _ = shape
        return random_uniform(key, shape, math.sqrt(3.0 / (cin * kh * kw))).astype(dtype)

    return init


def _conv(cin: int, cout: int, k: int, stride: int, rngs: nnx.Rngs) -> Conv2d:
    # Conv2dNormActivation's padding is (k - 1) // 2; biases start at 0.
    return Conv2d(
        cin, cout, k, stride, (k - 1) // 2, kernel_init=kaiming_uniform_a1(), bias_init=0.0,
        rngs=rngs,
    )  # fmt: skip


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``F.interpolate(x, size=size, mode="nearest")`` on NHWC: source index
    ``min(floor(i * (in / out)), in - 1)`` with the scale in float32, as PyTorch computes it."""

    def index(n_in: int, n_out: int) -> np.ndarray:
        scale = np.float32(n_in) / np.float32(n_out)
        src = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
        return np.minimum(src, n_in - 1)

    h, w = x.shape[1:3]
    if (h, w) == tuple(size):
        return x
    x = jnp.take(x, index(h, size[0]), axis=1)
    return jnp.take(x, index(w, size[1]), axis=2)


class LastLevelP6P7(nnx.Module):
    """P6 = conv3x3/2(P5 or C5), P7 = conv3x3/2(relu(P6))."""

    def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
        self.p6 = _conv(in_channels, out_channels, 3, 2, rngs)
        self.p7 = _conv(out_channels, out_channels, 3, 2, rngs)
        # torchvision's rule: P6 comes from the pyramid's P5 when the widths agree
        # (FCOS: LastLevelP6P7(256, 256)), from the backbone's C5 otherwise (RetinaNet).
        self.use_P5 = in_channels == out_channels

    def __call__(self, p: Sequence[jax.Array], c: Sequence[jax.Array]) -> list[jax.Array]:
        p6 = self.p6(p[-1] if self.use_P5 else c[-1])
        p7 = self.p7(jax.nn.relu(p6))
        return [*p, p6, p7]


class FeaturePyramidNetwork(nnx.Module):
    """Backbone maps (finest first) -> P3..P7 (finest first), each ``out_channels`` wide."""

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int = 256,
        extra_blocks: str | None = "LastLevelP6P7",
        extra_in_channels: int | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        if not in_channels or min(in_channels) <= 0:
            raise ValueError(f"in_channels must be positive widths, got {in_channels!r}")
        if extra_blocks not in (None, "LastLevelP6P7"):
            raise ValueError(f"extra_blocks must be None or 'LastLevelP6P7', got {extra_blocks!r}")
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.inner_blocks = nnx.List(
            [Sequential([_conv(c, out_channels, 1, 1, rngs)]) for c in self.in_channels]
        )
        self.layer_blocks = nnx.List(
            [Sequential([_conv(out_channels, out_channels, 3, 1, rngs)]) for _ in self.in_channels]
        )
        extra_in = out_channels if extra_in_channels is None else extra_in_channels
        self.extra_blocks = (
            LastLevelP6P7(extra_in, out_channels, rngs=rngs) if extra_blocks is not None else None
        )

    def __call__(self, inputs: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} feature maps, got {len(inputs)}")
        last = self.inner_blocks[-1](inputs[-1])
        results = [self.layer_blocks[-1](last)]
        for i in range(len(inputs) - 2, -1, -1):
            lateral = self.inner_blocks[i](inputs[i])
            last = lateral + nearest_resize(last, lateral.shape[1:3])
            results.insert(0, self.layer_blocks[i](last))
        if self.extra_blocks is not None:
            results = self.extra_blocks(results, inputs)
        return tuple(results)
