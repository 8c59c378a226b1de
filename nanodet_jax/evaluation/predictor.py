"""Inference from images to detections: preprocessing, one jitted forward + decode + NMS,
and boxes mapped back to the original image.

Used by ``eval.py`` and ``nanodet_jax.cli.predict``. The jitted function takes uint8
images (normalisation happens on the device) and returns fixed-size, padded
detections; only the few kept boxes come back to the host.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from nanodet_jax.data import transforms
from nanodet_jax.evaluation import postprocess

log = logging.getLogger("nanodet_jax")


@dataclasses.dataclass
class Detections:
    """Detections of one image in its original pixel coordinates."""

    boxes: np.ndarray  # [n, 4] float32 xyxy
    scores: np.ndarray  # [n] float32, descending
    labels: np.ndarray  # [n] int32

    def __len__(self) -> int:
        return len(self.scores)


@dataclasses.dataclass
class PreparedImage:
    canvas: np.ndarray  # uint8 [H, W, 3] network-input canvas (zero-padded)
    matrix: np.ndarray  # 3x3: original pixels -> canvas pixels
    valid_hw: tuple[int, int]  # extent of the warped image inside the canvas
    orig_wh: tuple[int, int]


class Predictor:
    """Wraps a NanoDet-Plus model for inference with NanoDet's val pipeline.

    With ``keep_ratio`` NanoDet pads each batch to its largest image (rounded up to
    32); we pad to the configured input size so that shapes stay static (one
    compiled program) — detections can differ slightly near the padded border.
    """

    def __init__(self, model: nnx.Module, config: Any):
        model.eval()
        self.graphdef, self.state = nnx.split(model)
        val = config.data.val
        self.input_wh = tuple(int(v) for v in val.input_size)
        self.keep_ratio = bool(val.keep_ratio)
        self.mean, self.std = (tuple(v) for v in val.pipeline.normalize)
        self.canvas_hw = transforms.canvas_hw(self.input_wh)
        self.num_classes = model.num_classes
        test = config.test
        self.nms_kwargs = dict(
            score_thr=float(test.score_thr),
            iou_thr=float(test.nms_iou),
            max_num=int(test.max_per_img),
            nms_pre=int(test.nms_pre),
        )
        self.class_names = list(config.class_names)
        self.truncated_images = 0  # images whose NMS hit ``nms_pre`` (see postprocess)
        self._forward = jax.jit(self._forward_impl)
        self._raw = jax.jit(lambda st, x: nnx.merge(self.graphdef, st)(x))

    def _forward_impl(self, state, images_u8, valid_hw):
        model = nnx.merge(self.graphdef, state)
        x = transforms.normalize(images_u8, self.mean, self.std, valid_hw)
        boxes, scores = model.decode(model(x), self.canvas_hw)
        return postprocess.batched_multiclass_nms(boxes, scores, **self.nms_kwargs)

    def raw_outputs(self, images: jax.Array) -> jax.Array:
        """The model's raw head output for already-normalised NHWC images."""
        return self._raw(self.state, images)

    def prepare(self, img: np.ndarray) -> PreparedImage:
        warped, matrix, _ = transforms.resize_for_inference(img, self.input_wh, self.keep_ratio)
        canvas, valid_hw = transforms.place_on_canvas(warped, self.canvas_hw)
        return PreparedImage(canvas, matrix, valid_hw, (img.shape[1], img.shape[0]))

    def run_prepared(self, batch: Sequence[PreparedImage], batch_size: int | None = None):
        """Detections for prepared images; the batch is zero-padded to ``batch_size``."""
        n = len(batch)
        size = batch_size or n
        canvases = np.zeros((size, *self.canvas_hw, 3), np.uint8)
        valid = np.zeros((size, 2), np.int32)
        for i, p in enumerate(batch):
            canvases[i] = p.canvas
            valid[i] = p.valid_hw
        dets = jax.device_get(self._forward(self.state, canvases, valid))
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
        return self.run_prepared([self.prepare(img) for img in images])
