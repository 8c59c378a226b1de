"""Inference and evaluation: the predictor, decoding + NMS, COCO metrics, drawings.

``EVALUATORS`` holds what ``evaluator.name`` selects: ``(dataset, detections,
class_names) -> {"stats": ..., "per_class": ..., "summary": ...}``.
"""

from nanodet_jax.evaluation.coco_eval import coco_evaluate
from nanodet_jax.registry import Registry

EVALUATORS = Registry("evaluator", {"CocoDetectionEvaluator": coco_evaluate})


def evaluator_from_config(config) -> object:
    """The evaluation function ``config.evaluator.name`` names (COCO by default)."""
    return EVALUATORS.get((config.get("evaluator") or {}).get("name", "CocoDetectionEvaluator"))
