"""NanoDet-m (v0.x) at 320x320: ShuffleNetV2-1.0x, PAN, NanoDetHead (NanoDet's
config/legacy_v0.x_configs/nanodet-m.yml)."""

from nanodet_jax.config.defaults import nanodet_legacy_config


def get_config():
    return nanodet_legacy_config("nanodet_m")
