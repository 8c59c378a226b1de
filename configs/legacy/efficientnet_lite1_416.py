"""NanoDet with EfficientNet-Lite1 at 416x416 (NanoDet's
config/legacy_v0.x_configs/EfficientNet-Lite/nanodet-EfficientNet-Lite1_416.yml)."""

from nanodet_jax.config.defaults import (
    EFFICIENTNET_LITE_NORMALIZE,
    efficientnet_lite,
    nanodet_legacy_config,
)


def get_config():
    c = nanodet_legacy_config(
        "efficient1_416_SGD",
        input_size=416,
        backbone=efficientnet_lite("efficientnet_lite1"),
        in_channels=[40, 112, 320],
        width=128,
        normalize=EFFICIENTNET_LITE_NORMALIZE,
        batch_size=100,
        lr=0.07,
        warmup_steps=500,
        warmup_ratio=0.01,
        total_epochs=170,
        milestones=[130, 150, 160, 165],
        val_intervals=5,
    )
    c.model.arch.head.update(stacked_convs=3, activation="ReLU6", octave_base_scale=8,
                             reg_max=10)  # fmt: skip
    c.data.train.pipeline.scale = [0.5, 1.5]
    return c
