"""NanoDet-Plus: ShuffleNetV2 -> GhostPAN -> NanoDetPlusHead, and the training-only Assign
Guidance Module (a second PAN and a SimpleConvHead) whose predictions assign the labels
both heads train on.

Training phases: before ``detach_epoch`` ("joint") the AGM's loss also trains the
backbone and the main PAN; from then on ("detached") its inputs are cut from the graph.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import FrozenConfigDict

from nanodet_jax.assigners import ASSIGNERS
from nanodet_jax.assigners.dynamic_soft_label import Assignment
from nanodet_jax.box_ops import center_priors
from nanodet_jax.evaluation.postprocess import decode
from nanodet_jax.losses.gfl_head import LOSS_TERMS, decode_predictions, head_losses
from nanodet_jax.models.backbones import BACKBONES
from nanodet_jax.models.detectors.base import Detector, Targets
from nanodet_jax.models.heads import HEAD_TRAINING_KEYS, HEADS
from nanodet_jax.models.necks import NECKS
from nanodet_jax.precision import at_least_f32

DEFAULT_ASSIGNER = {"name": "DynamicSoftLabelAssigner", "topk": 13, "iou_factor": 3.0}


def _to_dict(cfg: Any) -> dict:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else copy.deepcopy(dict(cfg))


class NanoDetPlus(Detector):
    """``model(images)`` runs inference on NHWC float32 images normalised as NanoDet does
    and returns the raw head output ``[B, num_priors, num_classes + 4*(reg_max+1)]``."""

    CLASS_DEPENDENT = ("head.gfl_cls.", "aux_head.gfl_cls.")
    TRAINING_ONLY = ("aux_fpn.", "aux_head.")
    NUM_CLASSES_FIELDS = ("model.arch.head.num_classes", "model.arch.aux_head.num_classes")

    def __init__(
        self,
        backbone: Any,
        fpn: Any,
        head: Any,
        aux_head: Any | None = None,
        detach_epoch: int = 0,
        *,
        rngs: nnx.Rngs,
    ):
        head = _to_dict(head)
        self.backbone = BACKBONES.build(_to_dict(backbone), rngs=rngs)
        self.fpn = NECKS.build(_to_dict(fpn), rngs=rngs)
        self.head = HEADS.build(head, drop=HEAD_TRAINING_KEYS, rngs=rngs)
        self.detach_epoch = int(detach_epoch)
        if aux_head is not None:
            # NanoDet deep-copies the initialised fpn; a freshly initialised twin is
            # equivalent for training (its values are overwritten by checkpoints anyway).
            self.aux_fpn = NECKS.build(_to_dict(fpn), rngs=rngs)
            self.aux_head = HEADS.build(_to_dict(aux_head), drop=HEAD_TRAINING_KEYS, rngs=rngs)
        else:
            self.aux_fpn = None
            self.aux_head = None
        self.num_classes = self.head.num_classes
        self.reg_max = self.head.reg_max
        self.strides = self.head.strides
        # Hashable, immutable: part of the graph definition the train step is compiled for.
        self.loss_cfg = FrozenConfigDict(head.get("loss", {}))
        assigner = {**DEFAULT_ASSIGNER, **(head.get("assigner_cfg") or {})}
        ASSIGNERS.get(assigner["name"])  # an unknown name fails at build time
        if assigner["name"] != DEFAULT_ASSIGNER["name"]:
            # The AGM's objective is built around the soft label assignment, as NanoDet's.
            raise ValueError(
                f"NanoDetPlus assigns with {DEFAULT_ASSIGNER['name']}, not {assigner['name']} "
                "(model.arch.head.assigner_cfg.name)"
            )
        self.assigner_cfg = FrozenConfigDict(assigner)

    @classmethod
    def from_config(
        cls, arch: dict[str, Any], *, with_training_branches: bool | None, rngs: nnx.Rngs
    ) -> NanoDetPlus:
        aux_head = arch.pop("aux_head", None)
        if with_training_branches and aux_head is None:
            raise ValueError("with_aux=True but the config has no model.arch.aux_head")
        if with_training_branches is False:
            aux_head = None
        return cls(**arch, aux_head=aux_head, rngs=rngs)

    @property
    def has_aux(self) -> bool:
        return self.aux_head is not None

    @property
    def has_training_branches(self) -> bool:
        return self.has_aux

    def __call__(self, images: jax.Array) -> jax.Array:
        return at_least_f32(self.head(self.fpn(self.backbone(images))))

    def forward_train(self, images: jax.Array, detach_aux: bool) -> tuple[jax.Array, jax.Array]:
        """Both heads' raw outputs. ``detach_aux`` (epoch >= detach_epoch) stops the aux
        branch's gradient into the backbone and the main PAN, as NanoDet's forward_train."""
        if not self.has_aux:
            raise ValueError("forward_train needs a model built with an aux_head")
        feats = self.backbone(images)
        fpn_feats = self.fpn(feats)
        if detach_aux:
            aux_in = [jax.lax.stop_gradient(f) for f in feats]
            main = [jax.lax.stop_gradient(f) for f in fpn_feats]
        else:
            aux_in, main = list(feats), list(fpn_feats)
        aux_feats = self.aux_fpn(aux_in)
        dual = [jnp.concatenate([m, a], axis=-1) for m, a in zip(main, aux_feats)]
        head_out = at_least_f32(self.head(fpn_feats))
        aux_out = at_least_f32(self.aux_head(dual))
        return head_out, aux_out

    def forward_all(self, images: jax.Array) -> Any:
        return self.forward_train(images, detach_aux=False) if self.has_aux else self(images)

    def phase(self, epoch: int) -> str:
        return "detached" if epoch >= self.detach_epoch else "joint"

    def loss(
        self, images: jax.Array, targets: Targets, phase: str
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        if phase not in ("joint", "detached"):
            raise ValueError(f"NanoDetPlus has phases joint and detached, not {phase!r}")
        head_out, aux_out = self.forward_train(images, detach_aux=phase == "detached")
        priors = center_priors(images.shape[1:3], self.strides)
        return nanodet_plus_loss(
            head_out, aux_out, targets["gt_boxes"], targets["gt_labels"], targets["gt_mask"],
            priors, self.loss_cfg, self.num_classes, self.reg_max, self.assigner_cfg,
        )  # fmt: skip

    def decode(self, raw: jax.Array, input_hw: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
        return decode(raw, input_hw, self.num_classes, self.reg_max, self.strides)

    def onnx_decode(self) -> dict[str, Any]:
        # NanoDet-Plus measures distances from the top-left corner of each cell.
        return {"strides": list(self.strides), "reg_max": self.reg_max, "prior_offset": 0.0}

    def onnx_graph(self, graph: Any, image: Any) -> Any:
        return graph.emit(graph.emit(graph.emit(image, self.backbone), self.fpn), self.head)


def assign_from_aux(
    aux_out: jax.Array,
    gt_boxes: jax.Array,
    gt_labels: jax.Array,
    gt_mask: jax.Array,
    priors: jax.Array,
    num_classes: int,
    reg_max: int,
    assigner_cfg: Mapping[str, Any] | None = None,
) -> Assignment:
    """The assignment NanoDet-Plus trains both heads with: the aux head's detached
    class logits and decoded boxes against the ground truth, by the assigner
    ``assigner_cfg`` names (NanoDet-Plus: the dynamic soft label one, ``topk`` 13)."""
    options = {**DEFAULT_ASSIGNER, **dict(assigner_cfg or {})}
    assigner = ASSIGNERS.get(options.pop("name"))
    aux_cls, _, aux_boxes = decode_predictions(
        jax.lax.stop_gradient(aux_out), priors, num_classes, reg_max
    )
    return assigner(
        aux_cls, priors, aux_boxes, gt_boxes, gt_labels, gt_mask, num_classes, reg_max,
        topk=int(options.pop("topk")), iou_factor=float(options.pop("iou_factor")), **options,
    )  # fmt: skip


def nanodet_plus_loss(
    head_out: jax.Array,
    aux_out: jax.Array,
    gt_boxes: jax.Array,
    gt_labels: jax.Array,
    gt_mask: jax.Array,
    priors: Any,
    loss_cfg: Any,
    num_classes: int,
    reg_max: int,
    assigner_cfg: Mapping[str, Any] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total NanoDet-Plus loss and its terms (NanoDet's ``loss_states`` names).

    ``head_out``/``aux_out`` are the raw outputs of ``forward_train``; ground truth is
    padded to ``M`` boxes per image (``gt_mask`` marks real ones). Returns ``(total,
    terms)`` with terms ``loss_qfl, loss_bbox, loss_dfl`` and their ``aux_`` versions;
    total = main-head terms + aux-head terms.
    """
    priors = jnp.asarray(priors, jnp.float32)
    targets = assign_from_aux(
        aux_out, gt_boxes, gt_labels, gt_mask, priors, num_classes, reg_max, assigner_cfg
    )
    main = head_losses(head_out, priors, targets, loss_cfg, num_classes, reg_max)
    aux = head_losses(aux_out, priors, targets, loss_cfg, num_classes, reg_max)
    terms = {**main, **{f"aux_{k}": v for k, v in aux.items()}}
    total = sum(main[k] for k in LOSS_TERMS) + sum(aux[k] for k in LOSS_TERMS)
    return total, terms
