"""Backbones, selected by ``model.arch.backbone.name``."""

from nanodet_jax.models.backbones.shufflenetv2 import ShuffleNetV2
from nanodet_jax.models.backbones.timm_convnext import TIMMWrapper
from nanodet_jax.registry import Registry

BACKBONES = Registry(
    "model.arch.backbone", {"ShuffleNetV2": ShuffleNetV2, "TIMMWrapper": TIMMWrapper}
)
