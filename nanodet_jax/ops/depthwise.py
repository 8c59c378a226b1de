"""Depthwise 2-D convolution (NHWC input, HWIO kernel with I == 1)."""

from __future__ import annotations

import jax
from jax import lax


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """y[b, i, j, c] = sum_{u, v} xpad[b, i*s + u, j*s + v, c] * kernel[u, v, 0, c]."""
    channels = x.shape[-1]
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels,
    )
