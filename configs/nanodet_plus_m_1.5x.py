"""NanoDet-Plus-m-1.5x at 320x320 (NanoDet's config/nanodet-plus-m-1.5x_320.yml)."""

from nanodet_jax.config.defaults import nanodet_plus_config


def get_config():
    return nanodet_plus_config(model_size="1.5x", input_size=320)
