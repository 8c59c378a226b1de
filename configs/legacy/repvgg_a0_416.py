"""NanoDet with RepVGG-A0 at 416x416 (NanoDet's
config/legacy_v0.x_configs/RepVGG/nanodet-RepVGG-A0_416.yml).

Trained with the multi-branch blocks (``deploy: False``); ``repvgg_model_convert`` in
``nanodet_jax/models/backbones/repvgg.py`` fuses them into plain 3x3 convs afterwards.
"""

from nanodet_jax.config.defaults import nanodet_legacy_config


def get_config():
    backbone = {
        "name": "RepVGG",
        "arch": "A0",
        "out_stages": [2, 3, 4],
        "activation": "ReLU",
        "last_channel": 512,
        "deploy": False,
    }
    c = nanodet_legacy_config(
        "RepVGG-A0-416",
        input_size=416,
        backbone=backbone,
        in_channels=[96, 192, 512],
        width=128,
        batch_size=100,
        lr=0.07,
        warmup_steps=500,
        warmup_ratio=0.01,
        total_epochs=170,
        milestones=[130, 150, 160, 165],
        val_intervals=5,
    )
    c.model.arch.head.update(conv_type="Conv", activation="ReLU", octave_base_scale=8,
                             reg_max=10)  # fmt: skip
    c.data.train.pipeline.scale = [0.5, 1.5]
    return c
