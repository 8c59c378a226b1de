"""Record NanoDet's legacy OneStageDetector (GFLHead / NanoDetHead) for
``tests/models/test_one_stage.py``: eval outputs, ATSS targets, loss terms, gradients.

Usage (from the repository root, with torch installed)::

    python tools/make_golden_legacy.py /path/to/nanodet [--out tests/data/golden_legacy.npz]

Each variant of :data:`VARIANTS` is NanoDet's own ``OneStageDetector`` on a narrow
ShuffleNetV2 0.5x + GhostPAN (3 levels; NanoDet's legacy configs use PAN, not here yet)
with a 5-class head, filled with ``random_state_dict(shapes, seed)`` (every norm's
affine and running statistics randomised), on a seeded N(0, 1) batch of 3 x 3 x 64 x 64:

* ``<v>/eval``: the raw head output in eval mode;
* ``<v>/train``: the train-mode output (BatchNorm on batch statistics) and, through
  ``forward_train`` and ``head.loss`` on gts (image 0 a few boxes, image 1 none,
  image 2 crowded with an exact duplicate), the per-cell ATSS result
  (``assigned_gt``, -1 background; ``labels``), ``loss/<term>`` and, under
  ``<v>/train/grad64``, the float64 gradients of every parameter with PyTorch float32's
  distance from them (``tools/grad_precision.py``'s ``golden_gradients``; not for
  variants with ``grads: False``).

``<v>/decoded_boxes`` are GFLHead.get_bboxes' boxes of the eval output before NMS.

Gradient-checked variants use SiLU where NanoDet lets the config choose (GFLHead's
towers are ReLU by construction): at a kink a pre-activation within rounding of 0 picks
a slope, which makes float32 gradients noisy. ``meta`` holds, per variant, the float32
reference's own error against the same model in float64 (``noise``), which the test's
output and loss tolerances scale with.
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
from tools.grad_precision import golden_gradients  # noqa: E402
from tools.make_golden import rel_error  # noqa: E402
from tools.make_golden_atss import _straddles  # noqa: E402
from tools.reference import _AttrDict, load_reference  # noqa: E402

INPUT_SHAPE = (3, 3, 64, 64)  # NCHW
INPUT_SEED, GT_SEED = 31, 6
MAX_GTS = 16
LOSS = {
    "loss_qfl": {"name": "QualityFocalLoss", "use_sigmoid": True, "beta": 2.0, "loss_weight": 1.0},
    "loss_dfl": {"name": "DistributionFocalLoss", "loss_weight": 0.25},
    "loss_bbox": {"name": "GIoULoss", "loss_weight": 2.0},
}


def _arch(head: dict, activation: str) -> dict:
    return {
        "name": "OneStageDetector",
        "backbone": {
            "name": "ShuffleNetV2",
            "model_size": "0.5x",
            "out_stages": [2, 3, 4],
            "activation": activation,
            "pretrain": False,
        },
        "fpn": {
            "name": "GhostPAN",
            "in_channels": [48, 96, 192],
            "out_channels": 32,
            "kernel_size": 5,
            "num_extra_level": 0,
            "use_depthwise": True,
            "activation": activation,
        },
        "head": {
            "num_classes": 5,
            "input_channel": 32,
            "feat_channels": 32,
            "stacked_convs": 2,
            "strides": [8, 16, 32],
            "reg_max": 7,
            "loss": LOSS,
            **head,
        },
    }


VARIANTS = {
    "gfl": {
        "arch": _arch(
            {
                "name": "GFLHead",
                "octave_base_scale": 4,
                "norm_cfg": {"type": "GN", "num_groups": 8},
            },
            "SiLU",
        ),
        "weight_seed": 41,
    },
    # nanodet-m's head: depthwise towers, BatchNorm, classes and boxes from one conv.
    "nanodet_dw": {
        "arch": _arch(
            {
                "name": "NanoDetHead",
                "conv_type": "DWConv",
                "share_cls_reg": True,
                "octave_base_scale": 5,
                "scales_per_octave": 1,
                "norm_cfg": {"type": "BN"},
                "activation": "SiLU",
            },
            "SiLU",
        ),  # fmt: skip
        "weight_seed": 42,
    },
    "nanodet_conv": {
        "arch": _arch(
            {
                "name": "NanoDetHead",
                "conv_type": "Conv",
                "share_cls_reg": False,
                "octave_base_scale": 5,
                "norm_cfg": {"type": "GN", "num_groups": 8},
                "activation": "SiLU",
            },
            "SiLU",
        ),  # fmt: skip
        "weight_seed": 43,
        # A third full gradient check costs the test ~100 s of compilation for the same
        # backbone and PAN; this variant's towers are checked by its outputs and losses.
        "grads": False,
    },
}


def make_ground_truth(cells: np.ndarray, counts: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(boxes, labels) per image: a few, none, crowded (with an exact duplicate)."""
    rng = np.random.default_rng(GT_SEED)

    def boxes(n):
        out = []
        while len(out) < n:
            w, h = np.exp(rng.uniform(np.log(4), np.log(60), 2))
            cx, cy = rng.uniform(0, 64, 2)
            b = np.clip([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 0, 64).astype(np.float32)
            if b[2] - b[0] >= 2 and b[3] - b[1] >= 2 and not _straddles(b, cells, counts):
                out.append(b)
        return out

    few = boxes(3)
    crowded = boxes(13)
    crowded.insert(4, crowded[3].copy())
    return [
        (np.stack(few), rng.integers(0, 5, 3)),
        (np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)),
        (np.stack(crowded), rng.integers(0, 5, len(crowded))),
    ]


