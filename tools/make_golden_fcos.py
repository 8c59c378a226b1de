"""Record torchvision's FCOS for ``tests/models/test_fcos.py`` (torchvision through
``tools/torchvision_cpu.py``, CPU torch).

Usage (from the repository root)::

    python tools/make_golden_fcos.py [--out tests/data/golden_fcos.npz]

The numbers come from a narrow FCOS built from torchvision's own classes, so that the
file stays small: ``FCOS(BackboneWithFPN(resnet18(norm_layer=FrozenBatchNorm2d), C3-C5,
64 channels, LastLevelP6P7(64, 64)), num_classes=20)``, filled with
``random_state_dict(shapes, WEIGHT_SEED)`` (every FrozenBatchNorm's affine and running
statistics randomised) and the class-logit bias lowered by ``CLS_BIAS_SHIFT`` so that
only some (point, class) pairs pass the 0.2 score threshold (with the random bias nearly
all would), yet P3 still has more than ``topk_candidates`` of them in one image.

Recorded (NCHW as torchvision computes them; the inputs are seeded N(0, 1) arrays,
already "normalised", fed past ``GeneralizedRCNNTransform``):

* ``<h>x<w>/body/<i>`` (C3-C5), ``<h>x<w>/fpn/<i>`` (P3-P7), ``<h>x<w>/head/<key>`` at
  64x96 (not a multiple of 128: P6 / P7 strides differ per axis) and 128x128, batch 1;
* ``det/head/<key>``: the head outputs of a 2 x 128 x 128 batch, and ``det/<i>/boxes``,
  ``scores``, ``labels``: ``FCOS.postprocess_detections`` on them (anchors from the
  model's AnchorGenerator, image sizes = the input size), i.e. eval-mode detections;
* ``meta``: the float32 model's relative error against its float64 copy per recorded
  array (``noise``), per-image, per-level counts of pairs above the threshold, and the
  key names and shapes of the real ResNet-50 FCOS, for the COCO checkpoint's layout
  (FrozenBatchNorm2d, as ``fcos_resnet50_fpn`` builds it for pretrained weights) and for
  ``fcos_resnet50_fpn(weights=None, weights_backbone=None)`` (BatchNorm2d), and the
  pretrained layout's trainable parameter names.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from nanodet_jax.testing import array_digest, normal_input, random_state_dict  # noqa: E402
from tools.torchvision_cpu import import_torchvision  # noqa: E402

WEIGHT_SEED = 71
CLS_BIAS_SHIFT = 3.0
NUM_CLASSES, FPN_CHANNELS = 20, 64
MODULE_INPUTS = {"64x96": ((1, 3, 64, 96), 72), "128x128": ((1, 3, 128, 128), 73)}
DET_INPUT = ((2, 3, 128, 128), 74)
HEAD_KEYS = ("cls_logits", "bbox_regression", "bbox_ctrness")


def small_fcos(tv, num_classes: int = NUM_CLASSES, width: int = FPN_CHANNELS, norm_layer=None):
    """The fixture's FCOS (FrozenBatchNorm2d unless ``norm_layer``, e.g. configs/
    fcos_quickstart.py's trainable BatchNorm2d for tools/grad_precision_detectors.py)."""
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    body = tv.models.resnet18(weights=None, norm_layer=norm_layer or FrozenBatchNorm2d)
    backbone = BackboneWithFPN(
        body,
        {"layer2": "0", "layer3": "1", "layer4": "2"},
        [128, 256, 512],
        width,
        extra_blocks=LastLevelP6P7(width, width),
    )
    return tv.models.detection.FCOS(backbone, num_classes)


def small_weights(shapes: dict) -> dict[str, np.ndarray]:
    weights = random_state_dict(shapes, WEIGHT_SEED)
    weights["head.classification_head.cls_logits.bias"] -= np.float32(CLS_BIAS_SHIFT)
    return weights


def resnet50_layouts(tv) -> dict[str, list]:
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    body = tv.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    frozen = tv.models.detection.FCOS(
        _resnet_fpn_extractor(body, 3, [2, 3, 4], LastLevelP6P7(256, 256)), 91
    )
    plain = tv.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None)
    out = {
        name: [[k, list(v.shape)] for k, v in model.state_dict().items()]
        for name, model in (("frozen_bn", frozen), ("bn", plain))
    }
    # What trainable_layers=3 leaves trainable (requires_grad) in the pretrained layout.
    out["frozen_bn_trainable"] = [k for k, v in frozen.named_parameters() if v.requires_grad]
    return out


