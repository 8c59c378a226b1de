"""FCOS ResNet-50 FPN with torchvision's settings (``fcos_resnet50_fpn``, its COCO recipe).

The model is torchvision's (``nanodet_jax/models/detectors/fcos.py``): 91 outputs indexed
by COCO category id (0 is "__background__", the ids COCO skips are "N/A"), as in its
checkpoint; a torchvision state_dict loads with ``load_torch_weights``. Training targets
follow: the dataset's contiguous labels 0..79 go to logits at their category ids
(``label_map``); detections come back as those labels (``FCOS.decode``), so COCO
evaluation scores them against their categories.

Input size: torchvision's ``GeneralizedRCNNTransform``, shorter side 800 and longer side
at most 1333 (``data.*.resize``, :mod:`nanodet_jax.data.canvas_resize`), each image on
the smallest of seven canvases (one compiled program each) instead of torchvision's
per-batch padding; ``input_size`` is the largest canvas (what an ONNX export takes).
Training augments as torchvision's detection reference does by default: a horizontal
flip with probability 0.5, nothing else.

Normalisation: torchvision takes RGB in [0, 1] with the ImageNet mean (0.485, 0.456, 0.406)
and std (0.229, 0.224, 0.225); our pipeline normalises BGR with a 0-255 mean / std, so the
same map is mean (103.53, 116.28, 123.675) and std (57.375, 57.12, 58.395) in BGR order,
and the model reverses the channels to RGB (``input_channel_order="BGR"``).
"""

from nanodet_jax.config.defaults import COCO_CLASSES, NORMALIZE, nanodet_plus_config

# COCO category ids absent from the annotation files; torchvision keeps their slots.
COCO_UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)


def coco_category_names() -> list[str]:
    """torchvision's 91 COCO outputs: index = COCO category id."""
    names, used = ["__background__"], iter(COCO_CLASSES)
    for category_id in range(1, 91):
        names.append("N/A" if category_id in COCO_UNUSED_IDS else next(used))
    return names


def get_config():
    c = nanodet_plus_config()
    c.name = "fcos_r50_fpn"
    c.class_names = coco_category_names()
    num_classes = len(c.class_names)
    c.model.weight_averager = {"name": "ExpMovingAverager", "decay": 0.0}  # no EMA
    c.model.arch = {
        "name": "FCOS",
        "backbone": {
            "name": "ResNet",
            "depth": 50,
            "out_stages": [2, 3, 4],
            "activation": "ReLU",
            # torchvision's recipe starts from ImageNet weights (weights_backbone): set a
            # torchvision resnet50-*.pth path (or True: the torch hub cache's file); it
            # loads into backbone.body when training starts from scratch.
            "pretrain": None,
        },
        "fpn": {
            "name": "FeaturePyramidNetwork",
            "in_channels": [512, 1024, 2048],
            "out_channels": 256,
            "extra_blocks": "LastLevelP6P7",
        },
        "head": {
            "name": "FCOSHead",
            "in_channels": 256,
            "num_classes": num_classes,
            "num_convs": 4,
        },
        # fcos_resnet50_fpn with pretrained weights: FrozenBatchNorm2d, conv1 and layer1
        # frozen (use "BN" and 5 for its weights=None variant).
        "norm_layer": "FrozenBN",
        "trainable_backbone_layers": 3,
        "anchor_sizes": [8, 16, 32, 64, 128],
        "score_thresh": 0.2,
        "topk_candidates": 1000,
        "input_channel_order": "BGR",
        # Dataset label i (the i-th of the sorted COCO ids) trains the logit of that id.
        "label_map": [i for i in range(1, 91) if i not in COCO_UNUSED_IDS],
    }
    resize = {
        "min_size": 800,
        "max_size": 1333,
        "size_divisible": 32,
        # (w, h): square, 4:3, 3:2 and the widest (1333 / 800) resize, landscape and
        # portrait, rounded up to 32: COCO's usual 640x480 / 640x427 photos fill theirs
        # exactly (canvas_resize.py: 1.2% more pixels than per-image padding on coco_tiny).
        "canvases": [[800, 800], [1088, 800], [800, 1088], [1216, 800], [800, 1216],
                     [1344, 800], [800, 1344]],
    }  # fmt: skip
    for split in (c.data.train, c.data.val):
        split.input_size = [1344, 800]  # (w, h): the largest canvas min/max size allow
        split.keep_ratio = True
        split.pipeline.normalize = [list(v) for v in NORMALIZE]
        split.resize = resize
    # torchvision's reference recipe (--data-augmentation hflip): flip only, no colour.
    c.data.train.pipeline = {"flip": 0.5, "normalize": [list(v) for v in NORMALIZE]}
    c.test = {
        "score_thr": 0.2,
        "nms_iou": 0.6,
        "max_per_img": 100,
        # Every candidate: decode keeps at most topk_candidates per level (5 levels).
        "nms_pre": 5000,
        "batch_size": 2,
    }
    # torchvision's detection reference for FCOS: 8 GPUs x 2 images, SGD 0.01, 26 epochs,
    # steps at 16 and 22, linear warm-up from 1/1000 over the first 1000 iterations.
    c.device = {
        "batch_size_per_device": 16,
        "global_batch_size": 0,
        "workers": 4,
        "precision": "fp32",
    }
    c.schedule = {
        "optimizer": {"name": "SGD", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0001},
        "warmup": {"name": "linear", "steps": 1000, "ratio": 0.001},
        "total_epochs": 26,
        "lr_schedule": {"name": "MultiStepLR", "milestones": [16, 22], "gamma": 0.1},
        "val_intervals": 1,
    }
    c.grad_clip = 0.0  # the reference does not clip
    return c