def build(ref, arch: dict):
    arch = copy.deepcopy(arch)
    arch.pop("name")
    arch["head"]["loss"] = _AttrDict.wrap(arch["head"]["loss"])
    mod = ref.module("nanodet.model.arch.one_stage_detector")
    return mod.OneStageDetector(arch["backbone"], arch["fpn"], arch["head"])


def train_step(tm, x: np.ndarray, gts, grad_params) -> tuple[dict, dict, dict]:
    import torch

    head = tm.head
    captured = []
    assign = head.assigner.assign

    def capture(*args, **kwargs):
        # ATSS depends on geometry only; the float64 run assigns on float32 cells too.
        result = assign(*args, **kwargs)
        captured.append(result.gt_inds.clone())
        return result

    dtype = next(tm.parameters()).dtype
    target_assign = head.target_assign_single_img

    def cast_targets(*args, **kwargs):
        # NanoDet's targets are float32 whatever the model's dtype, and its loss then
        # fails to mix them with float64 predictions: the float64 run (a noise estimate)
        # gets float64 copies.
        return tuple(
            t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t
            for t in target_assign(*args, **kwargs)
        )

    head.assigner.assign, head.target_assign_single_img = capture, cast_targets
    try:
        tm.train()
        tm.zero_grad()
        meta = {
            "img": torch.from_numpy(x).to(dtype),
            "gt_bboxes": [b for b, _ in gts],
            "gt_labels": [lab for _, lab in gts],
            "gt_bboxes_ignore": None,
        }
        out, loss, states = tm.forward_train(meta)
        loss.backward()
    finally:
        del head.assigner.assign, head.target_assign_single_img
    params = dict(tm.named_parameters())
    # Parameters the forward never uses (NanoDetHead's gfl_reg with share_cls_reg) get
    # no gradient in PyTorch: recorded as zeros, which is what JAX gives them.
    grads = {
        k: np.zeros(params[k].shape) if params[k].grad is None else params[k].grad.double().numpy()
        for k in grad_params
    }
    losses = {k: float(v.detach()) for k, v in states.items()}
    losses["total"] = float(loss.detach())
    assigned = np.stack([g.numpy() for g in captured]).astype(np.int64) - 1
    assigned[assigned < 0] = -1
    labels = np.full(assigned.shape, 5, np.int64)
    for i, (_, lab) in enumerate(gts):
        pos = assigned[i] >= 0
        labels[i, pos] = lab[assigned[i, pos]]
    record = {"out": out.detach().double().numpy(), "assigned_gt": assigned, "labels": labels}
    return record, losses, grads


