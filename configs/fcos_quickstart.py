"""FCOS quickstart: torchvision's FCOS with a ResNet-18 body on the generated shapes dataset
of ``configs/quickstart.py``, small enough to train a few steps on a CPU.

    python train.py --config configs/fcos_quickstart.py

The model is ``nanodet_jax/models/detectors/fcos.py`` (``configs/fcos_r50_fpn.py``'s
architecture, narrowed): ResNet-18 C3-C5, a 64-channel FPN with P6/P7, the FCOS head
with 3 class logits. Unlike the COCO model (91 logits indexed by category id), the class
list is the dataset's, so the dataset's contiguous labels 0..2 are the logit indices
(``label_map`` None). From scratch, as ``fcos_resnet50_fpn(weights=None)`` builds it:
trainable BatchNorm and every body layer trainable.
"""

import os

from nanodet_jax.config.defaults import NORMALIZE
from nanodet_jax.config.loading import load_config
from nanodet_jax.data.synthetic import CLASSES

WIDTH = 64


def get_config():
    # The quickstart's data, schedule bookkeeping and logging; the model and recipe change.
    c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py"))
    c.name = "fcos_quickstart"
    c.model.arch = {
        "name": "FCOS",
        # pretrain: a torchvision resnet18-*.pth to start from ImageNet weights.
        "backbone": {
            "name": "ResNet",
            "depth": 18,
            "out_stages": [2, 3, 4],
            "activation": "ReLU",
            "pretrain": None,
        },
        "fpn": {
            "name": "FeaturePyramidNetwork",
            "in_channels": [128, 256, 512],
            "out_channels": WIDTH,
            "extra_blocks": "LastLevelP6P7",
        },
        "head": {"name": "FCOSHead", "in_channels": WIDTH, "num_classes": len(CLASSES)},
        "norm_layer": "BN",
        "trainable_backbone_layers": 5,
        "anchor_sizes": [8, 16, 32, 64, 128],
        "score_thresh": 0.05,
        "topk_candidates": 1000,
        "input_channel_order": "BGR",
        "label_map": None,
    }
    for split in (c.data.train, c.data.val):
        split.input_size = [128, 128]
        split.pipeline.normalize = [list(v) for v in NORMALIZE]
    c.test = {"score_thr": 0.05, "nms_iou": 0.6, "max_per_img": 100, "nms_pre": 5000}
    c.test.batch_size = 8  # beside the others: "nms_pre" is every decode candidate
    c.device.batch_size_per_device = 8
    c.schedule = {
        "optimizer": {"name": "SGD", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0001},
        "warmup": {"name": "linear", "steps": 20, "ratio": 0.001},
        # EMA val mAP at epochs 2 / 4 / 6 / 8: 0.030 / 0.062 / 0.111 / 0.133 (one CPU run);
        # 4 epochs (milestone 3) stopped at 0.081, still rising.
        "total_epochs": 8,
        "lr_schedule": {"name": "MultiStepLR", "milestones": [6], "gamma": 0.1},
        "val_intervals": 2,
    }
    c.grad_clip = 0.0
    return c
