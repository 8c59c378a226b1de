"""Low-level ops whose fastest implementation depends on the backend."""

from nanodet_jax.ops.conv3x3 import conv3x3
from nanodet_jax.ops.depthwise import depthwise_conv2d

__all__ = ["conv3x3", "depthwise_conv2d"]
