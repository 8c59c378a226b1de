"""NanoDet-Plus-m at 416x416 on a YOLO-format dataset (NanoDet's
config/nanodet-plus-m_416-yolo.yml): COCO's images with one ``.txt`` of normalised
``class cx cy w h`` rows per image, in the image folder itself.
"""

from nanodet_jax.config.defaults import nanodet_plus_config


def get_config():
    c = nanodet_plus_config(model_size="1.0x", input_size=416)
    c.name = "nanodet-plus-m_416-yolo"
    for role in ("train", "val"):
        split = c.data[role]
        split.name = "YoloDataset"
        split.ann_file = split.img_dir  # the labels sit beside the images
        # A YOLO label file holds class indices only: the names come from the config.
        split.class_names = list(c.class_names)
    return c
