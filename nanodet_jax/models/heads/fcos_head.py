"""torchvision's ``FCOSHead``: separate classification and regression towers shared over
the pyramid levels, under torchvision's parameter names.

Each tower is ``num_convs`` x (3x3 conv with bias, GroupNorm(32), ReLU) in one
``nn.Sequential`` (keys ``conv.0``, ``conv.1``, ``conv.3``, ... : the ReLUs hold the
other indices). The class logits come from the classification tower; the box distances
(``relu`` of a conv, no per-level scale) and the centerness logit both from the
regression tower. Outputs are concatenated over levels in torchvision's order: level,
then row, then column (one point per location).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nanodet_jax.models.layers import Activation, Conv2d, Sequential, normal
from nanodet_jax.models.norm import GroupNorm

OUTPUT_KEYS = ("cls_logits", "bbox_regression", "bbox_ctrness")


def _conv(cin: int, cout: int, rngs: nnx.Rngs, bias: float = 0.0) -> Conv2d:
    # torchvision initialises every conv of the head with N(0, 0.01) weights.
    return Conv2d(cin, cout, 3, 1, 1, kernel_init=normal(0.01), bias_init=bias, rngs=rngs)


def _tower(channels: int, num_convs: int, num_groups: int, rngs: nnx.Rngs) -> Sequential:
    layers = []
    for _ in range(num_convs):
        layers += [_conv(channels, channels, rngs), GroupNorm(num_groups, channels)]
        layers.append(Activation("ReLU"))
    return Sequential(layers)


def _flatten(x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    return x.reshape(b, h * w, c)


class FCOSClassificationHead(nnx.Module):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_convs: int = 4,
        prior_probability: float = 0.01,
        num_groups: int = 32,
        *,
        rngs: nnx.Rngs,
    ):
        self.num_classes = num_classes
        self.conv = _tower(in_channels, num_convs, num_groups, rngs)
        # The focal-loss prior: every class starts at probability prior_probability.
        prior_bias = -math.log((1 - prior_probability) / prior_probability)
        self.cls_logits = _conv(in_channels, num_classes, rngs, bias=prior_bias)

    def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
        return jnp.concatenate([_flatten(self.cls_logits(self.conv(f))) for f in features], 1)


class FCOSRegressionHead(nnx.Module):
    def __init__(
        self, in_channels: int, num_convs: int = 4, num_groups: int = 32, *, rngs: nnx.Rngs
    ):
        self.conv = _tower(in_channels, num_convs, num_groups, rngs)
        self.bbox_reg = _conv(in_channels, 4, rngs)
        self.bbox_ctrness = _conv(in_channels, 1, rngs)

    def __call__(self, features: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
        regression, ctrness = [], []
        for f in features:
            tower = self.conv(f)
            regression.append(_flatten(jax.nn.relu(self.bbox_reg(tower))))
            ctrness.append(_flatten(self.bbox_ctrness(tower)))
        return jnp.concatenate(regression, 1), jnp.concatenate(ctrness, 1)


class FCOSHead(nnx.Module):
    """Pyramid maps -> ``{"cls_logits": [B, N, C], "bbox_regression": [B, N, 4],
    "bbox_ctrness": [B, N, 1]}`` (box distances in units of the level's anchor size)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_convs: int = 4,
        prior_probability: float = 0.01,
        num_groups: int = 32,
        *,
        rngs: nnx.Rngs,
    ):
        self.num_classes = num_classes
        self.classification_head = FCOSClassificationHead(
            in_channels, num_classes, num_convs, prior_probability, num_groups, rngs=rngs
        )
        self.regression_head = FCOSRegressionHead(in_channels, num_convs, num_groups, rngs=rngs)

    def __call__(self, features: Sequence[jax.Array]) -> dict[str, jax.Array]:
        regression, ctrness = self.regression_head(features)
        return {
            "cls_logits": self.classification_head(features),
            "bbox_regression": regression,
            "bbox_ctrness": ctrness,
        }
