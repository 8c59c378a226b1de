"""ImageNet-pretrained backbones, as NanoDet starts them.

NanoDet's ShuffleNetV2, ResNet and EfficientNet-Lite (``pretrain=True``, their default)
download ImageNet weights and load them with ``load_state_dict(strict=False)``:
torchvision's files for the first two, and for EfficientNet-Lite the
``efficientnet_lite<n>.pth`` releases of RangiLyu/EfficientNet-Lite (its classifier's keys:
``stem.*``, ``blocks.<stage>.<block>.*`` as here, plus the ``head.*`` conv and ``fc.*``,
which NanoDet's backbone lacks). (Its MobileNetV2, RepVGG and CustomCspNet have no
``pretrain``: they always start from random weights.) Here the config field
``model.arch.backbone.pretrain`` selects them:

* ``None`` / ``False`` (our default): random init, NanoDet's ``pretrain=False``.
* ``True``: the family's file for the model size (ResNet: depth, EfficientNet-Lite: name)
  from the torch hub cache
  (``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch/hub/checkpoints``), where
  NanoDet's download puts it; nothing is downloaded.
* a path: that file (e.g. ``shufflenetv2_x1-5666bf0f80.pth``, ``efficientnet_lite0.pth``).

The mapping is convert.py's rule: torchvision's keys are NanoDet's (``conv1.0.weight``,
``stage2.0.branch1.0.weight``, ``layer1.0.conv1.weight`` ...), which are our backbone's
variable paths. What NanoDet leaves out is ignored: ``fc.*`` (the classifier) and, for
ShuffleNetV2, ``conv5.*`` (torchvision's last conv is a top-level module, NanoDet's
optional one lives at ``stage4.conv5``, so its ``strict=False`` load never fills it; our
backbone has no conv5). Unlike NanoDet's
``strict=False``, anything else missing, unexpected or mis-shaped stops the load with one
:class:`~nanodet_jax.weights.pytorch.WeightMismatchError` listing every key. Only
``num_batches_tracked`` may be absent (checkpoints older than PyTorch 0.4.1 lack it; it
does not affect the output). train.py applies this when training from scratch, not
when ``init_from`` or a resumed checkpoint provides the weights.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from nanodet_jax.models.backbones.efficientnet_lite import EfficientNetLite
from nanodet_jax.models.backbones.resnet import ResNet
from nanodet_jax.models.backbones.shufflenetv2 import ShuffleNetV2
from nanodet_jax.weights.pytorch import (
    LoadReport,
    extract_state_dict,
    load_torch_weights,
    model_variables,
    read_torch_file,
)

log = logging.getLogger("nanodet_jax")

# torchvision's ImageNet checkpoints (the files NanoDet's model_urls point at).
TORCHVISION_URL = "https://download.pytorch.org/models/"
TORCHVISION_FILES = {
    "0.5x": "shufflenetv2_x0.5-f707e7126e.pth",
    "1.0x": "shufflenetv2_x1-5666bf0f80.pth",
    "1.5x": "shufflenetv2_x1_5-3c479a10.pth",
    "2.0x": "shufflenetv2_x2_0-8be3c8ee.pth",
}
RESNET_FILES = {
    18: "resnet18-5c106cde.pth",
    34: "resnet34-333f7ec4.pth",
    50: "resnet50-19c8e357.pth",
    101: "resnet101-5d3b4d8f.pth",
    152: "resnet152-b121ed2d.pth",
}
EFFICIENTNET_LITE_URL = "https://github.com/RangiLyu/EfficientNet-Lite/releases/download/v1.0/"
IGNORED_PREFIXES = ("fc.", "conv5.")
OPTIONAL_SUFFIX = "num_batches_tracked"
CONFIG_FIELD = "model.arch.backbone.pretrain"

Weights = bool | str | os.PathLike | Mapping[str, Any] | None


@dataclasses.dataclass(frozen=True)
class Family:
    """What differs between the backbones NanoDet starts from ImageNet."""

    name: str
    cls: type
    variant_attr: str  # the backbone attribute that picks the file (model_size, depth, ...)
    files: Mapping[Any, str]
    ignored_prefixes: tuple[str, ...]
    origin: str = "torchvision's"  # whose files, for messages
    url: str = TORCHVISION_URL

    def describe(self, variant: Any) -> str:
        return f"{self.name} {variant}" if self.name != "ResNet" else f"ResNet-{variant}"


FAMILIES = {
    "ShuffleNetV2": Family(
        "ShuffleNetV2", ShuffleNetV2, "model_size", TORCHVISION_FILES, IGNORED_PREFIXES
    ),
    "ResNet": Family("ResNet", ResNet, "depth", RESNET_FILES, ("fc.",)),
    "EfficientNetLite": Family(
        "EfficientNet-Lite",
        EfficientNetLite,
        "model_name",
        {f"efficientnet_lite{i}": f"efficientnet_lite{i}.pth" for i in range(5)},
        ("head.", "fc."),
        origin="RangiLyu/EfficientNet-Lite's",
        url=EFFICIENTNET_LITE_URL,
    ),
}


def family_of(backbone: nnx.Module) -> Family:
    """The ImageNet family of a backbone instance (subclasses included)."""
    for family in FAMILIES.values():
        if isinstance(backbone, family.cls):
            return family
    raise ValueError(
        f"{CONFIG_FIELD}: NanoDet has no ImageNet weights for {type(backbone).__name__} "
        f"(only {', '.join(FAMILIES)}); leave {CONFIG_FIELD} unset"
    )


def torch_hub_checkpoint(model_size: Any, family: Family = FAMILIES["ShuffleNetV2"]) -> str:
    """Where ``torch.hub`` (and so NanoDet's download) keeps a family's file for a variant."""
    import torch.hub

    return os.path.join(torch.hub.get_dir(), "checkpoints", family.files[model_size])


def resolve(
    pretrain: Weights, model_size: Any, family: Family = FAMILIES["ShuffleNetV2"]
) -> str | Mapping[str, Any] | None:
    """The weights a ``pretrain`` value names: None (random init), a path, or the mapping."""
    if pretrain is None or pretrain is False:
        return None
    if pretrain is True:
        path = torch_hub_checkpoint(model_size, family)
        if not os.path.isfile(path):
            file = family.files[model_size]
            raise FileNotFoundError(
                f"{CONFIG_FIELD}=True loads {family.origin} ImageNet "
                f"{family.describe(model_size)} from the torch hub cache, but {path} does not "
                f"exist (nothing is downloaded here). Put {family.url}{file} there, or give "
                f"the file: --config.{CONFIG_FIELD}=/path/to/{file}"
            )
        return path
    if isinstance(pretrain, (str, os.PathLike)):
        return os.path.expanduser(os.fspath(pretrain))
    if isinstance(pretrain, Mapping):
        return pretrain
    raise TypeError(f"{CONFIG_FIELD} must be None, a bool or a path, got {pretrain!r}")


def _hint(state: Mapping[str, Any], wanted: Mapping[str, Any], variant: Any, family: Family) -> str:
    """Closing advice for a mismatch: what kind of file this looks like."""
    expected = (
        f"{CONFIG_FIELD} takes {family.origin} {family.describe(variant)} ImageNet weights "
        f"({family.files[variant]}); {', '.join(p + '*' for p in family.ignored_prefixes)} "
        "are ignored"
    )
    if state and all(k.startswith("backbone.") for k in state):
        return expected + "; this looks like a whole-detector checkpoint: use init_from"
    if not any(k in wanted for k in state):
        return expected + f"; no key of this file is a {family.name} key"
    return expected


def load_pretrained_backbone(
    backbone: nnx.Module, weights: Weights, model_size: str | None = None
) -> LoadReport | None:
    """Load an ImageNet checkpoint of the backbone's family into ``backbone`` in place.

    ``weights`` is a ``pretrain`` value (see the module docstring) or a state_dict
    mapping; ``model_size`` (ResNet: the depth) defaults to the backbone's. Returns None
    for no weights.
    """
    if weights is None or weights is False:
        return None
    family = family_of(backbone)
    model_size = model_size or getattr(backbone, family.variant_attr)
    resolved = resolve(weights, model_size, family)
    if resolved is None:
        return None
    if isinstance(resolved, Mapping):
        source, raw = "a state_dict", resolved
    else:
        source, raw = resolved, read_torch_file(resolved)
    state, _ = extract_state_dict(raw)
    ignored = [k for k in state if k.startswith(family.ignored_prefixes)]
    state = {k: v for k, v in state.items() if k not in ignored}
    if ignored:
        kinds = ", ".join(p + "*" for p in family.ignored_prefixes)
        log.info(f"ImageNet backbone: left out {len(ignored)} tensors ({kinds}) as NanoDet")
    variables = model_variables(backbone)
    hint = _hint(state, variables, model_size, family)
    # Keep the model's own counter where the file has none (loading it back is a no-op);
    # a frozen BatchNorm has none, and drops the file's as torchvision's FrozenBatchNorm2d.
    for k, var in variables.items():
        if k.endswith(OPTIONAL_SUFFIX) and k not in state:
            state[k] = np.asarray(var[...])
    state = {k: v for k, v in state.items() if k in variables or not k.endswith(OPTIONAL_SUFFIX)}
    return load_torch_weights(backbone, state, source=f"ImageNet backbone {source}", hint=hint)


def load_pretrained_for_training(
    model: nnx.Module, config: Any, *, resuming: bool
) -> LoadReport | None:
    """train.py's start point: ``pretrain`` weights into the detector's
    ``imagenet_backbone`` (its ``backbone`` unless it wraps one: FCOS's ``backbone.body``),
    unless the run resumes or ``init_from`` gives every weight (both would overwrite them
    anyway).

    A ``TIMMWrapper`` backbone takes timm's fields instead (``pretrained`` /
    ``checkpoint_path``, see ``timm_convnext.checkpoint_for_training``)."""
    backbone_cfg = config.model.arch.get("backbone") or {}
    timm = backbone_cfg.get("name") == "TIMMWrapper"
    if timm:
        field = "model.arch.backbone.checkpoint_path"
        wanted = bool(backbone_cfg.get("checkpoint_path")) or backbone_cfg.get("pretrained", True)
    else:
        field, pretrain = CONFIG_FIELD, backbone_cfg.get("pretrain")
        wanted = pretrain is not None and pretrain is not False
    if not wanted:
        return None
    if config.get("init_from"):
        log.info(f"{field} not loaded: init_from provides the weights")
        return None
    if resuming:
        log.info(f"{field} not loaded: the run resumes from its checkpoint")
        return None
    if timm:
        from nanodet_jax.models.backbones import timm_convnext

        path = timm_convnext.checkpoint_for_training(backbone_cfg)  # raises for a download
        return timm_convnext.load_timm_checkpoint(model.backbone, path)
    target = getattr(model, "imagenet_backbone", None)
    target = model.backbone if target is None else target
    return load_pretrained_backbone(target, pretrain)