def decode_like_get_bboxes(ref, head, raw: np.ndarray, input_hw) -> np.ndarray:
    """GFLHead.get_bboxes up to its NMS: priors at cell centres, the distribution's
    integral times the stride, boxes clipped to the input (the scores are a sigmoid)."""
    import torch

    util = ref.module("nanodet.util")
    priors = []
    for s in head.strides:
        size = (-(-input_hw[0] // s), -(-input_hw[1] // s))
        y, x = head.get_single_level_center_point(size, s, torch.float32, "cpu")
        priors.append(torch.stack([x, y, x.new_full(x.shape, s), x.new_full(x.shape, s)], -1))
    priors = torch.cat(priors)
    with torch.no_grad():
        reg = torch.from_numpy(raw[..., head.num_classes :].copy())
        dist = head.distribution_project(reg) * priors[..., 2, None]
        boxes = util.distance2bbox(priors[..., :2], dist, max_shape=tuple(input_hw))
    return boxes.numpy().astype(np.float32)


def record_variant(ref, name: str, spec: dict, x: np.ndarray, gts) -> tuple[dict, dict]:
    import torch

    tm = build(ref, spec["arch"])
    shapes = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    weights = random_state_dict(shapes, spec["weight_seed"])
    tm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()}, strict=True)
    tm64 = copy.deepcopy(tm).double()
    arrays, noise = {}, {}
    with torch.no_grad():
        tm.eval()
        tm64.eval()
        ev = tm(torch.from_numpy(x)).numpy()
        ev64 = tm64(torch.from_numpy(x).double()).numpy()
    arrays[f"{name}/eval"] = ev.astype(np.float32)
    arrays[f"{name}/decoded_boxes"] = decode_like_get_bboxes(ref, tm.head, ev, x.shape[2:])
    noise["eval"] = rel_error(ev, ev64)
    grad_params = tuple(k for k, _ in tm.named_parameters()) if spec.get("grads", True) else ()
    rec, losses, grads = train_step(tm, x, gts, grad_params)
    rec64, losses64, grads64 = train_step(tm64, x, gts, grad_params)
    assert np.array_equal(rec["assigned_gt"], rec64["assigned_gt"])
    for k in ("assigned_gt", "labels"):
        arrays[f"{name}/train/{k}"] = rec[k]
    arrays[f"{name}/train/out"] = rec["out"].astype(np.float32)
    noise["train/out"] = rel_error(rec["out"], rec64["out"])
    for k, v in losses.items():
        arrays[f"{name}/train/loss/{k}"] = np.float32(v)
        noise[f"loss/{k}"] = abs(v - losses64[k]) / max(abs(losses64[k]), 1e-12)
    if grad_params:
        arrays.update(golden_gradients(f"{name}/train/grad64", grads, grads64))
    meta = {
        "arch": spec["arch"],
        "weight_seed": spec["weight_seed"],
        "weights_sha256": array_digest(weights),
        "num_positive": int((rec["assigned_gt"] >= 0).sum()),
        "noise": noise,
    }
    return arrays, meta


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("ref_path", help="checkout of RangiLyu/nanodet")
    p.add_argument("--out", default=os.path.join(REPO, "tests", "data", "golden_legacy.npz"))
    args = p.parse_args(argv)

    import torch

    torch.manual_seed(0)
    ref = load_reference(args.ref_path)
    from nanodet_jax.assigners.atss import grid_cells

    # The straddle check needs the cells of the densest setting (octave only scales them).
    cells, counts = grid_cells(INPUT_SHAPE[2:], (8, 16, 32), 5)
    gts = make_ground_truth(cells, list(counts))
    x = normal_input(INPUT_SEED, INPUT_SHAPE)
    arrays = {
        "gt_boxes": np.zeros((3, MAX_GTS, 4), np.float32),
        "gt_labels": np.zeros((3, MAX_GTS), np.int32),
        "gt_mask": np.zeros((3, MAX_GTS), bool),
    }
    for i, (b, lab) in enumerate(gts):
        arrays["gt_boxes"][i, : len(b)] = b
        arrays["gt_labels"][i, : len(b)] = lab
        arrays["gt_mask"][i, : len(b)] = True
    meta = {
        "format_version": 1,
        "input_shape_nchw": list(INPUT_SHAPE),
        "input_seed": INPUT_SEED,
        "input_sha256": array_digest({"input": x}),
        "variants": {},
    }
    for name, spec in VARIANTS.items():
        a, m = record_variant(ref, name, spec, x, gts)
        arrays.update(a)
        meta["variants"][name] = m
        print(name, "positives", m["num_positive"], "worst noise", max(m["noise"].values()))
    np.savez_compressed(args.out, **arrays, meta=json.dumps(meta))
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
