"""NanoDet-Plus with timm's ConvNeXt-nano at 640x640 (NanoDet's
config/convnext/nanodet-plus_convnext-nano_640.yml).

The backbone is NanoDet's ``TIMMWrapper`` (ConvNeXt written natively here, no timm
needed). ``pretrained: True``, as the yml: timm's ImageNet weights, which are not
downloaded here, so training asks for them as a local file
(``--config.model.arch.backbone.checkpoint_path=/path/to/convnext_nano weights``) or
runs from random init with ``--config.model.arch.backbone.pretrained=False``; building
the model, evaluation and export read no file.
"""

from nanodet_jax.config.defaults import nanodet_plus_config


def get_config():
    c = nanodet_plus_config(input_size=640)
    c.name = "nanodet-plus_convnext-nano_640"
    arch = c.model.arch
    arch.backbone = {
        "name": "TIMMWrapper",
        "model_name": "convnext_nano",
        "features_only": True,
        "pretrained": True,
        "out_indices": [1, 2, 3],
    }
    arch.fpn.in_channels = [160, 320, 640]
    arch.fpn.out_channels = 128
    arch.head.input_channel = arch.head.feat_channels = 128
    arch.aux_head.input_channel = arch.aux_head.feat_channels = 256
    for part in (arch.fpn, arch.head, arch.aux_head):
        part.activation = "SiLU"
    c.data.train.pipeline.scale = [0.1, 2.0]
    c.device.batch_size_per_device = 24  # x 4 GPUs in NanoDet's run
    c.device.workers = 8
    c.schedule.optimizer = {
        "name": "AdamW",
        "lr": 0.001,
        "weight_decay": 0.05,
        "no_norm_decay": True,
        "param_level_cfg": {"backbone": {"lr_mult": 0.1}},
    }
    c.schedule.total_epochs = 50
    c.schedule.lr_schedule = {"name": "CosineAnnealingLR", "T_max": 50, "eta_min": 0.0005}
    c.schedule.val_intervals = 5
    return c
