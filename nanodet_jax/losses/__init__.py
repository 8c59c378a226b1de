"""Loss functions, selected by the ``name`` of each term in a head's ``loss`` config.

Each registry holds what can fill one slot of NanoDet's GFL objective: ``loss_qfl``
(class logits, labels, IoU scores -> per prior), ``loss_dfl`` (distribution logits,
targets -> per side) and ``loss_bbox`` (boxes, target boxes -> per box). An entry takes
the term's config options (NanoDet's constructor arguments, less ``loss_weight``, which
the objective applies) and returns the loss function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from nanodet_jax.losses.gfl import distribution_focal_loss, quality_focal_loss
from nanodet_jax.losses.iou import (
    BOUNDED_IOU_BETA,
    BOUNDED_IOU_EPS,
    DIOU_EPS,
    GIOU_EPS,
    IOU_EPS,
    bounded_iou_loss,
    ciou_loss,
    diou_loss,
    giou_loss,
    iou_loss,
)
from nanodet_jax.registry import Registry


def _mean_reduction(name: str, reduction: str) -> None:
    # The objective sums over priors and divides by NanoDet's avg_factor, which is what
    # NanoDet's losses do with their default reduction="mean" and an avg_factor.
    if reduction != "mean":
        raise ValueError(f"{name}: reduction={reduction!r} is not supported (NanoDet uses mean)")


def quality_focal(beta: float = 2.0, use_sigmoid: bool = True, reduction: str = "mean") -> Callable:
    if not use_sigmoid:
        raise ValueError("QualityFocalLoss: only use_sigmoid=True exists (as in NanoDet)")
    _mean_reduction("QualityFocalLoss", reduction)
    return functools.partial(quality_focal_loss, beta=float(beta))


def distribution_focal(reduction: str = "mean") -> Callable:
    _mean_reduction("DistributionFocalLoss", reduction)
    return distribution_focal_loss


def generalized_iou(eps: float = GIOU_EPS, reduction: str = "mean") -> Callable:
    _mean_reduction("GIoULoss", reduction)
    return functools.partial(giou_loss, eps=float(eps))


def plain_iou(eps: float = IOU_EPS, reduction: str = "mean") -> Callable:
    _mean_reduction("IoULoss", reduction)
    return functools.partial(iou_loss, eps=float(eps))


def distance_iou(eps: float = DIOU_EPS, reduction: str = "mean") -> Callable:
    _mean_reduction("DIoULoss", reduction)
    return functools.partial(diou_loss, eps=float(eps))


def complete_iou(eps: float = DIOU_EPS, reduction: str = "mean") -> Callable:
    _mean_reduction("CIoULoss", reduction)
    return functools.partial(ciou_loss, eps=float(eps))


def bounded_iou(
    beta: float = BOUNDED_IOU_BETA, eps: float = BOUNDED_IOU_EPS, reduction: str = "mean"
) -> Callable:
    _mean_reduction("BoundedIoULoss", reduction)
    return functools.partial(bounded_iou_loss, beta=float(beta), eps=float(eps))


CLASSIFICATION_LOSSES = Registry(
    "model.arch.head.loss.loss_qfl", {"QualityFocalLoss": quality_focal}
)
DISTRIBUTION_LOSSES = Registry(
    "model.arch.head.loss.loss_dfl", {"DistributionFocalLoss": distribution_focal}
)
BOX_LOSSES = Registry(
    "model.arch.head.loss.loss_bbox",
    {
        "GIoULoss": generalized_iou,
        "IoULoss": plain_iou,
        "DIoULoss": distance_iou,
        "CIoULoss": complete_iou,
        "BoundedIoULoss": bounded_iou,
    },
)
