"""Configurations with the values of NanoDet's ``config/*.yml``.

The files in ``configs/`` call :func:`nanodet_plus_config` (NanoDet-Plus) or, in
``configs/legacy/``, :func:`nanodet_legacy_config` (NanoDet's v0.x OneStageDetector
recipe); every field can be overridden on the command line as ``--config.a.b=value``.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections

COCO_CLASSES = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic_light",
    "fire_hydrant",
    "stop_sign",
    "parking_meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports_ball",
    "kite",
    "baseball_bat",
    "baseball_glove",
    "skateboard",
    "surfboard",
    "tennis_racket",
    "bottle",
    "wine_glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot_dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted_plant",
    "bed",
    "dining_table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell_phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy_bear",
    "hair_drier",
    "toothbrush",
)

# BGR mean / std on the 0-255 scale, as NanoDet's pipeline ``normalize``.
NORMALIZE = ((103.53, 116.28, 123.675), (57.375, 57.12, 58.395))

# ShuffleNetV2 width of NanoDet's -m-0.5x / -m / -m-1.5x configs -> (backbone channels,
# neck channels).
WIDTHS = {
    "0.5x": ((48, 96, 192), 96),
    "1.0x": ((116, 232, 464), 96),
    "1.5x": ((176, 352, 704), 128),
}
# EfficientNet-Lite's ImageNet input scaling ((x - 127) / 128), which its configs keep.
EFFICIENTNET_LITE_NORMALIZE = ((127.0, 127.0, 127.0), (128.0, 128.0, 128.0))


def shufflenet_v2(model_size: str) -> dict:
    """The ShuffleNetV2 backbone section of NanoDet's -m and NanoDet-Plus-m configs."""
    return {
        "name": "ShuffleNetV2",
        "model_size": model_size,
        "out_stages": [2, 3, 4],
        "activation": "LeakyReLU",
        # NanoDet's default is True (torchvision's ImageNet weights, downloaded); here
        # None: random init. True or a .pth path: see nanodet_jax/models/backbones/pretrained.py.
        "pretrain": None,
    }


def efficientnet_lite(model_name: str) -> dict:
    """The EfficientNet-Lite backbone section of NanoDet's EfficientNet-Lite configs."""
    return {
        "name": "EfficientNetLite",
        "model_name": model_name,
        "out_stages": [2, 4, 6],
        "activation": "ReLU6",
        # NanoDet's default (and its Lite1 / Lite2 files): True, its ImageNet weights,
        # downloaded; here None, random init, as for ShuffleNetV2.
        "pretrain": None,
    }


