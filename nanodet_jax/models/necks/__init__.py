"""Feature-pyramid necks, selected by ``model.arch.fpn.name`` (NanoDet's ``fpn`` key)."""

from nanodet_jax.models.necks.fpn import FPN
from nanodet_jax.models.necks.fpn_p6p7 import FeaturePyramidNetwork
from nanodet_jax.models.necks.ghost_pan import GhostPAN
from nanodet_jax.models.necks.pan import PAN
from nanodet_jax.models.necks.tan import TAN
from nanodet_jax.registry import Registry

NECKS = Registry(
    "model.arch.fpn",
    {
        "FPN": FPN,
        "PAN": PAN,
        "TAN": TAN,
        "GhostPAN": GhostPAN,
        # torchvision's FPN with P6/P7 (FCOS)
        "FeaturePyramidNetwork": FeaturePyramidNetwork,
    },
)
