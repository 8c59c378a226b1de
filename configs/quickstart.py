"""Quickstart: NanoDet-Plus-m on a generated shapes dataset, trainable offline on one CPU.

    python train.py --config configs/quickstart.py

The first run writes the dataset (coloured circles, squares and triangles on textured
backgrounds, COCO format) to ``data/quickstart_shapes`` (seconds), then trains for a few
minutes, evaluating the EMA weights on the val split as it goes. The architecture is
NanoDet-Plus-m (ShuffleNetV2-1.0x, GhostPAN, NanoDet-Plus head + AGM) with 3 classes at a
256x256 input; the schedule is shortened (short warm-up, few epochs, earlier
detach_epoch) so the mAP rises within the run.
"""

from nanodet_jax.config.defaults import nanodet_plus_config
from nanodet_jax.data.synthetic import CLASSES

DATA = "data/quickstart_shapes"


def get_config():
    c = nanodet_plus_config(model_size="1.0x", input_size=256)
    c.name = "quickstart"
    c.class_names = list(CLASSES)
    arch = c.model.arch
    arch.head.num_classes = arch.aux_head.num_classes = len(CLASSES)
    arch.detach_epoch = 5
    c.data.synthetic = {"out_dir": DATA, "num_train": 512, "num_val": 64, "size": 320, "seed": 0}
    c.data.train.img_dir, c.data.train.ann_file = (
        f"{DATA}/train",
        f"{DATA}/annotations/instances_train.json",
    )
    c.data.val.img_dir, c.data.val.ann_file = (
        f"{DATA}/val",
        f"{DATA}/annotations/instances_val.json",
    )
    # A global batch, split over the devices: 32 steps an epoch on 1 GPU, 8 or a TPU host
    # alike (per device it would be 16 x devices, too few steps for the warm-up).
    c.device.global_batch_size = 16
    c.device.batch_size_per_device = 0
    c.device.workers = 2
    c.schedule.total_epochs = 8
    c.schedule.lr_schedule.T_max = 8
    c.schedule.warmup.steps = 30
    c.schedule.val_intervals = 2
    c.checkpoint.every_steps = 64
    c.log.interval = 8
    return c
