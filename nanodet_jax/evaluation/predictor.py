"""Inference from images to detections: preprocessing, one jitted forward + decode + NMS,
and boxes mapped back to the original image.

Used by ``eval.py`` and ``nanodet_jax.cli.predict``. The jitted function takes uint8
images (normalisation happens on the device) and returns fixed-size, padded
detections; only the few kept boxes come back to the host.

With ``data.val.resize`` (torchvision's min / max size rule, :mod:`nanodet_jax.data.
canvas_resize`) images are float32 and each goes on its own canvas of a few; a batch
holds one canvas (:func:`nanodet_jax.evaluation.coco_eval.predict_dataset` groups them),
so one program is compiled per canvas.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from nanodet_jax.data import canvas_resize, transforms
from nanodet_jax.evaluation import postprocess
from nanodet_jax.models.inference import InferenceModel

log = logging.getLogger("nanodet_jax")


@dataclasses.dataclass
class Detections:
    """Detections of one image in its original pixel coordinates."""

    boxes: np.ndarray  # [n, 4] float32 xyxy
    scores: np.ndarray  # [n] float32, descending
    labels: np.ndarray  # [n] int32

    def __len__(self) -> int:
        return len(self.scores)

    def to_json(self, class_names: Sequence[str]) -> list[dict]:
        """One ``{box_xyxy, score, class_id, class_name}`` per detection, rounded (0.01 px,
        1e-4 score): the entries of predict's ``predictions.json`` and video JSON."""
        return [
            {"box_xyxy": [round(v, 2) for v in box], "score": round(score, 4),
             "class_id": label, "class_name": class_names[label]}
            for box, score, label in zip(self.boxes.tolist(), self.scores.tolist(),
                                         self.labels.tolist())
        ]  # fmt: skip


@dataclasses.dataclass
class PreparedImage:
    canvas: np.ndarray  # uint8 (float32 with a resize rule) [H, W, 3], zero-padded
    matrix: np.ndarray  # 3x3: original pixels -> canvas pixels
    valid_hw: tuple[int, int]  # extent of the warped image inside the canvas
    orig_wh: tuple[int, int]