def rel_error(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - ref).max() / max(np.abs(ref).max(), 1e-12))


def module_outputs(model, x) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        body = list(model.backbone.body(x).values())
        pyramid = list(model.backbone.fpn(dict(enumerate(body))).values())
        head = model.head(pyramid)
    out = {f"body/{i}": t for i, t in enumerate(body)}
    out.update({f"fpn/{i}": t for i, t in enumerate(pyramid)})
    out.update({f"head/{k}": head[k] for k in HEAD_KEYS})
    return {k: v.numpy() for k, v in out.items()}


def detections(model, x) -> tuple[dict, list]:
    """FCOS.forward's eval branch, without the resize transform."""
    import torch
    from torchvision.models.detection.image_list import ImageList

    with torch.no_grad():
        features = list(model.backbone(x).values())
        head = model.head(features)
        sizes = [tuple(x.shape[-2:])] * x.shape[0]
        anchors = model.anchor_generator(ImageList(x, sizes), features)
        counts = [f.shape[2] * f.shape[3] for f in features]
        split = {k: list(v.split(counts, dim=1)) for k, v in head.items()}
        dets = model.postprocess_detections(split, [list(a.split(counts)) for a in anchors], sizes)
        scores = torch.sqrt(torch.sigmoid(head["cls_logits"]) * torch.sigmoid(head["bbox_ctrness"]))
        above = [
            [int((s > model.score_thresh).sum()) for s in per_image.split(counts)]
            for per_image in scores
        ]
    return {k: v.numpy() for k, v in head.items()}, dets, above


def loaded_small_fcos(tv, train: bool):
    """The fixture's torchvision FCOS in train or eval mode with its random weights, a
    float64 copy, and the weights (NumPy, state_dict names)."""
    import torch

    model = small_fcos(tv).train(train)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    weights = small_weights(shapes)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    return model, copy.deepcopy(model).double(), weights


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "tests", "data", "golden_fcos.npz"))
    args = p.parse_args(argv)

    import torch

    tv = import_torchvision()
    model, model64, weights = loaded_small_fcos(tv, train=False)

    arrays, noise, inputs = {}, {}, {}
    for name, (shape, seed) in MODULE_INPUTS.items():
        x = normal_input(seed, shape)
        inputs[name] = array_digest({"input": x})
        out = module_outputs(model, torch.from_numpy(x))
        out64 = module_outputs(model64, torch.from_numpy(x).double())
        for k, v in out.items():
            arrays[f"{name}/{k}"] = v.astype(np.float32)
            noise[f"{name}/{k}"] = rel_error(v, out64[k])

    shape, seed = DET_INPUT
    x = normal_input(seed, shape)
    inputs["det"] = array_digest({"input": x})
    head, dets, above = detections(model, torch.from_numpy(x))
    head64, _, _ = detections(model64, torch.from_numpy(x).double())
    for k in HEAD_KEYS:
        arrays[f"det/head/{k}"] = head[k].astype(np.float32)
        noise[f"det/head/{k}"] = rel_error(head[k], head64[k])
    for i, d in enumerate(dets):
        for k in ("boxes", "scores", "labels"):
            arrays[f"det/{i}/{k}"] = d[k].numpy()

    meta = {
        "format_version": 1,
        "torchvision": tv.__version__,
        "num_classes": NUM_CLASSES,
        "fpn_channels": FPN_CHANNELS,
        "weight_seed": WEIGHT_SEED,
        "cls_bias_shift": CLS_BIAS_SHIFT,
        "weights_sha256": array_digest(weights),
        "module_inputs": {
            k: {"shape": list(s), "seed": sd} for k, (s, sd) in MODULE_INPUTS.items()
        },
        "det_input": {"shape": list(DET_INPUT[0]), "seed": DET_INPUT[1]},
        "inputs_sha256": inputs,
        "noise": noise,
        "above_threshold_per_level": above,
        "num_detections": [len(d["scores"]) for d in dets],
        "resnet50_layouts": resnet50_layouts(tv),
    }
    np.savez_compressed(args.out, **arrays, meta=json.dumps(meta))
    print("above threshold per level:", above, "detections:", meta["num_detections"])
    print("worst float32 noise:", max(noise.values()))
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
