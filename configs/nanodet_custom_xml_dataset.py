"""NanoDet-Plus-m at 320x320 on a Pascal-VOC-style dataset of your own (NanoDet's
config/nanodet_custom_xml_dataset.yml): a template, as NanoDet's file is.

Fill in the image and XML folders and the class names, and set both heads' class count
to the number of names, e.g.::

    --config.data.train.img_dir=... --config.data.train.ann_file=... (and data.val.*)
    "--config.class_names=['cat', 'dog']" "--config.data.train.class_names=['cat', 'dog']"
    "--config.data.val.class_names=['cat', 'dog']"
    --config.model.arch.head.num_classes=2 --config.model.arch.aux_head.num_classes=2
"""

from nanodet_jax.config.defaults import nanodet_plus_config

CLASS_NAMES = ["NAME1", "NAME2", "NAME3", "NAME4", "..."]  # NanoDet's placeholders
FOLDERS = {
    "train": ("TRAIN_IMAGE_FOLDER", "TRAIN_XML_FOLDER"),
    "val": ("VAL_IMAGE_FOLDER", "VAL_XML_FOLDER"),
}


def get_config():
    c = nanodet_plus_config(model_size="1.0x", input_size=320)
    c.name = "nanodet_custom_xml_dataset"
    # Only the names are placeholders: the heads keep NanoDet's template's 80 classes
    # (training stops naming the fields to change when the dataset has another count).
    c.class_names = list(CLASS_NAMES)
    for role, (images, annotations) in FOLDERS.items():
        split = c.data[role]
        split.name = "XMLDataset"
        split.img_dir, split.ann_file = images, annotations
        split.class_names = list(CLASS_NAMES)
        split.keep_ratio = True
    pipeline = c.data.train.pipeline
    pipeline.stretch = [[1.0, 1.0], [1.0, 1.0]]
    pipeline.contrast = [0.8, 1.2]
    pipeline.saturation = [0.8, 1.2]
    c.log.interval = 10
    return c