class Predictor:
    """Wraps a NanoDet-Plus model for inference with NanoDet's val pipeline.

    With ``keep_ratio`` NanoDet pads each batch to its largest image (rounded up to
    32); we pad to the configured input size so that shapes stay static (one
    compiled program) — detections can differ slightly near the padded border.
    """

    def __init__(self, model: nnx.Module, config: Any, fold_bn: bool = True):
        model.eval()
        # BatchNorm folded, weights passed as one flat list (``model`` is not changed).
        self.inference = InferenceModel(model, fold_bn)
        self.graphdef, self.state = self.inference.graphdef, self.inference.state
        val = config.data.val
        self.input_wh = tuple(int(v) for v in val.input_size)
        self.keep_ratio = bool(val.keep_ratio)
        self.mean, self.std = (tuple(v) for v in val.pipeline.normalize)
        self.canvas_hw = transforms.canvas_hw(self.input_wh)
        self.resize = canvas_resize.from_config(val, "data.val")
        self.num_classes = model.num_classes
        test = config.test
        self.nms_kwargs = dict(
            score_thr=float(test.score_thr),
            iou_thr=float(test.nms_iou),
            max_num=int(test.max_per_img),
            nms_pre=int(test.nms_pre),
        )
        self.class_names = label_names(config.class_names, getattr(model, "label_map", None))
        self.truncated_images = 0  # images whose NMS hit ``nms_pre`` (see postprocess)
        self.forward = self.inference.jit(self._forward_impl)
        self._raw = self.inference.jit(lambda model, x: model(x))

    def _forward_impl(self, model, images_u8, valid_hw):
        """The device part on a batch of canvases: normalisation, model, decode, NMS."""
        x = transforms.normalize(images_u8, self.mean, self.std, valid_hw)
        # The batch's canvas, static under jit: one program per canvas.
        boxes, scores = model.decode(model(x), images_u8.shape[1:3])
        return postprocess.batched_multiclass_nms(boxes, scores, **self.nms_kwargs)

    def raw_outputs(self, images: jax.Array) -> jax.Array:
        """The model's raw head output for already-normalised NHWC images."""
        return self._raw(images)

    def prepare(self, img: np.ndarray) -> PreparedImage:
        h, w = img.shape[:2]
        if self.resize is not None:
            cw, ch = self.resize.canvas_for(w, h)
            canvas, valid_hw = transforms.place_on_canvas(self.resize.resize(img), (ch, cw))
            return PreparedImage(canvas, self.resize.matrix(w, h), valid_hw, (w, h))
        warped, matrix, _ = transforms.resize_for_inference(img, self.input_wh, self.keep_ratio)
        canvas, valid_hw = transforms.place_on_canvas(warped, self.canvas_hw)
        return PreparedImage(canvas, matrix, valid_hw, (w, h))

    def run_prepared(self, batch: Sequence[PreparedImage], batch_size: int | None = None):
        """Detections for prepared images (all on one canvas); the batch is zero-padded to
        ``batch_size``."""
        n = len(batch)
        size = batch_size or n
        first = batch[0].canvas
        if any(p.canvas.shape != first.shape or p.canvas.dtype != first.dtype for p in batch):
            raise ValueError("run_prepared: a batch must share one canvas (shape and dtype)")
        canvases = np.zeros((size, *first.shape), first.dtype)
        valid = np.zeros((size, 2), np.int32)
        for i, p in enumerate(batch):
            canvases[i] = p.canvas
            valid[i] = p.valid_hw
        dets = jax.device_get(self.forward(canvases, valid))
        self.truncated_images += int(np.sum(dets.truncated[:n]))
        per_image = postprocess.to_numpy_detections(
            dets.boxes[:n], dets.scores[:n], dets.labels[:n], dets.num_dets[:n]
        )
        out = []
        for p, (boxes, scores, labels) in zip(batch, per_image):
            # Back to original pixels through the inverse of the resize warp.
            boxes = transforms.warp_boxes(boxes, np.linalg.inv(p.matrix), *p.orig_wh)
            out.append(Detections(boxes, scores.copy(), labels.copy()))
        return out

    def __call__(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detections for BGR uint8 images (as ``cv2.imread`` returns them)."""
        prepared = [self.prepare(img) for img in images]
        out: list[Detections | None] = [None] * len(prepared)
        for rows in canvas_groups(prepared).values():
            for i, det in zip(rows, self.run_prepared([prepared[i] for i in rows])):
                out[i] = det
        return out


def canvas_groups(prepared: Sequence[PreparedImage]) -> dict[tuple, list[int]]:
    """Indices of the prepared images per canvas (shape, dtype), in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(prepared):
        groups.setdefault((p.canvas.shape, p.canvas.dtype.str), []).append(i)
    return groups


def label_names(class_names: Sequence[str], label_map: Sequence[int] | None) -> list[str]:
    """The names of the dataset labels: the config's class list, or for a model whose
    logits are indexed otherwise (FCOS's COCO model: by category id) the entries its
    ``label_map`` picks, so that label ``i`` is named ``class_names[label_map[i]]``."""
    names = list(class_names)
    if label_map is None:
        return names
    if max(label_map, default=-1) >= len(names):
        raise ValueError(
            f"label_map points at logit {max(label_map)} but class_names has {len(names)} "
            "entries (one per logit); fix config.class_names or model.arch.label_map"
        )
    return [names[i] for i in label_map]


def config_label_names(config: Any) -> list[str] | None:
    """:func:`label_names` of a config (None when it names no classes)."""
    names = config.get("class_names")
    if names is None:
        return None
    return label_names(names, config.model.arch.get("label_map"))
