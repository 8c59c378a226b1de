"""FCOS as torchvision builds it (``models/detection/fcos.py``): a ResNet body (C3-C5),
torchvision's FPN with P6/P7 and the FCOS head, with torchvision's parameter names, so a
``fcos_resnet50_fpn`` state_dict loads by the usual rule (``weights/pytorch.py``).

The protocol's members:

* ``model(images)`` -> torchvision's raw head outputs, as a dict ``{"cls_logits": [B, N,
  C], "bbox_regression": [B, N, 4], "bbox_ctrness": [B, N, 1]}`` in its point order
  (level, row, column). The generic consumers pass ``__call__``'s result through to
  ``decode`` untouched (predictor) or discard it (BatchNorm recalibration), so a dict
  needs no change to the protocol; the ONNX export writes it as three named outputs
  (``deploy/onnx_fcos.py``).
* ``decode(raw, input_hw)`` is ``FCOS.postprocess_detections`` up to its NMS: points at
  ``(j * stride_w, i * stride_h)`` with ``stride = padded size // grid size`` per axis
  (no half-cell offset), score ``sqrt(sigmoid(cls) * sigmoid(ctr))``, only the
  ``topk_candidates`` best (pair) scores above ``score_thresh`` of each level kept (the
  others are zeroed, so the shared NMS never sees them), ``BoxLinearCoder(normalize_by_size
  =True)`` with the level's anchor size, boxes clipped to ``input_hw``. torchvision clips
  to each image's size before batch padding; here the canvas is the bound. With a
  ``label_map`` the scores returned are its columns, in dataset-label order (after the
  top-k, which ranks all logits as torchvision does), so detections carry dataset labels
  and a logit no label maps to ("__background__", "N/A") never becomes one.
* ``loss(images, targets, "train")`` (one phase) is ``FCOS.compute_loss`` on the padded
  batch: the matching of ``assigners/fcos.py`` on the same anchors as ``decode``, the
  terms ``classification``, ``bbox_regression``, ``bbox_ctrness`` of ``losses/fcos.py``
  (each over max(1, positives of the batch)); the total is their sum.

Labels. torchvision's FCOS takes a target label as the index of its class logit; its
COCO model has 91 logits indexed by COCO category id (``configs/fcos_r50_fpn.py``: the
class list's index is the category id, 0 "__background__" and the skipped ids "N/A"
never trained). Our datasets give contiguous labels ``0 .. n - 1`` (COCO: the position
of the category id among the sorted ids), so ``label_map`` gives the logit index of each
dataset label (that config: the 80 COCO category ids); ``None`` (default) means the
labels are the logit indices, as for a model whose class list is the dataset's
(``configs/fcos_quickstart.py``).

Options mirroring ``fcos_resnet50_fpn``: ``norm_layer`` "FrozenBN" (its pretrained
models, the layout of the COCO checkpoint) or "BN" (``weights=None``: trainable
BatchNorm, with ``num_batches_tracked``); ``trainable_backbone_layers`` (0-5, default 3:
``conv1`` and ``layer1`` frozen). torchvision's input is RGB in [0, 1] normalised by the
ImageNet mean / std; our pipeline delivers normalised BGR, so a config for the pipeline
sets ``input_channel_order="BGR"`` and the channels are reversed before the backbone.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from nanodet_jax.assigners.fcos import CENTER_SAMPLING_RADIUS, assign, scale_ranges
from nanodet_jax.losses.fcos import LOSS_TERMS, fcos_losses
from nanodet_jax.models.backbones import BACKBONES
from nanodet_jax.models.detectors.base import Detector, Targets
from nanodet_jax.models.frozen import freeze, freeze_batch_norms
from nanodet_jax.models.heads import HEAD_TRAINING_KEYS, HEADS
from nanodet_jax.models.necks import NECKS
from nanodet_jax.precision import at_least_f32

# torchvision's _resnet_fpn_extractor: the body's top-level modules, last stage first.
BODY_LAYERS = ("layer4", "layer3", "layer2", "layer1", "conv1")


def _to_dict(cfg: Any) -> dict:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else copy.deepcopy(dict(cfg))


class BackboneWithFPN(nnx.Module):
    """torchvision's ``BackboneWithFPN``: ``body`` (the ResNet's C3-C5) then ``fpn``."""

    def __init__(self, body: nnx.Module, fpn: nnx.Module):
        self.body = body
        self.fpn = fpn

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        return self.fpn(self.body(x))


def freeze_body_layers(body: nnx.Module, trainable_layers: int) -> None:
    """Freeze what ``_resnet_fpn_extractor(trainable_layers=...)`` freezes: every top-level
    module but the last ``trainable_layers`` of conv1, layer1..4 (bn1 trains only at 5)."""
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_backbone_layers must be in [0, 5], got {trainable_layers}")
    train = set(BODY_LAYERS[:trainable_layers]) | ({"bn1"} if trainable_layers == 5 else set())
    for name in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"):
        if name not in train:
            module = getattr(body, name)
            if isinstance(module, nnx.Module):
                freeze(module)
            else:  # conv1 is a module; a bare variable would be a different body
                raise TypeError(f"body.{name} is not a module")


def level_grids(input_hw: tuple[int, int], num_levels: int) -> list[tuple[int, int]]:
    """Grid sizes of P3.. for a padded input: every stride-2 layer of the ResNet and of the
    extra block (kernel 3 / pad 1, or kernel 1 / pad 0) maps a side n to ceil(n / 2)."""
    h, w = input_hw
    return [(-(-h // 2 ** (3 + i)), -(-w // 2 ** (3 + i))) for i in range(num_levels)]


def level_points(
    input_hw: tuple[int, int], anchor_sizes: Sequence[float]
) -> list[tuple[np.ndarray, float]]:
    """Per level: the points ``[h * w, 2]`` (x, y) and the level's anchor size."""
    out = []
    for (gh, gw), size in zip(level_grids(input_hw, len(anchor_sizes)), anchor_sizes):
        sh, sw = input_hw[0] // gh, input_hw[1] // gw
        ys, xs = np.meshgrid(np.arange(gh) * sh, np.arange(gw) * sw, indexing="ij")
        out.append((np.stack([xs.ravel(), ys.ravel()], -1).astype(np.float32), float(size)))
    return out


