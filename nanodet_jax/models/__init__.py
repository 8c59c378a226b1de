"""Models: backbones, necks, heads, and the detectors that compose them."""

from __future__ import annotations

import copy
from typing import Any

from flax import nnx

from nanodet_jax.models.detectors import DETECTORS, Detector


def build_model(config: Any, *, with_aux: bool | None = None, seed: int = 0) -> Detector:
    """Build the detector ``model.arch.name`` names from a config (the whole config or its
    ``model`` section).

    ``with_aux`` (the training-only branches, NanoDet-Plus's AGM) defaults to whether the
    config defines them; pass False for an inference-only model. The model is returned
    in eval mode (BatchNorm uses running statistics); call ``model.train()`` to train.
    """
    model_cfg = config.model if hasattr(config, "model") else config
    arch = model_cfg.arch
    arch = arch.to_dict() if hasattr(arch, "to_dict") else copy.deepcopy(dict(arch))
    detector = DETECTORS.get(arch.pop("name", "NanoDetPlus"))
    model = detector.from_config(arch, with_training_branches=with_aux, rngs=nnx.Rngs(seed))
    model.eval()
    return model
