"""Record NanoDet's training targets, losses and gradients for
``tests/losses/test_assigner_losses.py``.

Usage (from the repository root, with torch installed)::

    python tools/make_golden_train.py /path/to/nanodet [--out tests/data/golden_train.npz]

The small NanoDet-Plus (``SMALL_MODEL_OVERRIDES``, 5 classes) is filled with
``random_state_dict(shapes, WEIGHT_SEED)`` and run in train mode on a seeded N(0, 1)
batch of 3 images (3x128x160) through NanoDet's own ``forward_train`` and
``head.loss``, once per phase: ``epoch < detach_epoch`` ("joint": the aux branch's
gradient reaches the backbone and the PAN) and ``epoch >= detach_epoch`` ("detached").
Ground truth: image 0 has a few boxes, image 1 none, image 2 is crowded (boxes of all
sizes, tiny ones containing no prior centre, boxes on the border and on prior lines).

Recorded (float32 unless said otherwise):

* ``gt_boxes [3, M, 4]``, ``gt_labels [3, M]`` (int32), ``gt_mask [3, M]``: padded gts;
* ``head_out``, ``aux_out``: the reference's raw head outputs ``[3, P, C + 32]``, so the
  assigner and the losses can be checked on exactly the reference's inputs;
* ``assigned_gt`` (int32, -1 = background), ``labels`` (int32), ``label_scores``,
  ``bbox_targets``, ``dist_targets`` per prior, captured from ``target_assign_single_img``
  and the assigner (identical in both phases: the forward pass is the same);
* ``<phase>/loss/<term>`` for NanoDet's loss_states and ``<phase>/loss/total``;
* ``<phase>/grad/<param>``: gradients of :data:`GRAD_PARAMS` (PyTorch layout, OIHW).

``meta`` (JSON) holds the seeds, shapes, digests, per-phase float32 noise of the
reference (max|f32 - f64| / max|f64| for each gradient, the same model run in float64)
and the assignment's decision margins: how far the recorded inputs are from flipping
a discrete choice (dynamic k, top-k membership, conflict argmin). The script refuses to
write a fixture whose margins are so small that float32 noise could flip a choice.
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

from nanodet_jax import runtime  # noqa: E402
from nanodet_jax.box_ops import center_priors  # noqa: E402
from nanodet_jax.config.loading import load_config  # noqa: E402
from nanodet_jax.testing import (  # noqa: E402
    SMALL_MODEL_OVERRIDES,
    array_digest,
    normal_input,
    random_state_dict,
)
from tools.make_golden import _git_commit, rel_error  # noqa: E402
from tools.reference import load_reference  # noqa: E402

CONFIG = "configs/nanodet_plus_m.py"
# SiLU instead of LeakyReLU: at LeakyReLU's kink a pre-activation within rounding of 0
# switches its slope between 1 and 0.1, which leaves PyTorch's own float32 gradients
# 1e-3 to 1e-2 (relative) away from its float64 ones on this model (measured), so no
# float32 implementation could be checked at 1e-4. With a smooth activation that noise
# is ~1e-5. The forward pass with LeakyReLU is covered by golden_model.npz.
OVERRIDES = [o for o in SMALL_MODEL_OVERRIDES if ".arch." in o] + [
    f"--config.model.arch.{part}.activation=SiLU"
    for part in ("backbone", "fpn", "head", "aux_head")
]
INPUT_SHAPE = (3, 3, 128, 160)  # NCHW
WEIGHT_SEED, INPUT_SEED, GT_SEED = 3, 21, 5
MAX_GTS = 32
PHASES = {"joint": 0, "detached": None}  # epoch; None = detach_epoch
GRAD_PARAMS = (
    "backbone.conv1.0.weight",
    "backbone.stage2.0.branch1.1.weight",  # BatchNorm
    "backbone.stage4.0.branch1.3.weight",  # BatchNorm, deepest stage
    "fpn.reduce_layers.1.conv.weight",
    "fpn.extra_lvl_out_conv.0.pwnorm.weight",  # BatchNorm on the 2x3 level
    "aux_fpn.reduce_layers.2.conv.weight",
    "head.gfl_cls.0.weight",
    "head.gfl_cls.3.bias",
    "aux_head.cls_convs.0.gn.weight",  # GroupNorm
    "aux_head.gfl_reg.weight",
    "aux_head.scales.0.scale",
)
MIN_MARGIN = 1e-3  # smallest acceptable decision margin (float32 noise is ~1e-5)
FORMAT_VERSION = 1


def make_ground_truth(height: int, width: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(boxes [n, 4] float32, labels [n] int64) per image: few, none, crowded."""
    few = (
        np.array(
            [[10, 12, 60, 70], [70.5, 20, 150, 110.25], [30, 80, 90, 126], [100, 5, 131, 40]],
            np.float32,
        ),
        np.array([0, 3, 1, 4], np.int64),
    )
    none = (np.zeros((0, 4), np.float32), np.zeros((0,), np.int64))
    special = [
        [41.5, 41.5, 46.0, 47.0],  # tiny, no prior centre strictly inside
        [2.0, 98.0, 7.0, 103.0],  # tiny, no prior centre strictly inside
        [0.0, 0.0, 30.5, 20.0],  # on the top-left border (prior (0, 0) is not inside)
        [130.0, 100.0, 160.0, 128.0],  # on the bottom-right border
        [0.0, 60.0, 12.0, 128.0],  # on the left border, full height below 60
        [16.0, 16.0, 48.0, 40.0],  # edges on prior lines: those priors are not inside
        [17.0, 17.0, 47.0, 39.0],  # nearly the same box
        [8.0, 8.0, 152.0, 120.0],  # nearly the whole image
    ]
    rng = np.random.default_rng(GT_SEED)
    boxes = [np.array(b, np.float32) for b in special]
    while len(boxes) < 25:
        w, h = np.exp(rng.uniform(np.log(5), np.log(90), 2))
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        b = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        b = np.clip(b, 0, [width, height, width, height]).astype(np.float32)
        if b[2] - b[0] >= 2 and b[3] - b[1] >= 2:
            boxes.append(np.round(b * 4) / 4)  # quarter pixels
    crowded = (np.stack(boxes).astype(np.float32), rng.integers(0, 5, len(boxes)))
    return [few, none, crowded]