def _keep_top_k(scores: jax.Array, score_thresh: float, k: int) -> jax.Array:
    """Zero all but the ``k`` best ``(point, class)`` scores above the threshold, per image
    (scores ``[B, n, C]``)."""
    b, n, c = scores.shape
    flat = scores.reshape(b, n * c)
    valid = flat > np.float32(score_thresh)
    k = min(k, n * c)
    _, idx = lax.top_k(jnp.where(valid, flat, -jnp.inf), k)
    chosen = jnp.zeros_like(valid).at[jnp.arange(b)[:, None], idx].set(True)
    return jnp.where(chosen & valid, flat, 0.0).reshape(b, n, c)


class FCOS(Detector):
    """``model(images)`` -> ``{"cls_logits", "bbox_regression", "bbox_ctrness"}``."""

    CLASS_DEPENDENT = ("head.classification_head.cls_logits.",)
    NUM_CLASSES_FIELDS = ("model.arch.head.num_classes",)

    def __init__(
        self,
        backbone: Any,
        fpn: Any,
        head: Any,
        norm_layer: str = "FrozenBN",
        trainable_backbone_layers: int = 3,
        anchor_sizes: Sequence[float] = (8, 16, 32, 64, 128),
        score_thresh: float = 0.2,
        topk_candidates: int = 1000,
        input_channel_order: str = "RGB",
        center_sampling_radius: float = CENTER_SAMPLING_RADIUS,
        label_map: Sequence[int] | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        if norm_layer not in ("FrozenBN", "BN"):
            raise ValueError(f"norm_layer must be 'FrozenBN' or 'BN', got {norm_layer!r}")
        if input_channel_order not in ("RGB", "BGR"):
            raise ValueError(f"input_channel_order must be RGB or BGR, got {input_channel_order!r}")
        body = BACKBONES.build(_to_dict(backbone), rngs=rngs)
        if norm_layer == "FrozenBN":
            freeze_batch_norms(body)
        freeze_body_layers(body, trainable_backbone_layers)
        self.backbone = BackboneWithFPN(body, NECKS.build(_to_dict(fpn), rngs=rngs))
        self.head = HEADS.build(_to_dict(head), drop=HEAD_TRAINING_KEYS, rngs=rngs)
        self.num_classes = self.head.num_classes
        self.anchor_sizes = tuple(float(s) for s in anchor_sizes)
        self.score_thresh = float(score_thresh)
        self.topk_candidates = int(topk_candidates)
        self.input_channel_order = input_channel_order
        self.center_sampling_radius = float(center_sampling_radius)
        if label_map is not None:
            label_map = tuple(int(i) for i in label_map)
            if not all(0 <= i < self.num_classes for i in label_map):
                raise ValueError(f"label_map entries must be in [0, {self.num_classes})")
        self.label_map = label_map

    @property
    def imagenet_backbone(self) -> nnx.Module:
        """torchvision's ImageNet ResNet checkpoint (``resnet50-*.pth``) loads into the
        body, as ``fcos_resnet50_fpn(weights_backbone=...)`` initialises it."""
        return self.backbone.body

    @property
    def num_label_classes(self) -> int:
        return self.num_classes if self.label_map is None else len(self.label_map)

    def features(self, images: jax.Array) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
        """(backbone maps C3-C5, pyramid maps P3-P7) of RGB-ordered images."""
        body = self.backbone.body(images)
        return body, self.backbone.fpn(body)

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        if self.input_channel_order == "BGR":
            images = images[..., ::-1]
        outputs = self.head(self.backbone(images))
        return {k: at_least_f32(v) for k, v in outputs.items()}

    def onnx_graph(self, graph: Any, image: Any) -> Any:
        # One emitter for the whole model (deploy/onnx_fcos.py): it folds the BGR -> RGB
        # reversal into conv1 rather than emitting it as a node.
        return graph.emit(image, self)

    def loss(
        self, images: jax.Array, targets: Targets, phase: str
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        if phase != "train":
            raise ValueError(f"FCOS has the single phase 'train', not {phase!r}")
        raw = self(images)
        return fcos_loss(
            raw, targets, tuple(images.shape[1:3]), self.anchor_sizes,
            self.center_sampling_radius, self.label_map,
        )  # fmt: skip

    def decode(
        self, raw: dict[str, jax.Array], input_hw: tuple[int, int]
    ) -> tuple[jax.Array, jax.Array]:
        """Boxes ``[B, N, 4]`` and scores ``[B, N, C]`` (zero outside each level's top-k);
        C is the number of dataset labels (``num_label_classes``)."""
        input_hw = (int(input_hw[0]), int(input_hw[1]))
        levels = level_points(input_hw, self.anchor_sizes)
        total = sum(len(p) for p, _ in levels)
        if raw["cls_logits"].shape[1] != total:
            raise ValueError(f"{raw['cls_logits'].shape[1]} points in raw, {total} for {input_hw}")
        prob = jax.nn.sigmoid(raw["cls_logits"]) * jax.nn.sigmoid(raw["bbox_ctrness"])
        scores = jnp.sqrt(prob)
        boxes, kept, start = [], [], 0
        for points, size in levels:
            end = start + len(points)
            kept.append(_keep_top_k(scores[:, start:end], self.score_thresh, self.topk_candidates))
            # The anchor sizes are powers of two, so ``distance * size`` is exact and the
            # boxes round as torchvision's (ctr - rel * size) does, with or without FMA.
            d = raw["bbox_regression"][:, start:end] * np.float32(size)
            ctr = jnp.asarray(points)
            boxes.append(jnp.concatenate([ctr - d[..., :2], ctr + d[..., 2:]], -1))
            start = end
        boxes = jnp.concatenate(boxes, 1)
        h, w = input_hw
        bound = jnp.asarray([w, h, w, h], jnp.float32)
        kept = jnp.concatenate(kept, 1)
        if self.label_map is not None:
            kept = kept[..., np.asarray(self.label_map)]
        return jnp.clip(boxes, 0.0, bound), kept


def anchors(
    input_hw: tuple[int, int], anchor_sizes: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torchvision's anchors of a padded input: centres ``[N, 2]``, sides ``[N]`` and the
    scale ranges ``[N, 2]`` of the matching, levels concatenated."""
    levels = level_points(input_hw, anchor_sizes)
    points = np.concatenate([p for p, _ in levels])
    sizes = np.concatenate([np.full(len(p), s, np.float32) for p, s in levels])
    return points, sizes, scale_ranges(sizes, len(levels[0][0]), len(levels[-1][0]))


def fcos_loss(
    raw: dict[str, jax.Array],
    targets: Targets,
    input_hw: tuple[int, int],
    anchor_sizes: Sequence[float],
    center_sampling_radius: float = CENTER_SAMPLING_RADIUS,
    label_map: Sequence[int] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total FCOS loss and its terms from the raw head outputs and the padded gts."""
    points, sizes, ranges = anchors(input_hw, anchor_sizes)
    boxes = targets["gt_boxes"].astype(jnp.float32)
    matched = assign(
        jnp.asarray(points), jnp.asarray(sizes), jnp.asarray(ranges), boxes,
        targets["gt_mask"], center_sampling_radius,
    )  # fmt: skip
    classes = targets["gt_labels"].astype(jnp.int32)
    if label_map is not None:
        # Padded gts may hold any label; they are never matched, so clip the lookup.
        table = jnp.asarray(label_map, jnp.int32)
        classes = table[jnp.clip(classes, 0, len(label_map) - 1)]
    terms = fcos_losses(raw, jnp.asarray(points), jnp.asarray(sizes), matched, boxes, classes)
    return sum(terms[k] for k in LOSS_TERMS), terms
