"""NanoDet-m-0.5x (v0.x) at 320x320: ShuffleNetV2-0.5x (NanoDet's
config/legacy_v0.x_configs/nanodet-m-0.5x.yml)."""

from nanodet_jax.config.defaults import nanodet_legacy_config


def get_config():
    c = nanodet_legacy_config(
        "nanodet_m_0.5x",
        model_size="0.5x",
        batch_size=96,
        lr=0.07,
        warmup_steps=1000,
        warmup_ratio=0.00001,
        total_epochs=180,
        milestones=[130, 160, 175],
    )
    c.data.train.pipeline.scale = [0.5, 1.5]
    c.log.interval = 50
    return c