def pad_ground_truth(gts, max_gts: int = MAX_GTS) -> dict[str, np.ndarray]:
    n = len(gts)
    out = {
        "gt_boxes": np.zeros((n, max_gts, 4), np.float32),
        "gt_labels": np.zeros((n, max_gts), np.int32),
        "gt_mask": np.zeros((n, max_gts), bool),
    }
    for i, (boxes, labels) in enumerate(gts):
        out["gt_boxes"][i, : len(boxes)] = boxes
        out["gt_labels"][i, : len(boxes)] = labels
        out["gt_mask"][i, : len(boxes)] = True
    return out


def run_phase(tm, x: np.ndarray, gts, epoch: int) -> tuple[dict, dict, dict]:
    """One NanoDet training step's forward/backward: (outputs + targets, losses, grads)."""
    import torch

    head = tm.head
    captured: dict[str, list] = {"assign": [], "targets": []}
    assign, target_assign = head.assigner.assign, head.target_assign_single_img

    def capture_assign(*args, **kwargs):
        result = assign(*args, **kwargs)
        captured["assign"].append(result.gt_inds.clone())
        return result

    def capture_targets(*args, **kwargs):
        # NanoDet's target assignment hard-codes float32 buffers and fails on float64
        # inputs; the float64 run (a noise estimate only) assigns on float32 copies and
        # computes its losses from float64 copies of the targets.
        result = target_assign(*[_to(a, torch.float32) for a in args], **kwargs)
        result = tuple(_to(t, dtype) for t in result)
        captured["targets"].append(result)
        return result

    head.assigner.assign, head.target_assign_single_img = capture_assign, capture_targets
    dtype = next(tm.parameters()).dtype
    try:
        tm.train()
        tm.set_epoch(epoch)
        tm.zero_grad()
        meta = {
            "img": torch.from_numpy(x).to(dtype),
            "gt_bboxes": [b for b, _ in gts],
            "gt_labels": [lab for _, lab in gts],
            "gt_bboxes_ignore": None,
        }
        outs = {}
        hook = tm.aux_head.register_forward_hook(lambda m, i, o: outs.update(aux_out=o))
        try:
            head_out, loss, states = tm.forward_train(meta)
        finally:
            hook.remove()
        loss.backward()
    finally:
        del head.assigner.assign, head.target_assign_single_img
    params = dict(tm.named_parameters())
    grads = {k: params[k].grad.detach().double().numpy() for k in GRAD_PARAMS}
    losses = {k: float(v.detach()) for k, v in states.items()}
    losses["total"] = float(loss.detach())

    # A positive has gt_inds > 0 (1-based); everything else is background here.
    assigned = np.stack([g.numpy() for g in captured["assign"]]).astype(np.int64) - 1
    assigned[assigned < 0] = -1
    labels, scores, _, bbox_t, dist_t, _ = zip(*captured["targets"])
    record = {
        "head_out": head_out.detach().double().numpy(),
        "aux_out": outs["aux_out"].detach().double().numpy(),
        "assigned_gt": assigned,
        "labels": np.stack([t.numpy() for t in labels]),
        "label_scores": np.stack([t.double().numpy() for t in scores]),
        "bbox_targets": np.stack([t.double().numpy() for t in bbox_t]),
        "dist_targets": np.stack([t.double().numpy() for t in dist_t]),
    }
    return record, losses, grads


