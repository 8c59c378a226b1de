"""NanoDet-Plus-m at 320x320 (NanoDet's config/nanodet-plus-m_320.yml)."""

from nanodet_jax.config.defaults import nanodet_plus_config


def get_config():
    return nanodet_plus_config(model_size="1.0x", input_size=320)
