"""Record torchvision's FCOS training objective for ``tests/models/test_fcos_loss.py``
(torchvision through ``tools/torchvision_cpu.py``, CPU torch).

Usage (from the repository root)::

    python tools/make_golden_fcos_loss.py [--out tests/data/golden_fcos_loss.npz]

The model is ``tools/make_golden_fcos.py``'s small FCOS (ResNet-18 body with
FrozenBatchNorm2d, 64-channel FPN with P6/P7, 20 classes, the same random weights) in
train mode. ``FCOS.forward`` in training is ``GeneralizedRCNNTransform`` (a resize, left
out here: the inputs are seeded N(0, 1) arrays, already "normalised") then backbone ->
head -> anchor generator -> ``FCOS.compute_loss``; this script runs those steps itself
so that it can record ``matched_idxs`` (the argument ``FCOS.compute_loss`` passes to
``FCOSHead.compute_loss``). FrozenBatchNorm2d has no batch statistics, so train mode
changes nothing in the forward pass.

The batch, 3 x 64 x 96 (P6 / P7 strides differ per axis): image 0 with several boxes,
two of them far larger than the image (positives on P4, P6 and P7, the last level's open
upper bound), image 1 without boxes, image 2 crowded with overlapping boxes: an exact
area tie (32 x 20 and 20 x 32, the lower index wins) and a float32 tie (areas 1001 and
1000: ``1e8 - area`` rounds to the same float32, so the first, larger box wins).

Recorded: ``gt_boxes`` / ``gt_labels`` / ``gt_mask`` (padded to ``M``), ``matched``
(``[B, N]``, -1 = background), ``loss/<term>``, ``head/<key>`` (the train-mode head
outputs), and under ``grad64`` the float64 gradients of the total loss for every
trainable parameter (:func:`trainable`) with the float32 model's distance from them
(``tools/grad_precision.py``'s ``golden_gradients``); ``meta`` holds the float32 model's
relative distance from its float64 copy (same inputs) for every term (``noise``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from nanodet_jax.testing import array_digest, normal_input  # noqa: E402
from tools.grad_precision import golden_gradients  # noqa: E402
from tools.make_golden_fcos import HEAD_KEYS, loaded_small_fcos, rel_error  # noqa: E402
from tools.torchvision_cpu import import_torchvision  # noqa: E402

INPUT = ((3, 3, 64, 96), 75)
TERMS = ("classification", "bbox_regression", "bbox_ctrness")
# trainable_backbone_layers=3: torchvision's extractor trains layer2-4 of the body (its
# FrozenBatchNorm2d has no parameters); conv1 and layer1 are buffers in ours.
FROZEN_BODY = ("backbone.body.conv1.", "backbone.body.layer1.")


def trainable(model) -> tuple[str, ...]:
    """The parameters trainable_backbone_layers=3 trains, in state_dict order."""
    return tuple(k for k, _ in model.named_parameters() if not k.startswith(FROZEN_BODY))


# (x1, y1, x2, y2, label) per image.
BOXES = (
    (
        (5, 6, 50, 40, 3),
        (40, 10, 90, 60, 7),
        (60, 30, 95, 63, 0),
        (-40, -20, 90, 60, 11),  # reach 64..128 at P4
        (-250, -250, 330, 300, 12),  # P6
        (-1100, -1100, 1200, 1200, 19),  # P7, reach above 8 x 128: the open upper bound
    ),
    (),
    (
        (8, 8, 40, 28, 1),  # 640
        (12, 4, 32, 36, 2),  # 640: exact tie with the previous box
        (10, 20, 87, 33, 4),  # 1001
        (30, 14, 70, 39, 5),  # 1000: same float32 key as the previous box
        (0, 0, 64, 48, 6),
        (50, 30, 94, 62, 6),
        (20, 16, 30, 26, 8),
    ),
)


def padded_targets() -> dict[str, np.ndarray]:
    m = max(len(b) for b in BOXES)
    boxes = np.zeros((len(BOXES), m, 4), np.float32)
    labels = np.zeros((len(BOXES), m), np.int32)
    mask = np.zeros((len(BOXES), m), bool)
    for i, image in enumerate(BOXES):
        for j, (*box, label) in enumerate(image):
            boxes[i, j], labels[i, j], mask[i, j] = box, label, True
    return {"gt_boxes": boxes, "gt_labels": labels, "gt_mask": mask}


def train_step(model, x, padded, matched=None, names=None) -> tuple[dict, np.ndarray, dict, dict]:
    """Loss terms, matched gts, head outputs and gradients of the total (numpy) for
    ``names`` (default :func:`trainable`); given ``matched``, the loss uses it instead of
    the model's own matching (still recorded)."""
    import torch
    from torchvision.models.detection.image_list import ImageList

    dtype = x.dtype
    targets = [
        {
            "boxes": torch.from_numpy(b[m]).to(dtype),
            "labels": torch.from_numpy(lab[m]).long(),
        }
        for b, lab, m in zip(padded["gt_boxes"], padded["gt_labels"], padded["gt_mask"])
    ]
    recorded = {}
    head_loss = model.head.compute_loss

    def capture(targets, head_outputs, anchors, matched_idxs):
        recorded["matched"] = torch.stack(matched_idxs).numpy()
        if matched is not None:
            matched_idxs = list(torch.from_numpy(matched))
        return head_loss(targets, head_outputs, anchors, matched_idxs)

    model.head.compute_loss = capture
    model.zero_grad()
    features = list(model.backbone(x).values())
    head = model.head(features)
    anchors = model.anchor_generator(ImageList(x, [tuple(x.shape[-2:])] * len(x)), features)
    counts = [f.shape[2] * f.shape[3] for f in features]
    losses = model.compute_loss(targets, head, anchors, counts)
    sum(losses.values()).backward()
    del model.head.compute_loss
    params = dict(model.named_parameters())
    grads = {k: params[k].grad.double().numpy().copy() for k in names or trainable(model)}
    terms = {k: float(v.detach()) for k, v in losses.items()}
    heads = {k: v.detach().numpy() for k, v in head.items()}
    return terms, recorded["matched"], heads, grads


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "tests", "data", "golden_fcos_loss.npz"))
    args = p.parse_args(argv)

    import torch

    tv = import_torchvision()
    model, model64, weights = loaded_small_fcos(tv, train=True)

    x = normal_input(INPUT[1], INPUT[0])
    padded = padded_targets()
    terms, matched, heads, grads = train_step(model, torch.from_numpy(x), padded)
    # In float64 the area key does not round, so the float32 tie goes the other way: the
    # float64 copy trains on the float32 matching, and its noise is the arithmetic's alone.
    terms64, matched64, _, grads64 = train_step(
        model64, torch.from_numpy(x).double(), padded, matched
    )
    float64_flips = int((matched != matched64).sum())

    arrays = dict(padded, matched=matched.astype(np.int32))
    arrays.update({f"head/{k}": heads[k].astype(np.float32) for k in HEAD_KEYS})
    arrays.update({f"loss/{k}": np.float32(v) for k, v in terms.items()})
    arrays.update(golden_gradients("grad64", grads, grads64))
    noise = {f"loss/{k}": rel_error(terms[k], terms64[k]) for k in TERMS}
    # Every image's positives per level, and which anchors of image 2 the ties decide.
    meta = {
        "format_version": 1,
        "torchvision": tv.__version__,
        "input": {"shape": list(INPUT[0]), "seed": INPUT[1]},
        "input_sha256": array_digest({"input": x}),
        "noise": noise,
        "positives": [int((m >= 0).sum()) for m in matched],
        "loss64": terms64,
        "float64_matching_differs_at": float64_flips,
    }
    np.savez_compressed(args.out, **arrays, meta=json.dumps(meta))
    print("positives per image:", meta["positives"], "terms:", terms)
    print("noise:", {k: f"{v:.2e}" for k, v in noise.items()})
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