def nanodet_plus_config(
    model_size: str = "1.0x", input_size: int = 320
) -> ml_collections.ConfigDict:
    in_channels, pan = WIDTHS[model_size]
    strides = [8, 16, 32, 64]
    c = ml_collections.ConfigDict()
    c.name = f"nanodet-plus-m{'' if model_size == '1.0x' else '-' + model_size}_{input_size}"
    c.class_names = list(COCO_CLASSES)
    num_classes = len(c.class_names)

    c.model = ml_collections.ConfigDict()
    c.model.weight_averager = {"name": "ExpMovingAverager", "decay": 0.9998}
    c.model.arch = {
        "name": "NanoDetPlus",
        "detach_epoch": 10,
        "backbone": shufflenet_v2(model_size),
        "fpn": {
            "name": "GhostPAN",
            "in_channels": list(in_channels),
            "out_channels": pan,
            "kernel_size": 5,
            "num_extra_level": 1,
            "use_depthwise": True,
            "activation": "LeakyReLU",
        },
        "head": {
            "name": "NanoDetPlusHead",
            "num_classes": num_classes,
            "input_channel": pan,
            "feat_channels": pan,
            "stacked_convs": 2,
            "kernel_size": 5,
            "strides": strides,
            "activation": "LeakyReLU",
            "reg_max": 7,
            "norm_cfg": {"type": "BN"},
            "loss": {
                "loss_qfl": {
                    "name": "QualityFocalLoss",
                    "use_sigmoid": True,
                    "beta": 2.0,
                    "loss_weight": 1.0,
                },
                "loss_dfl": {"name": "DistributionFocalLoss", "loss_weight": 0.25},
                "loss_bbox": {"name": "GIoULoss", "loss_weight": 2.0},
            },
        },
        # Auxiliary head (Assign Guidance Module), used only in training.
        "aux_head": {
            "name": "SimpleConvHead",
            "num_classes": num_classes,
            "input_channel": 2 * pan,
            "feat_channels": 2 * pan,
            "stacked_convs": 4,
            "strides": strides,
            "activation": "LeakyReLU",
            "reg_max": 7,
        },
    }

    pipeline_train = {
        "perspective": 0.0,
        "scale": [0.6, 1.4],
        "stretch": [[0.8, 1.2], [0.8, 1.2]],
        "rotation": 0.0,
        "shear": 0.0,
        "translate": 0.2,
        "flip": 0.5,
        "brightness": 0.2,
        "contrast": [0.6, 1.4],
        "saturation": [0.5, 1.2],
        "normalize": [list(v) for v in NORMALIZE],
    }
    c.data = ml_collections.ConfigDict()
    c.data.train = {
        "name": "CocoDataset",  # or XMLDataset, YoloDataset, TFDSDataset
        "img_dir": "data/coco/train2017",
        "ann_file": "data/coco/annotations/instances_train2017.json",
        "split": "",  # TFDS split ("" = the natural one for the role)
        "difficult": "keep",  # VOC <difficult> objects: keep (NanoDet) or ignore
        "input_size": [input_size, input_size],
        "keep_ratio": False,
        "pipeline": pipeline_train,
        # Ground-truth slots per image are padded to the smallest of these that fits the
        # batch (few shapes -> few recompiles); boxes beyond the last are dropped, warned.
        "max_boxes_buckets": [32, 64, 128],
    }
    c.data.val = {
        "name": "CocoDataset",
        "img_dir": "data/coco/val2017",
        "ann_file": "data/coco/annotations/instances_val2017.json",
        "split": "",
        "difficult": "keep",
        "input_size": [input_size, input_size],
        "keep_ratio": False,
        "pipeline": {"normalize": [list(v) for v in NORMALIZE]},
    }

    # Post-processing, NanoDet's hard-coded get_bboxes settings. ``nms_pre`` bounds the
    # candidates the jitted NMS looks at (NanoDet: unbounded); a run that would have
    # needed more is counted and reported.
    c.test = {
        "score_thr": 0.05,
        "nms_iou": 0.6,
        "max_per_img": 100,
        "nms_pre": 2000,
        "batch_size": 8,
    }

    # The training batch: batch_size_per_device (NanoDet's batchsize_per_gpu; the global
    # batch grows with the devices) or global_batch_size (split over all devices of all
    # processes; the same run on any device count). One is in force, 0 = unset; see
    # config/batch.py.
    c.device = {
        "batch_size_per_device": 96,
        "global_batch_size": 0,
        "workers": 4,
        "precision": "fp32",
    }
    # NanoDet's schedule (optim.py, schedules.py, param_groups.py; PyTorch's semantics):
    # optimizer.name: AdamW | Adam (betas, eps, weight_decay) | SGD (momentum, dampening,
    #   nesterov, weight_decay); absent keys take torch.optim's defaults. Optional extras:
    #   no_norm_decay / no_bias_decay (bool), param_level_cfg {substring of a parameter
    #   name (no dots): {lr_mult, decay_mult}}; keys must match disjoint parameters
    #   (NanoDet's first-match order is lost: a ConfigDict sorts its keys).
    # warmup.name: constant | linear | exp, per step, overwriting the scheduled lr.
    # lr_schedule.name, stepped per epoch: CosineAnnealingLR (T_max, eta_min) |
    #   MultiStepLR (milestones, gamma), e.g. {"name": "MultiStepLR",
    #   "milestones": [240, 260, 275], "gamma": 0.1} with SGD lr 0.14, momentum 0.9.
    c.schedule = {
        "optimizer": {"name": "AdamW", "lr": 0.001, "weight_decay": 0.05},
        "warmup": {"name": "linear", "steps": 500, "ratio": 0.0001},
        "total_epochs": 300,
        "lr_schedule": {"name": "CosineAnnealingLR", "T_max": 300, "eta_min": 0.00005},
        "val_intervals": 10,
    }
    c.grad_clip = 35.0
    # Fine-tuning start point: a NanoDet .pth / .ckpt or an orbax checkpoint directory.
    c.init_from = ""
    # Re-estimate BatchNorm statistics on this many training images after loading
    # init_from (function-preserving; needed for BN-folded weights, e.g. from ncnn).
    c.init_bn_recalibration_images = 0
    # preemption_grace_s: the longest a SIGTERM / SIGINT may take to stop training (the
    # current step, its checkpoint, orbax's write); past it the process exits without that
    # checkpoint (status 128 + signal). Keep it below the scheduler's kill delay (30 s by
    # default in Kubernetes and SLURM) so the log says what was lost; 0: no limit.
    c.checkpoint = {"every_steps": 1000, "keep": 3, "preemption_grace_s": 25.0}
    c.evaluator = {"name": "CocoDetectionEvaluator", "save_key": "mAP"}
    c.log = {"interval": 50}
    c.seed = 0
    return c


