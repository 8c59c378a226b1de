"""The detector protocol: what training, evaluation, conversion and export ask of an
architecture. Every architecture subclasses :class:`Detector` and is registered in
``nanodet_jax.models.detectors.DETECTORS`` under its config name (``model.arch.name``).

The generic machinery only ever calls what is defined here:

* ``from_config`` builds the modules (``build_model``);
* ``__call__`` is inference: normalised NHWC images -> raw outputs (float32);
* ``decode`` turns raw outputs into boxes and per-class scores for the shared NMS
  (``evaluation/predictor.py``);
* ``phase`` names the training phase of an epoch; each phase is one compiled train
  step (``training/trainer.py``), so a phase may change the graph (NanoDet-Plus stops
  the AGM's gradients after ``detach_epoch``);
* ``loss`` is the training objective inside that step: images and padded ground truth
  -> total loss and named terms;
* ``forward_all`` runs every branch, training-only ones included, for BatchNorm
  statistics (``training/bn_recalibration.py``);
* ``CLASS_DEPENDENT`` / ``TRAINING_ONLY`` name parameters by prefix: the layers
  re-initialised when fine-tuning to another class count, and the branches an
  inference checkpoint lacks (``weights/pytorch.py``, ``cli/train.py``);
* ``NUM_CLASSES_FIELDS`` are the config fields a new class count must change;
* ``imagenet_backbone`` is the module an ImageNet checkpoint (``backbone.pretrain``)
  loads into (``models/backbones/pretrained.py``): ``backbone`` unless the detector
  wraps it (FCOS: ``backbone.body``);
* ``onnx_graph`` writes the inference graph with ``deploy/onnx_graph.py``'s emitters;
  ``onnx_decode`` describes its output's decoding for hosts without this package.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import jax
from flax import nnx

Targets = Mapping[str, jax.Array]  # gt_boxes [B, M, 4], gt_labels [B, M], gt_mask [B, M]


class Detector(nnx.Module):
    """Base of every architecture; subclasses set ``num_classes`` and implement the rest."""

    CLASS_DEPENDENT: ClassVar[tuple[str, ...]] = ()
    TRAINING_ONLY: ClassVar[tuple[str, ...]] = ()
    NUM_CLASSES_FIELDS: ClassVar[tuple[str, ...]] = ("model.arch.head.num_classes",)
    num_classes: int

    @classmethod
    def from_config(
        cls, arch: dict[str, Any], *, with_training_branches: bool | None, rngs: nnx.Rngs
    ) -> Detector:
        """Build from ``model.arch`` (a plain dict, ``name`` removed). ``None`` means:
        build the training-only branches when the config defines them."""
        return cls(**arch, rngs=rngs)

    @property
    def has_training_branches(self) -> bool:
        return False

    @property
    def num_label_classes(self) -> int:
        """How many dataset labels the model trains on (``0 .. n - 1``); the class count
        unless the detector maps labels to other outputs (FCOS's ``label_map``)."""
        return self.num_classes

    @property
    def imagenet_backbone(self) -> nnx.Module:
        """Where ``model.arch.backbone.pretrain`` (an ImageNet classifier's weights) loads."""
        return self.backbone

    def __call__(self, images: jax.Array) -> jax.Array:
        raise NotImplementedError

    def decode(self, raw: jax.Array, input_hw: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
        """Raw outputs -> boxes ``[B, P, 4]`` (x1, y1, x2, y2 in input pixels, clipped to
        ``input_hw``) and class probabilities ``[B, P, num_classes]``."""
        raise NotImplementedError

    def phase(self, epoch: int) -> str:
        """The training phase of ``epoch`` (a name; one compiled step per name)."""
        return "train"

    def loss(
        self, images: jax.Array, targets: Targets, phase: str
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Total loss and its named terms for normalised NHWC ``images`` (train mode)."""
        raise NotImplementedError

    def forward_all(self, images: jax.Array) -> Any:
        """Every branch's forward pass (BatchNorm recalibration); default: inference."""
        return self(images)

    def onnx_graph(self, graph: Any, image: Any) -> Any:
        """Emit the inference graph: ``image`` is the graph's NCHW input value; return the
        output value, or a dict of them for several named outputs (FCOS)
        (``deploy/onnx_export.py`` names them and checks the model)."""
        raise NotImplementedError(f"{type(self).__name__} has no ONNX export")

    def onnx_decode(self) -> dict[str, Any] | None:
        """For an output ``[B, P, C + 4 * (reg_max + 1)]`` of sigmoid scores and DFL logits:
        ``strides``, ``reg_max`` and ``prior_offset`` (priors at ``(j + offset) * stride``),
        which the export's sidecar JSON carries for ``tools/onnx_predict.py``; None where
        the output is decoded otherwise (FCOS)."""
        return None


def has_prefix(name: str, prefixes: tuple[str, ...]) -> bool:
    return bool(prefixes) and name.startswith(prefixes)
