"""NanoDet-t (v0.x): NanoDet-m with TAN, a transformer-attention neck, in place of PAN
(NanoDet's config/legacy_v0.x_configs/Transformer/nanodet-t.yml)."""

from nanodet_jax.config.defaults import nanodet_legacy_config


def get_config():
    c = nanodet_legacy_config(
        "nanodet_t",
        width=128,
        batch_size=160,
        warmup_steps=500,
        warmup_ratio=0.01,
        total_epochs=190,
        milestones=[140, 170, 180, 185],
    )
    c.model.arch.fpn = {
        "name": "TAN",
        "in_channels": [116, 232, 464],
        "out_channels": 128,
        # The stride-32 map of a 320x320 input, where the position embedding is sized.
        "feature_hw": [20, 20],
        "num_heads": 8,
        "num_encoders": 1,
        "mlp_ratio": 4,
        "dropout_ratio": 0.1,
        "activation": "LeakyReLU",
    }
    c.data.train.pipeline.contrast = [0.8, 1.2]
    c.data.train.pipeline.saturation = [0.8, 1.2]
    return c
