"""Detect objects with an exported NanoDet ``.onnx``: NumPy + onnxruntime + OpenCV only.

    nanodet-export --config configs/nanodet_plus_m_416.py \
        --torch-weights nanodet-plus-m_416.pth --out m416.onnx     # also writes m416.json
    python tools/onnx_predict.py m416.onnx bus.jpg [more images or folders] --out-dir preds

writes ``preds/<image>.jpg`` with the boxes drawn and ``preds/predictions.json`` (boxes in
original pixels, scores, class ids and names), as ``nanodet-predict`` does, and gives its
detections (``tests/deploy/test_onnx_predict.py`` compares the two).

The numbers the pre- and post-processing need (input size, keep_ratio, mean/std,
strides, reg_max, class names, score threshold, NMS IoU, top-k) come from the JSON that
``nanodet-export`` writes beside the ``.onnx`` (``--meta`` names another one).

This file imports no JAX and nothing of ``nanodet_jax``: copy it next to the model. So it
carries its own decode and NMS, written to give the same float32 results as
``nanodet_jax.evaluation.postprocess`` (candidate order, class offsets, IoU rounding).

Decoding the output ``[B, num_priors, num_classes + 4 * (reg_max + 1)]``: the first
``num_classes`` columns are class probabilities; the rest are, per side (left, top, right,
bottom), ``reg_max + 1`` logits of a distribution over distances 0..reg_max in units of
the prior's stride: softmax, expected value, times stride, measured from the prior at
``((x + prior_offset) * stride, (y + prior_offset) * stride)``: the top-left corner of
its cell for NanoDet-Plus (offset 0), the centre for legacy NanoDet's GFLHead and
NanoDetHead (0.5); levels in stride order, each row-major. (FCOS exports carry no
sidecar: torchvision's own decode applies.)
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

import cv2
import numpy as np
import onnxruntime as ort

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def load_meta(onnx_path: str, meta_path: str | None = None) -> dict:
    """The sidecar JSON of ``onnx_path`` (``x.onnx`` -> ``x.json``), or ``meta_path``."""
    with open(meta_path or os.path.splitext(onnx_path)[0] + ".json") as f:
        return json.load(f)


def resize_matrix(raw_wh: Sequence[int], dst_wh: Sequence[int], keep_ratio: bool) -> np.ndarray:
    """3x3 matrix from image pixels to network pixels: a stretch, or with keep_ratio a
    uniform scale about the image centre onto the target's centre."""
    (rw, rh), (dw, dh) = raw_wh, dst_wh
    if not keep_ratio:
        return np.diag([dw / rw, dh / rh, 1.0])
    ratio = dh / rh if rw / rh < dw / dh else dw / rw
    centre = np.array([[1, 0, -rw / 2], [0, 1, -rh / 2], [0, 0, 1]], np.float64)
    back = np.array([[1, 0, 0.5 * dw], [0, 1, 0.5 * dh], [0, 0, 1]], np.float64)
    return back @ np.diag([ratio, ratio, 1.0]) @ centre


