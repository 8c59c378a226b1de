"""NanoDet with EfficientNet-Lite0 at 320x320 (NanoDet's
config/legacy_v0.x_configs/EfficientNet-Lite/nanodet-EfficientNet-Lite0_320.yml)."""

from nanodet_jax.config.defaults import (
    EFFICIENTNET_LITE_NORMALIZE,
    efficientnet_lite,
    nanodet_legacy_config,
)


def get_config():
    c = nanodet_legacy_config(
        "efficient0_320",
        backbone=efficientnet_lite("efficientnet_lite0"),
        in_channels=[40, 112, 320],
        width=96,
        normalize=EFFICIENTNET_LITE_NORMALIZE,
        batch_size=150,
        lr=0.15,
        warmup_steps=500,
        warmup_ratio=0.01,
        total_epochs=190,
        milestones=[140, 170, 180, 185],
        val_intervals=1,
    )
    c.model.arch.head.activation = "ReLU6"
    return c