def _to(value, dtype):
    import torch

    if torch.is_tensor(value) and value.is_floating_point():
        return value.to(dtype)
    return value


def decision_margins(
    aux_out: np.ndarray, priors: np.ndarray, gts, num_classes: int, topk: int = 13
) -> dict[str, float]:
    """Distance (float64, from the given aux outputs) of every discrete assigner choice
    from its flipping point: the IoU sum behind each dynamic k from the next integer
    boundary (>= 2; below 2 the clamp to 1 hides it), the gap between the k-th and
    (k+1)-th cheapest candidate of each gt, and for priors several gts take, the gap
    between the best and second-best cost of the row."""
    out = {"dynamic_k": np.inf, "topk_gap": np.inf, "conflict_gap": np.inf}
    bins = (aux_out.shape[-1] - num_classes) // 4
    for img, (gt, labels) in enumerate(gts):
        if len(gt) == 0:
            continue
        logits = aux_out[img, :, :num_classes].astype(np.float64)
        reg = aux_out[img, :, num_classes:].reshape(-1, 4, bins).astype(np.float64)
        prob = np.exp(reg - reg.max(-1, keepdims=True))
        dist = (prob / prob.sum(-1, keepdims=True)) @ np.arange(bins) * priors[:, 2:3]
        c = priors[:, :2].astype(np.float64)
        boxes = np.concatenate([c - dist[:, :2], c + dist[:, 2:]], axis=1)
        inside = np.all(
            np.concatenate([c[:, None] - gt[None, :, :2], gt[None, :, 2:] - c[:, None]], -1) > 0,
            -1,
        )
        valid = inside.any(1)
        if not valid.any():
            continue
        b, g = boxes[valid][:, None], gt[None].astype(np.float64)
        wh = np.clip(
            np.minimum(b[..., 2:], g[..., 2:]) - np.maximum(b[..., :2], g[..., :2]), 0, None
        )
        overlap = wh[..., 0] * wh[..., 1]
        area = lambda z: (z[..., 2] - z[..., 0]) * (z[..., 3] - z[..., 1])  # noqa: E731
        iou = overlap / np.maximum(area(b) + area(g) - overlap, 1e-6)
        soft = np.eye(num_classes)[labels][None] * iou[..., None]
        x = logits[valid][:, None]
        sig = 1 / (1 + np.exp(-x))
        bce = (1 - soft) * x + np.log1p(np.exp(-x))
        cost = (bce * (soft - sig) ** 2).sum(-1) - 3.0 * np.log(iou + 1e-7)
        sums = -np.sort(-iou, axis=0)[: min(topk, len(iou))].sum(0)
        ks = np.maximum(sums.astype(int), 1)
        boundary = sums[sums >= 1.5]
        if boundary.size:
            out["dynamic_k"] = min(out["dynamic_k"], np.abs(boundary - np.round(boundary)).min())
        match = np.zeros(cost.shape, bool)
        for j, k in enumerate(ks):
            order = np.sort(cost[:, j])
            if len(order) > k:
                out["topk_gap"] = min(out["topk_gap"], order[k] - order[k - 1])
            match[np.argsort(cost[:, j], kind="stable")[:k], j] = True
        rows = np.sort(cost[match.sum(1) > 1], axis=1)
        if len(rows) and rows.shape[1] > 1:
            out["conflict_gap"] = min(out["conflict_gap"], (rows[:, 1] - rows[:, 0]).min())
    return {k: float(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> None:
    runtime.configure_xla()  # the entry points' XLA settings, before any computation
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("ref_path", help="checkout of RangiLyu/nanodet")
    p.add_argument("--out", default=os.path.join(REPO, "tests", "data", "golden_train.npz"))
    args = p.parse_args(argv)

    import torch

    torch.manual_seed(0)  # only the (overwritten) default init draws from it
    ref = load_reference(args.ref_path)
    config = load_config(os.path.join(REPO, CONFIG), OVERRIDES)
    arch = config.model.arch
    tm = ref.build_model(arch.to_dict())
    shapes = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    weights = random_state_dict(shapes, WEIGHT_SEED)
    tm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()}, strict=True)
    tm64 = copy.deepcopy(tm).double()
    x = normal_input(INPUT_SEED, INPUT_SHAPE)
    gts = make_ground_truth(*INPUT_SHAPE[2:])
    num_classes = arch.head.num_classes
    priors = center_priors(INPUT_SHAPE[2:], arch.head.strides)

    arrays = pad_ground_truth(gts)
    meta = {
        "format": FORMAT_VERSION,
        "config": CONFIG,
        "overrides": OVERRIDES,
        "reference_commit": _git_commit(args.ref_path),
        "torch_version": torch.__version__,
        "weight_seed": WEIGHT_SEED,
        "input_seed": INPUT_SEED,
        "input_shape_nchw": list(INPUT_SHAPE),
        "input_sha256": array_digest({"input": x}),
        "weights_sha256": array_digest(weights),
        "grad_params": list(GRAD_PARAMS),
        "phases": {},
        "float32_noise": {},
    }
    first = None
    for phase, epoch in PHASES.items():
        epoch = arch.detach_epoch if epoch is None else epoch
        record, losses, grads = run_phase(tm, x, gts, epoch)
        record64, losses64, grads64 = run_phase(tm64, x, gts, epoch)
        for k in ("assigned_gt", "labels"):
            if not np.array_equal(record[k], record64[k]):
                raise RuntimeError(f"{phase}: float32 and float64 reference differ in {k}")
        if first is None:
            first = record
            for k, v in record.items():
                arrays[k] = v.astype(np.int32 if v.dtype.kind == "i" else np.float32)
        elif not all(np.array_equal(first[k], record[k]) for k in record):
            raise RuntimeError("the phases' forward passes differ")
        for k, v in losses.items():
            arrays[f"{phase}/loss/{k}"] = np.float32(v)
        for k, v in grads.items():
            arrays[f"{phase}/grad/{k}"] = v.astype(np.float32)
        meta["phases"][phase] = {"epoch": int(epoch), "detach": bool(epoch >= arch.detach_epoch)}
        meta["float32_noise"][phase] = {
            **{f"loss/{k}": rel_error(losses[k], losses64[k]) for k in losses},
            **{f"grad/{k}": rel_error(grads[k], grads64[k]) for k in grads},
        }
        print(f"{phase} (epoch {epoch}): " + ", ".join(f"{k}={v:.6f}" for k, v in losses.items()))

    meta["margins"] = decision_margins(first["aux_out"], priors, gts, num_classes)
    pos = first["assigned_gt"] >= 0
    meta["stats"] = {
        "positives_per_image": pos.sum(1).tolist(),
        "gts_matched_outside_own_box": int(_outside_matches(first["assigned_gt"], priors, gts)),
    }
    print("margins:", meta["margins"], "stats:", meta["stats"])
    if min(meta["margins"].values()) < MIN_MARGIN:
        raise RuntimeError(f"decision margin below {MIN_MARGIN}: choose other seeds")
    arrays["meta"] = np.asarray(json.dumps(meta, sort_keys=True))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: {os.path.getsize(args.out) / 2**10:.0f} KiB")


def _outside_matches(assigned: np.ndarray, priors: np.ndarray, gts) -> int:
    """Positives whose assigned gt box does not contain the prior centre (a NanoDet quirk)."""
    count = 0
    for img, (boxes, _) in enumerate(gts):
        for p in np.flatnonzero(assigned[img] >= 0):
            x1, y1, x2, y2 = boxes[assigned[img, p]]
            px, py = priors[p, :2]
            count += not (x1 < px < x2 and y1 < py < y2)
    return count


if __name__ == "__main__":
    main()