def nanodet_legacy_config(
    name: str,
    model_size: str = "1.0x",
    input_size: int = 320,
    *,
    backbone: dict | None = None,
    in_channels: Sequence[int] | None = None,
    width: int | None = None,
    normalize: tuple = NORMALIZE,
    batch_size: int = 192,
    lr: float = 0.14,
    warmup_steps: int = 300,
    warmup_ratio: float = 0.1,
    total_epochs: int = 280,
    milestones: Sequence[int] = (240, 260, 275),
    val_intervals: int = 10,
) -> ml_collections.ConfigDict:
    """NanoDet's v0.x recipe (``config/legacy_v0.x_configs/nanodet-m.yml`` and its
    siblings): a OneStageDetector (backbone, PAN, NanoDetHead on strides 8-32), trained
    with SGD, linear warm-up and MultiStepLR, on keep-ratio inputs, without EMA.

    The backbone is ShuffleNetV2 of ``model_size`` unless ``backbone`` (with its
    ``in_channels``) is given; ``width`` is the neck and head channels (default: the
    ShuffleNetV2 width's). The fields outside NanoDet's schema (test, checkpoint, seed,
    ...) are the same as :func:`nanodet_plus_config`'s, as loading the .yml gives them.
    """
    if backbone is None:
        backbone = shufflenet_v2(model_size)
        in_channels, default_width = WIDTHS[model_size]
        width = width or default_width
    elif in_channels is None or width is None:
        raise ValueError("a custom backbone needs its in_channels and the neck width")
    c = nanodet_plus_config(input_size=input_size)
    c.name = name
    # NanoDet v0.x has no weight averager: evaluation uses the trained weights, which an
    # EMA of decay 0 is (the .yml writer leaves the section out for it).
    c.model.weight_averager = {"name": "ExpMovingAverager", "decay": 0.0}
    c.model.arch = {
        "name": "OneStageDetector",
        "backbone": backbone,
        "fpn": {
            "name": "PAN",
            "in_channels": list(in_channels),
            "out_channels": width,
            "start_level": 0,
            "num_outs": 3,
        },
        "head": {
            "name": "NanoDetHead",
            "num_classes": len(c.class_names),
            "input_channel": width,
            "feat_channels": width,
            "stacked_convs": 2,
            "share_cls_reg": True,
            "octave_base_scale": 5,
            "scales_per_octave": 1,
            "strides": [8, 16, 32],
            "reg_max": 7,
            "norm_cfg": {"type": "BN"},
            # The same QFL / DFL / GIoU terms and weights as NanoDet-Plus's head.
            "loss": c.model.arch.head.loss.to_dict(),
        },
    }
    for role in ("train", "val"):
        c.data[role].keep_ratio = True
        c.data[role].pipeline.normalize = [list(v) for v in normalize]
    c.data.train.pipeline.stretch = [[1.0, 1.0], [1.0, 1.0]]  # no aspect jitter in v0.x
    c.device.batch_size_per_device = batch_size
    c.schedule = {
        "optimizer": {"name": "SGD", "lr": lr, "momentum": 0.9, "weight_decay": 0.0001},
        "warmup": {"name": "linear", "steps": warmup_steps, "ratio": warmup_ratio},
        "total_epochs": total_epochs,
        "lr_schedule": {"name": "MultiStepLR", "milestones": list(milestones), "gamma": 0.1},
        "val_intervals": val_intervals,
    }
    c.grad_clip = 0.0  # v0.x clips no gradient
    c.log.interval = 10
    return c
