"""NanoDet-g (v0.x) at 416x416: CustomCspNet, PAN, a NanoDetHead of plain convs, for
accelerators with much compute and little memory bandwidth (NanoDet's
config/legacy_v0.x_configs/nanodet-g.yml)."""

from nanodet_jax.config.defaults import nanodet_legacy_config


def get_config():
    backbone = {
        "name": "CustomCspNet",
        # [type, in, out, kernel, stride] / [MaxPool, kernel, stride] /
        # [CspBlock, in, blocks, kernel, stride]; output strides 2, 4, 4, 8, 16, 32.
        "net_cfg": [
            ["Conv", 3, 32, 3, 2],
            ["MaxPool", 3, 2],
            ["CspBlock", 32, 1, 3, 1],
            ["CspBlock", 64, 2, 3, 2],
            ["CspBlock", 128, 2, 3, 2],
            ["CspBlock", 256, 3, 3, 2],
        ],
        "out_stages": [3, 4, 5],
        "activation": "LeakyReLU",
    }
    c = nanodet_legacy_config(
        "nanodet_g",
        input_size=416,
        backbone=backbone,
        in_channels=[128, 256, 512],
        width=128,
        batch_size=128,
        lr=0.1,
        warmup_steps=500,
        warmup_ratio=0.01,
        total_epochs=190,
        milestones=[130, 160, 175, 185],
        val_intervals=5,
    )
    c.model.arch.head.update(
        conv_type="Conv", activation="LeakyReLU", stacked_convs=1, octave_base_scale=8,
        reg_max=10,
    )  # fmt: skip
    return c
