"""ImageNet-pretrained ShuffleNetV2 backbones from torchvision checkpoints, as NanoDet starts.

NanoDet's ShuffleNetV2 (``pretrain=True``, its default) downloads torchvision's ImageNet
weights and loads them with ``load_state_dict(strict=False)``. Here the config field
``model.arch.backbone.pretrain`` selects them:

* ``None`` / ``False`` (our default): random init, NanoDet's ``pretrain=False``.
* ``True``: torchvision's file for the model size from the torch hub cache
  (``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch/hub/checkpoints``), where
  NanoDet's download puts it; nothing is downloaded.
* a path: that torchvision-format ``.pth`` (e.g. ``shufflenetv2_x1-5666bf0f80.pth``).

The mapping is convert.py's rule: torchvision's keys are NanoDet's (``conv1.0.weight``,
``stage2.0.branch1.0.weight``, ...), which are our backbone's variable paths. What NanoDet
leaves out is ignored: ``fc.*`` (the classifier) and ``conv5.*`` (torchvision's last conv
is a top-level module, NanoDet's optional one lives at ``stage4.conv5``, so its
``strict=False`` load never fills it; our backbone has no conv5). Unlike NanoDet's
``strict=False``, anything else missing, unexpected or mis-shaped stops the load with one
:class:`~nanodet_jax.weights.pytorch.WeightMismatchError` listing every key. Only
``num_batches_tracked`` may be absent (checkpoints older than PyTorch 0.4.1 lack it; it
does not affect the output). train.py applies this when training from scratch, not
when ``init_from`` or a resumed checkpoint provides the weights.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

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
IGNORED_PREFIXES = ("fc.", "conv5.")
OPTIONAL_SUFFIX = "num_batches_tracked"
CONFIG_FIELD = "model.arch.backbone.pretrain"

Weights = bool | str | os.PathLike | Mapping[str, Any] | None


def torch_hub_checkpoint(model_size: str) -> str:
    """Where ``torch.hub`` (and so NanoDet's download) keeps torchvision's file for a size."""
    import torch.hub

    return os.path.join(torch.hub.get_dir(), "checkpoints", TORCHVISION_FILES[model_size])


def resolve(pretrain: Weights, model_size: str) -> str | Mapping[str, Any] | None:
    """The weights a ``pretrain`` value names: None (random init), a path, or the mapping."""
    if pretrain is None or pretrain is False:
        return None
    if pretrain is True:
        path = torch_hub_checkpoint(model_size)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{CONFIG_FIELD}=True loads torchvision's ImageNet ShuffleNetV2 {model_size} "
                f"from the torch hub cache, but {path} does not exist (nothing is downloaded "
                f"here). Put {TORCHVISION_URL}{TORCHVISION_FILES[model_size]} there, or give "
                f"the file: --config.{CONFIG_FIELD}=/path/to/{TORCHVISION_FILES[model_size]}"
            )
        return path
    if isinstance(pretrain, (str, os.PathLike)):
        return os.path.expanduser(os.fspath(pretrain))
    if isinstance(pretrain, Mapping):
        return pretrain
    raise TypeError(f"{CONFIG_FIELD} must be None, a bool or a path, got {pretrain!r}")


def _hint(state: Mapping[str, Any], wanted: Mapping[str, Any], model_size: str) -> str:
    """Closing advice for a mismatch: what kind of file this looks like."""
    expected = (
        f"{CONFIG_FIELD} takes torchvision's ShuffleNetV2 {model_size} ImageNet weights "
        f"({TORCHVISION_FILES[model_size]}); {', '.join(p + '*' for p in IGNORED_PREFIXES)} "
        "are ignored"
    )
    if state and all(k.startswith("backbone.") for k in state):
        return expected + "; this looks like a whole-detector checkpoint: use init_from"
    if not any(k in wanted for k in state):
        return expected + "; no key of this file is a ShuffleNetV2 key"
    return expected


def load_pretrained_backbone(
    backbone: nnx.Module, weights: Weights, model_size: str | None = None
) -> LoadReport | None:
    """Load a torchvision-format ShuffleNetV2 checkpoint into ``backbone`` in place.

    ``weights`` is a ``pretrain`` value (see the module docstring) or a state_dict
    mapping; ``model_size`` defaults to the backbone's. Returns None for no weights.
    """
    model_size = model_size or backbone.model_size
    resolved = resolve(weights, model_size)
    if resolved is None:
        return None
    if isinstance(resolved, Mapping):
        source, raw = "a state_dict", resolved
    else:
        source, raw = resolved, read_torch_file(resolved)
    state, _ = extract_state_dict(raw)
    ignored = [k for k in state if k.startswith(IGNORED_PREFIXES)]
    state = {k: v for k, v in state.items() if k not in ignored}
    if ignored:
        log.info(f"ImageNet backbone: left out {len(ignored)} tensors (fc.*, conv5.*) as NanoDet")
    variables = model_variables(backbone)
    hint = _hint(state, variables, model_size)
    # Keep the model's own counter where the file has none (loading it back is a no-op).
    for k, var in variables.items():
        if k.endswith(OPTIONAL_SUFFIX) and k not in state:
            state[k] = np.asarray(var[...])
    return load_torch_weights(backbone, state, source=f"ImageNet backbone {source}", hint=hint)


def load_pretrained_for_training(
    model: nnx.Module, config: Any, *, resuming: bool
) -> LoadReport | None:
    """train.py's start point: ``pretrain`` weights into ``model.backbone``, unless the run
    resumes or ``init_from`` gives every weight (both would overwrite them anyway).

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
    return load_pretrained_backbone(model.backbone, pretrain)
