"""NanoDet with EfficientNet-Lite2 at 512x512 (NanoDet's
config/legacy_v0.x_configs/EfficientNet-Lite/nanodet-EfficientNet-Lite2_512.yml)."""

from nanodet_jax.config.defaults import (
    EFFICIENTNET_LITE_NORMALIZE,
    efficientnet_lite,
    nanodet_legacy_config,
)


def get_config():
    c = nanodet_legacy_config(
        "efficientlite2_512",
        input_size=512,
        backbone=efficientnet_lite("efficientnet_lite2"),
        in_channels=[48, 120, 352],
        width=128,
        normalize=EFFICIENTNET_LITE_NORMALIZE,
        batch_size=60,
        lr=0.06,
        total_epochs=135,
        milestones=[90, 110, 120, 130],
        val_intervals=5,
    )
    c.model.arch.head.update(stacked_convs=4, activation="ReLU6", reg_max=10)
    c.data.train.pipeline.scale = [0.5, 1.5]
    return c
