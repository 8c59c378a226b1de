"""Detection heads, selected by ``model.arch.head.name`` (and ``aux_head.name``)."""

from nanodet_jax.models.heads.fcos_head import FCOSHead
from nanodet_jax.models.heads.gfl_head import GFLHead
from nanodet_jax.models.heads.nanodet_head import NanoDetHead
from nanodet_jax.models.heads.nanodet_plus_head import NanoDetPlusHead
from nanodet_jax.models.heads.simple_conv_head import SimpleConvHead
from nanodet_jax.registry import Registry

HEADS = Registry(
    "model.arch.head",
    {
        "NanoDetPlusHead": NanoDetPlusHead,
        "SimpleConvHead": SimpleConvHead,
        "GFLHead": GFLHead,
        "NanoDetHead": NanoDetHead,
        "FCOSHead": FCOSHead,
    },
)
# Keys of a head's config that configure its training objective, not its layers.
HEAD_TRAINING_KEYS = ("loss", "assigner_cfg")
