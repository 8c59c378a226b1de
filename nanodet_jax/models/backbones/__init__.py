"""Backbones, selected by ``model.arch.backbone.name``."""

from nanodet_jax.models.backbones.custom_csp import CustomCspNet
from nanodet_jax.models.backbones.efficientnet_lite import EfficientNetLite
from nanodet_jax.models.backbones.ghostnet import GhostNet
from nanodet_jax.models.backbones.shufflenetv2 import ShuffleNetV2
from nanodet_jax.registry import Registry

BACKBONES = Registry(
    "model.arch.backbone",
    {
        "ShuffleNetV2": ShuffleNetV2,
        "EfficientNetLite": EfficientNetLite,
        "GhostNet": GhostNet,
        "CustomCspNet": CustomCspNet,
    },
)
