"""Label assigners, selected by ``assigner_cfg.name`` of a head's config.

NanoDet-Plus's ``assigner_cfg`` carries no name (it is always the dynamic soft label
assigner); a name, when given, must be one of these. The legacy GFL heads always use
ATSS (``topk`` 9) on grid cells, with a signature of its own (see ``atss.py``).
``FCOSAssigner`` is torchvision's FCOS matching (``fcos.py``), which the FCOS detector
calls with its anchors.
"""

from nanodet_jax.assigners.atss import assign as atss_assign
from nanodet_jax.assigners.dynamic_soft_label import assign as dynamic_soft_label_assign
from nanodet_jax.assigners.fcos import assign as fcos_assign
from nanodet_jax.registry import Registry

ASSIGNERS = Registry(
    "model.arch.head.assigner_cfg",
    {"DynamicSoftLabelAssigner": dynamic_soft_label_assign, "ATSSAssigner": atss_assign}
    | {"FCOSAssigner": fcos_assign},
)
