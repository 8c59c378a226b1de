"""Backbones, selected by ``model.arch.backbone.name``."""

from nanodet_jax.models.backbones.custom_csp import CustomCspNet
from nanodet_jax.models.backbones.efficientnet_lite import EfficientNetLite
from nanodet_jax.models.backbones.ghostnet import GhostNet
from nanodet_jax.models.backbones.mobilenetv2 import MobileNetV2
from nanodet_jax.models.backbones.repvgg import RepVGG
from nanodet_jax.models.backbones.resnet import ResNet
from nanodet_jax.models.backbones.shufflenetv2 import ShuffleNetV2
from nanodet_jax.models.backbones.timm_convnext import TIMMWrapper
from nanodet_jax.registry import Registry

BACKBONES = Registry(
    "model.arch.backbone",
    {
        "ShuffleNetV2": ShuffleNetV2,
        "ResNet": ResNet,
        "MobileNetV2": MobileNetV2,
        "RepVGG": RepVGG,
        "TIMMWrapper": TIMMWrapper,
        "EfficientNetLite": EfficientNetLite,
        "GhostNet": GhostNet,
        "CustomCspNet": CustomCspNet,
    },
)
