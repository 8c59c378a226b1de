"""NanoDet-m (v0.x) at 416x416 (NanoDet's config/legacy_v0.x_configs/nanodet-m-416.yml)."""

from nanodet_jax.config.defaults import nanodet_legacy_config


def get_config():
    c = nanodet_legacy_config("nanodet_m_416", input_size=416)
    c.data.train.pipeline.scale = [0.5, 1.4]
    return c
