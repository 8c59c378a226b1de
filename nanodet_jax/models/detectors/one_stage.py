"""NanoDet's legacy OneStageDetector: backbone -> fpn -> a GFL-style head (GFLHead,
NanoDetHead), one training phase, no auxiliary branch.

Training assigns with ATSS (topk 9, as NanoDet's GFLHead hard-codes) on grid cells of
side ``octave_base_scale * stride`` and trains with the head's GFL objective
(``losses/gfl_legacy.py``). Decoding places priors at cell centres
(``(j + 0.5) * stride``), unlike NanoDet-Plus.
"""

from __future__ import annotations

import copy
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import FrozenConfigDict

from nanodet_jax.assigners.atss import assign, cell_centers, grid_cells
from nanodet_jax.box_ops import distance2bbox, distribution_to_distance
from nanodet_jax.losses.gfl_head import LOSS_TERMS
from nanodet_jax.losses.gfl_legacy import legacy_gfl_losses
from nanodet_jax.models.backbones import BACKBONES
from nanodet_jax.models.detectors.base import Detector, Targets
from nanodet_jax.models.heads import HEAD_TRAINING_KEYS, HEADS
from nanodet_jax.models.necks import NECKS
from nanodet_jax.precision import at_least_f32

ATSS_TOPK = 9  # NanoDet's GFLHead builds ATSSAssigner(topk=9) whatever the config says


def _to_dict(cfg: Any) -> dict:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else copy.deepcopy(dict(cfg))


class OneStageDetector(Detector):
    """``model(images)`` -> raw head output ``[B, P, num_classes + 4 * (reg_max + 1)]``."""

    CLASS_DEPENDENT = ("head.gfl_cls.",)
    NUM_CLASSES_FIELDS = ("model.arch.head.num_classes",)

    def __init__(self, backbone: Any, head: Any, fpn: Any | None = None, *, rngs: nnx.Rngs):
        head = _to_dict(head)
        self.backbone = BACKBONES.build(_to_dict(backbone), rngs=rngs)
        self.fpn = NECKS.build(_to_dict(fpn), rngs=rngs) if fpn is not None else None
        self.head = HEADS.build(head, drop=HEAD_TRAINING_KEYS, rngs=rngs)
        if not hasattr(self.head, "octave_base_scale"):
            raise ValueError(f"{head.get('name')} is not a legacy GFL head (GFLHead, NanoDetHead)")
        self.num_classes = self.head.num_classes
        self.reg_max = self.head.reg_max
        self.strides = self.head.strides
        self.loss_cfg = FrozenConfigDict(head.get("loss", {}))

    def features(self, images: jax.Array) -> Any:
        feats = self.backbone(images)
        return self.fpn(feats) if self.fpn is not None else feats

    def __call__(self, images: jax.Array) -> jax.Array:
        return at_least_f32(self.head(self.features(images)))

    def loss(
        self, images: jax.Array, targets: Targets, phase: str
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        if phase != "train":
            raise ValueError(f"OneStageDetector has the single phase 'train', not {phase!r}")
        return one_stage_loss(
            self(images), targets, tuple(images.shape[1:3]), self.strides,
            self.head.octave_base_scale, self.loss_cfg, self.num_classes, self.reg_max,
        )  # fmt: skip

    def decode(self, raw: jax.Array, input_hw: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
        """GFLHead's ``get_bboxes`` before NMS: boxes clipped to the input, sigmoid scores."""
        priors = jnp.asarray(cell_centers(input_hw, self.strides))
        if raw.shape[-2] != priors.shape[0]:
            raise ValueError(f"{raw.shape[-2]} priors in raw, {priors.shape[0]} for {input_hw}")
        distances = distribution_to_distance(raw[..., self.num_classes :], self.reg_max)
        boxes = distance2bbox(priors[:, :2], distances * priors[:, 2:3], max_shape=tuple(input_hw))
        return boxes, jax.nn.sigmoid(raw[..., : self.num_classes])

    def onnx_decode(self) -> dict[str, Any]:
        # GFLHead measures distances from cell centres (decode's cell_centers).
        return {"strides": list(self.strides), "reg_max": self.reg_max, "prior_offset": 0.5}

    def onnx_graph(self, graph: Any, image: Any) -> Any:
        value = graph.emit(image, self.backbone)
        if self.fpn is not None:
            value = graph.emit(value, self.fpn)
        return graph.emit(value, self.head)


def one_stage_loss(
    raw: jax.Array,
    targets: Targets,
    input_hw: tuple[int, int],
    strides: tuple[int, ...],
    octave_base_scale: float,
    loss_cfg: Any,
    num_classes: int,
    reg_max: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total legacy GFL loss and its terms from the raw head output and padded gts."""
    cells, counts = grid_cells(input_hw, strides, octave_base_scale)
    cell_strides = jnp.asarray(cell_centers(input_hw, strides)[:, 2])
    assignment = assign(
        cells, counts, targets["gt_boxes"], targets["gt_labels"], targets["gt_mask"],
        num_classes, ATSS_TOPK,
    )  # fmt: skip
    terms = legacy_gfl_losses(
        raw, jnp.asarray(cells), cell_strides, assignment, loss_cfg, num_classes, reg_max
    )
    return sum(terms[k] for k in LOSS_TERMS), terms
