"""NanoDet-m-1.5x (v0.x) at 416x416 (NanoDet's
config/legacy_v0.x_configs/nanodet-m-1.5x-416.yml)."""

from nanodet_jax.config.defaults import nanodet_legacy_config


def get_config():
    c = nanodet_legacy_config("nanodet_m_1.5x_416", model_size="1.5x", input_size=416,
                              batch_size=176)  # fmt: skip
    c.data.train.pipeline.scale = [0.5, 1.4]
    return c
