"""Low-level ops whose fastest implementation depends on the backend."""

from nanodet_jax.ops.depthwise import depthwise_conv2d

__all__ = ["depthwise_conv2d"]
