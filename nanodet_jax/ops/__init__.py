"""Low-level ops whose fastest implementation depends on the backend."""

from nanodet_jax.ops.conv1x1 import conv1x1
from nanodet_jax.ops.conv3x3 import conv3x3
from nanodet_jax.ops.depthwise import depthwise_conv2d, depthwise_conv2d_bias_act
from nanodet_jax.ops.fused_conv import pointwise_conv_bias_act, stem_conv_bias_act

__all__ = [
    "conv1x1",
    "conv3x3",
    "depthwise_conv2d",
    "depthwise_conv2d_bias_act",
    "pointwise_conv_bias_act",
    "stem_conv_bias_act",
]
