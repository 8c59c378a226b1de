"""End to end on real photos: torchvision's ``fcos_resnet50_fpn`` (its own transform: min
800 / max 1333 resize, padding, postprocess back to original pixels) against our
Predictor with ``configs/fcos_r50_fpn.py`` (canvas resize, decode, NMS, inverse scale),
the same random weights in both.

    python tools/check_fcos_predict.py [--data ../shared/data] [--images 2]

Weights: torchvision's ``weights=None`` build (BatchNorm2d, eval mode), its class biases
spread by N(0, 1) so that classes do not tie, loaded into our model with ``norm_layer
BN`` / ``trainable_backbone_layers 5``. Both thresholds at 0.05 (an init scores ~0.07).
Compared: torchvision's detections whose label is a COCO category id (ours never give
the "N/A" / background ones), top 50 by score, each paired with our detection of the
same category (labels through ``label_map``) and nearest box: unmatched count, max |box
difference| in original pixels, max |score difference|.
"""

from __future__ import annotations

import argparse
import os
import sys

import cv2
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from nanodet_jax import runtime  # noqa: E402
from tools.torchvision_cpu import import_torchvision  # noqa: E402

TOP = 50
OVERRIDES = [
    "--config.model.arch.norm_layer=BN",
    "--config.model.arch.trainable_backbone_layers=5",
    "--config.model.arch.score_thresh=0.05",
    "--config.test.score_thr=0.05",
]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=os.path.join(os.path.dirname(REPO), "shared", "data"))
    p.add_argument("--images", type=int, default=2)
    args = p.parse_args(argv)
    runtime.configure_xla()
    import torch

    from nanodet_jax.config.loading import load_config
    from nanodet_jax.evaluation.predictor import Predictor
    from nanodet_jax.models import build_model
    from nanodet_jax.weights.pytorch import load_torch_weights

    tv = import_torchvision()
    torch.manual_seed(0)
    ref = tv.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None)
    ref.score_thresh = 0.05
    with torch.no_grad():
        bias = ref.head.classification_head.cls_logits.bias
        bias += torch.from_numpy(np.random.default_rng(0).normal(size=bias.shape).astype("f4"))
    ref.eval()
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}

    config = load_config(os.path.join(REPO, "configs", "fcos_r50_fpn.py"), OVERRIDES)
    model = build_model(config, with_aux=False)
    load_torch_weights(model, sd)
    predictor = Predictor(model, config)
    label_map = np.asarray(config.model.arch.label_map)

    folder = os.path.join(args.data, "coco_tiny", "val2017")
    for name in sorted(os.listdir(folder))[: args.images]:
        img = cv2.imread(os.path.join(folder, name))
        rgb = torch.from_numpy(np.ascontiguousarray(img[..., ::-1])).permute(2, 0, 1)
        with torch.no_grad():
            [theirs] = ref([rgb.float() / 255])
        keep = np.isin(theirs["labels"].numpy(), label_map)
        t_boxes = theirs["boxes"].numpy()[keep][:TOP]
        t_scores, t_labels = (
            theirs["scores"].numpy()[keep][:TOP],
            theirs["labels"].numpy()[keep][:TOP],
        )
        [ours] = predictor([img])
        n = min(TOP, len(ours), len(t_scores))
        # Near-tied scores may come in either order: pair each of their top n with our
        # detection of the same label and nearest box (among our top n + 10).
        o_labels = label_map[ours.labels[: n + 10]]
        box_err, score_err, unmatched = 0.0, 0.0, 0
        for box, score, label in zip(t_boxes[:n], t_scores[:n], t_labels[:n]):
            cand = np.flatnonzero(o_labels == label)
            if not len(cand):
                unmatched += 1
                continue
            j = cand[np.argmin(np.abs(ours.boxes[cand] - box).max(1))]
            box_err = max(box_err, float(np.abs(ours.boxes[j] - box).max()))
            score_err = max(score_err, float(abs(ours.scores[j] - score)))
        in_order = np.array_equal(o_labels[:n], t_labels[:n])
        canvas_hw = predictor.prepare(img).canvas.shape[:2]
        print(
            f"{name} {img.shape[1]}x{img.shape[0]} canvas {canvas_hw}: "
            f"{len(theirs['scores'])} torchvision detections ({int((~keep).sum())} N/A or "
            f"background), {len(ours)} ours; top {n}: {unmatched} unmatched, same order "
            f"{in_order}, max |box| {box_err:.2e} px, max |score| {score_err:.2e}"
        )


if __name__ == "__main__":
    main()
