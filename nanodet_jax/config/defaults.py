"""NanoDet-Plus configurations with the values of NanoDet's ``config/nanodet-plus-*.yml``.

The files in ``configs/`` call :func:`nanodet_plus_config`; every field can be
overridden on the command line as ``--config.a.b=value``.
"""

from __future__ import annotations

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

# ShuffleNetV2 width of NanoDet's -m / -m-1.5x configs -> (backbone channels, PAN channels).
WIDTHS = {"1.0x": ((116, 232, 464), 96), "1.5x": ((176, 352, 704), 128)}


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
        "backbone": {
            "name": "ShuffleNetV2",
            "model_size": model_size,
            "out_stages": [2, 3, 4],
            "activation": "LeakyReLU",
            # NanoDet's default is True (torchvision's ImageNet weights, downloaded); here
            # None: random init. True or a .pth path: see nanodet_jax/pretrained.py.
            "pretrain": None,
        },
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

    c.device = {"batch_size_per_device": 96, "workers": 4, "precision": "fp32"}
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
    c.checkpoint = {"every_steps": 1000, "keep": 3}
    c.evaluator = {"name": "CocoDetectionEvaluator", "save_key": "mAP"}
    c.log = {"interval": 50}
    c.seed = 0
    return c
