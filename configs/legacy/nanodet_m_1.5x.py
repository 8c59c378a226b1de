"""NanoDet-m-1.5x (v0.x) at 320x320: ShuffleNetV2-1.5x, 128-channel PAN and head
(NanoDet's config/legacy_v0.x_configs/nanodet-m-1.5x.yml)."""

from nanodet_jax.config.defaults import nanodet_legacy_config


def get_config():
    return nanodet_legacy_config("nanodet_m_1.5x", model_size="1.5x")
