"""Detector architectures, selected by ``model.arch.name``; see ``base.py`` for the protocol."""

from nanodet_jax.models.detectors.base import Detector
from nanodet_jax.models.detectors.fcos import FCOS
from nanodet_jax.models.detectors.nanodet_plus import NanoDetPlus
from nanodet_jax.models.detectors.one_stage import OneStageDetector
from nanodet_jax.registry import Registry

DETECTORS: Registry[type[Detector]] = Registry(
    "model.arch", {"NanoDetPlus": NanoDetPlus, "OneStageDetector": OneStageDetector, "FCOS": FCOS}
)