def preprocess(img: np.ndarray, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """BGR uint8 image -> (normalised ``[3, H, W]`` float32 network input, its matrix)."""
    h, w = img.shape[:2]
    dst = tuple(meta["input_wh"])
    if meta["keep_ratio"]:  # the smallest canvas holding the scaled image, as NanoDet
        ratio = dst[1] / h if w / h < dst[0] / dst[1] else dst[0] / w
        dst = (int(ratio * w), int(ratio * h))
    matrix = resize_matrix((w, h), dst, meta["keep_ratio"])
    # One warpPerspective, not cv2.resize: it samples differently, and NanoDet warps.
    warped = cv2.warpPerspective(img, matrix, dsize=(int(dst[0]), int(dst[1])))
    ch, cw = meta["canvas_hw"]
    vh, vw = min(warped.shape[0], ch), min(warped.shape[1], cw)
    # The same float32 steps as training's normalisation (x / 255, then mean and std
    # scaled by 1/255), so that the inputs agree to the last bit.
    mean = np.asarray(meta["mean"], np.float32) / np.float32(255)
    std = np.asarray(meta["std"], np.float32) / np.float32(255)
    x = np.zeros((ch, cw, 3), np.float32)  # the padding is 0 after normalising
    x[:vh, :vw] = (warped[:vh, :vw].astype(np.float32) / np.float32(255) - mean) / std
    return x.transpose(2, 0, 1), matrix


def center_priors(canvas_hw: Sequence[int], strides: Sequence[int], offset: float) -> np.ndarray:
    """``[P, 3]`` = (x, y, stride) of every prior, in the output's order (float32 steps)."""
    out = []
    for s in strides:
        h, w = -(-canvas_hw[0] // s), -(-canvas_hw[1] // s)
        cells = [(np.arange(n, dtype=np.float32) + np.float32(offset)) * np.float32(s)
                 for n in (h, w)]  # fmt: skip
        ys, xs = np.meshgrid(*cells, indexing="ij")
        out.append(np.stack([xs.ravel(), ys.ravel(), np.full(h * w, s, np.float32)], 1))
    return np.concatenate(out).astype(np.float32)


def decode(output: np.ndarray, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """One image's output ``[P, C + 4 * (R + 1)]`` -> boxes ``[P, 4]`` on the canvas, scores."""
    c, bins = meta["num_classes"], meta["reg_max"] + 1
    # Sidecars older than the prior_offset field came from NanoDet-Plus only.
    priors = center_priors(meta["canvas_hw"], meta["strides"], meta.get("prior_offset", 0.0))
    logits = output[:, c:].reshape(-1, 4, bins)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    probs = e / e.sum(-1, keepdims=True)
    dist = (probs * np.arange(bins, dtype=np.float32)).sum(-1) * priors[:, 2:3]
    xy = priors[:, :2]
    boxes = np.concatenate([xy - dist[:, :2], xy + dist[:, 2:]], 1)
    ch, cw = meta["canvas_hw"]
    boxes = np.clip(boxes, 0, np.array([cw, ch, cw, ch], np.float32)).astype(np.float32)
    return boxes, output[:, :c]


def multiclass_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    score_thr: float,
    iou_thr: float,
    max_num: int,
    nms_pre: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NanoDet's class-aware NMS: boxes ``[P, 4]``, scores ``[P, C]`` -> kept boxes,
    scores, labels, best first, at most ``max_num``."""
    num_classes = scores.shape[1]
    flat = scores.reshape(-1).astype(np.float32)  # prior-major, class-minor
    cand = np.nonzero(flat > np.float32(score_thr))[0]
    if len(cand) == 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    # Classes are kept apart by shifting each class's boxes past every candidate box;
    # the shift's size changes the float32 IoUs slightly, so it is NanoDet's exactly.
    max_coord = boxes[np.unique(cand // num_classes)].max()
    order = cand[np.argsort(-flat[cand], kind="stable")][:nms_pre]
    priors, labels = order // num_classes, order % num_classes
    shifted = boxes[priors] + (labels.astype(np.float32) * (max_coord + np.float32(1)))[:, None]
    areas = (shifted[:, 2] - shifted[:, 0]) * (shifted[:, 3] - shifted[:, 1])
    alive = np.ones(len(order), bool)
    keep: list[int] = []
    for i in range(len(order)):
        if not alive[i]:
            continue
        keep.append(i)
        if len(keep) == max_num:
            break
        b = shifted[i]
        w = np.maximum(np.minimum(b[2], shifted[:, 2]) - np.maximum(b[0], shifted[:, 0]), 0)
        h = np.maximum(np.minimum(b[3], shifted[:, 3]) - np.maximum(b[1], shifted[:, 1]), 0)
        inter = w * h
        iou = inter / ((areas[i] + areas) - inter)
        # A float32 IoU against the threshold as a double, as torchvision compares.
        alive &= ~(iou.astype(np.float64) > float(iou_thr))
        alive[i] = False
    k = np.asarray(keep)
    return boxes[priors[k]], flat[order[k]], labels[k]


def warp_boxes(boxes: np.ndarray, matrix: np.ndarray, width: int, height: int) -> np.ndarray:
    """xyxy boxes through ``matrix``: the box around the 4 moved corners, clipped."""
    n = len(boxes)
    corners = np.ones((n * 4, 3))
    corners[:, :2] = boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(n * 4, 2)
    moved = corners @ matrix.T
    moved = (moved[:, :2] / moved[:, 2:3]).reshape(n, 8)
    xs, ys = moved[:, 0::2], moved[:, 1::2]
    out = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], 1)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
    return out.astype(np.float32)


def session(onnx_path: str) -> ort.InferenceSession:
    return ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])


def detect(
    sess: ort.InferenceSession, images: Sequence[np.ndarray], meta: dict
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(boxes xyxy in original pixels, scores, labels) per BGR uint8 image. A file
    exported with ``--dynamic-batch`` takes all images in one run, else one at a time."""
    inputs = [preprocess(img, meta) for img in images]
    x = np.stack([x for x, _ in inputs])
    if meta.get("dynamic_batch"):
        outputs = sess.run(None, {meta["input_name"]: x})[0]
    else:
        outputs = np.concatenate([sess.run(None, {meta["input_name"]: x[i : i + 1]})[0]
                                  for i in range(len(x))])  # fmt: skip
    results = []
    for img, (_, matrix), out in zip(images, inputs, outputs):
        boxes, scores = decode(out, meta)
        boxes, scores, labels = multiclass_nms(
            boxes, scores, meta["score_thr"], meta["nms_iou"], meta["max_per_img"],
            meta["nms_pre"],
        )  # fmt: skip
        h, w = img.shape[:2]
        results.append((warp_boxes(boxes, np.linalg.inv(matrix), w, h), scores, labels))
    return results


def draw(img: np.ndarray, det: tuple, names: Sequence[str], score_thr: float) -> np.ndarray:
    """A copy of the image with a box and ``name:score%`` for each detection over score_thr."""
    out = img.copy()
    for box, score, label in zip(*det):
        if score <= score_thr:
            continue
        x0, y0, x1, y1 = (int(v) for v in box)
        color = tuple(int(c) for c in np.random.default_rng(int(label)).integers(64, 256, 3))
        cv2.rectangle(out, (x0, y0), (x1, y1), color, 2)
        text = f"{names[int(label)]}:{score * 100:.1f}%"
        cv2.putText(out, text, (x0 + 1, max(y0 - 3, 12)), cv2.FONT_HERSHEY_SIMPLEX, 0.5, color)
    return out


def to_json(path: str, det: tuple, names: Sequence[str]) -> dict:
    boxes, scores, labels = det
    return {
        "file": path,
        "detections": [
            {"box_xyxy": [round(v, 2) for v in b], "score": round(s, 4), "class_id": c,
             "class_name": names[c]}
            for b, s, c in zip(boxes.tolist(), scores.tolist(), labels.tolist())
        ],
    }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("onnx", help="the exported .onnx")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--meta", help="the sidecar JSON (default: the .onnx's name with .json)")
    p.add_argument("--out-dir", default="onnx_predictions")
    p.add_argument("--score-thr", type=float, default=0.35, help="drawing threshold")
    args = p.parse_args(argv)
    meta = load_meta(args.onnx, args.meta)
    paths = []
    for item in args.inputs:
        if os.path.isdir(item):
            paths += sorted(os.path.join(item, f) for f in os.listdir(item)
                            if f.lower().endswith(IMAGE_EXTENSIONS))  # fmt: skip
        else:
            paths.append(item)
    sess = session(args.onnx)
    os.makedirs(args.out_dir, exist_ok=True)
    records = []
    for path in paths:
        img = cv2.imread(path)
        if img is None:
            print(f"skipping {path}: not a readable image")
            continue
        [det] = detect(sess, [img], meta)
        drawn = draw(img, det, meta["class_names"], args.score_thr)
        cv2.imwrite(os.path.join(args.out_dir, os.path.basename(path)), drawn)
        records.append(to_json(path, det, meta["class_names"]))
        print(f"{path}: {int(np.sum(det[1] > args.score_thr))} objects above {args.score_thr}")
    with open(os.path.join(args.out_dir, "predictions.json"), "w") as f:
        json.dump(records, f, indent=1)
    print(f"wrote {len(records)} drawn images and predictions.json to {args.out_dir}")


if __name__ == "__main__":
    main()
