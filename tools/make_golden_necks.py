"""Record golden outputs of NanoDet's legacy necks (FPN, PAN, TAN) for
``tests/models/test_necks.py``.

Usage (from the repository root, with torch installed)::

    python tools/make_golden_necks.py /path/to/nanodet [--out tests/data/golden_necks.npz]

For every entry of :data:`VARIANTS` (a neck config, at reduced widths, with the
arguments of the legacy configs that use it, plus options they leave at their defaults)
the script builds NanoDet's own neck with ``build_fpn``, fills it with
``nanodet_jax.testing.random_state_dict(shapes, seed)`` and feeds seeded N(0, 1) levels
of the shapes ShuffleNetV2 gives for a 2 x 3 x 64 x 96 image (strides 8, 16, 32, and 4
where a variant takes four levels). It records, feature maps NHWC float32:

* ``<variant>/eval/<i>``: eval-mode outputs;
* ``<variant>/train/<i>``: train mode (BatchNorm on batch statistics) with dropout off
  (its random masks cannot be reproduced), and ``<variant>/train/state/<key>`` every
  BatchNorm statistic after that forward;
* ``resize/...``: ``F.interpolate(mode="bilinear")`` by size and by scale factor,
  including odd sizes, where the two differ.

The same modules also run in float64; ``meta["variants"][v]["float32_noise"]`` holds
the float32 reference's own error ``max|f32 - f64| / max|f64|`` per recorded tensor.
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
from tools.reference import load_reference  # noqa: E402

BATCH = 2
LEVELS_HW = {4: (16, 24), 8: (8, 12), 16: (4, 6), 32: (2, 3)}  # stride -> (h, w) of 64x96

VARIANTS: dict[str, dict] = {
    # No legacy config uses FPN; its defaults, then levels cut at both ends with GroupNorm.
    "fpn": {
        "cfg": {"name": "FPN", "in_channels": [12, 24, 48], "out_channels": 16, "num_outs": 3},
        "strides": [8, 16, 32],
    },
    "fpn_levels_gn": {
        "cfg": {
            "name": "FPN",
            "in_channels": [8, 12, 24, 48],
            "out_channels": 16,
            "num_outs": 2,
            "start_level": 1,
            "end_level": 3,
            "norm_cfg": {"type": "GN", "num_groups": 4},
            "activation": "ReLU",
        },
        "strides": [4, 8, 16, 32],
    },
    # nanodet-m.yml's arguments (and every other legacy PAN config's) at reduced widths.
    "pan": {
        "cfg": {
            "name": "PAN",
            "in_channels": [12, 24, 48],
            "out_channels": 16,
            "start_level": 0,
            "num_outs": 3,
        },
        "strides": [8, 16, 32],
    },
    # BatchNorm + activation in the laterals, and num_outs above the level count (allowed,
    # adds nothing).
    "pan_bn": {
        "cfg": {
            "name": "PAN",
            "in_channels": [12, 24, 48],
            "out_channels": 16,
            "num_outs": 4,
            "norm_cfg": {"type": "BN"},
            "activation": "LeakyReLU",
        },
        "strides": [8, 16, 32],
    },
    # nanodet-t.yml's arguments at reduced widths (8 heads of 4 channels), two encoders.
    "tan": {
        "cfg": {
            "name": "TAN",
            "in_channels": [12, 24, 48],
            "out_channels": 32,
            "feature_hw": [4, 6],
            "num_heads": 8,
            "num_encoders": 2,
            "mlp_ratio": 4,
            "dropout_ratio": 0.1,
            "activation": "LeakyReLU",
        },
        "strides": [8, 16, 32],
    },
}
WEIGHT_SEED, INPUT_SEED = 21, 31
RESIZE_INPUT = (2, 3, 5, 7)  # NCHW
# (name, size or None, scale factor or None)
RESIZES = [
    ("size_3x4", (3, 4), None),
    ("size_10x14", (10, 14), None),
    ("size_9x13", (9, 13), None),
    ("scale_0.5", None, 0.5),
    ("scale_2", None, 2.0),
]
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def level_shapes(spec: dict) -> list[tuple[int, int, int, int]]:
    """NCHW shapes of a variant's input levels."""
    cfg = spec["cfg"]
    return [(BATCH, c, *LEVELS_HW[s]) for c, s in zip(cfg["in_channels"], spec["strides"])]


def make_inputs(spec: dict) -> list[np.ndarray]:
    return [normal_input(INPUT_SEED + i, s) for i, s in enumerate(level_shapes(spec))]


def rel_error(a: np.ndarray, ref: np.ndarray) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    scale = float(np.abs(ref).max())
    return float(np.abs(a - ref).max()) / (scale if scale > 0 else 1.0)


def _nhwc(t) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy().transpose(0, 2, 3, 1))


def _run(neck, xs: list[np.ndarray], mode: str, dtype) -> list[np.ndarray]:
    import torch

    neck.train(mode == "train")
    for m in neck.modules():
        if isinstance(m, torch.nn.Dropout) or isinstance(m, torch.nn.MultiheadAttention):
            m.eval()  # dropout off; MultiheadAttention's dropout is its own flag
    with torch.no_grad():
        outs = neck([torch.from_numpy(x.astype(dtype)) for x in xs])
    return [_nhwc(o) for o in outs]


def record_variant(ref, name: str, spec: dict) -> tuple[dict[str, np.ndarray], dict]:
    import torch

    build_fpn = ref.module("nanodet.model.fpn").build_fpn
    neck = build_fpn(copy.deepcopy(spec["cfg"]))
    shapes = {k: tuple(v.shape) for k, v in neck.state_dict().items()}
    weights = random_state_dict(shapes, WEIGHT_SEED)
    neck.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    neck64 = copy.deepcopy(neck).double()
    xs = make_inputs(spec)
    arrays, noise = {}, {}
    for mode in ("eval", "train"):
        outs = _run(neck, xs, mode, np.float32)
        outs64 = _run(neck64, xs, mode, np.float64)
        for i, (o, o64) in enumerate(zip(outs, outs64)):
            arrays[f"{name}/{mode}/{i}"] = o.astype(np.float32)
            noise[f"{mode}/{i}"] = rel_error(o, o64)
    sd, sd64 = neck.state_dict(), neck64.state_dict()
    for k, v in sd.items():
        if k.rsplit(".", 1)[-1] in BN_STATS:
            arrays[f"{name}/train/state/{k}"] = v.numpy()
            if not k.endswith("num_batches_tracked"):
                noise[f"train/state/{k}"] = rel_error(v.numpy(), sd64[k].numpy())
    meta = {
        "cfg": spec["cfg"],
        "input_shapes_nchw": [list(s) for s in level_shapes(spec)],
        "inputs_sha256": array_digest({str(i): x for i, x in enumerate(xs)}),
        "weights_sha256": array_digest(weights),
        "torch_keys": {k: list(s) for k, s in shapes.items()},
        "float32_noise": noise,
    }
    return arrays, meta


def record_resizes() -> dict[str, np.ndarray]:
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(normal_input(INPUT_SEED, RESIZE_INPUT))
    out = {}
    for name, size, scale in RESIZES:
        y = F.interpolate(x, size=size, scale_factor=scale, mode="bilinear", align_corners=False)
        out[f"resize/{name}"] = _nhwc(y)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("ref_path", help="checkout of RangiLyu/nanodet")
    p.add_argument("--out", default=os.path.join(REPO, "tests", "data", "golden_necks.npz"))
    args = p.parse_args(argv)

    import torch

    torch.manual_seed(0)  # only the (overwritten) default init draws from it
    ref = load_reference(args.ref_path)
    arrays = record_resizes()
    meta = {
        "torch_version": torch.__version__,
        "weight_seed": WEIGHT_SEED,
        "input_seed": INPUT_SEED,
        "resize_input_nchw": list(RESIZE_INPUT),
        "resizes": RESIZES,
        "variants": {},
    }
    for name, spec in VARIANTS.items():
        variant_arrays, meta["variants"][name] = record_variant(ref, name, spec)
        arrays.update(variant_arrays)
        worst = max(meta["variants"][name]["float32_noise"].items(), key=lambda kv: kv[1])
        print(f"{name}: {len(variant_arrays)} arrays; worst float32 noise {worst}")
    arrays["meta"] = np.asarray(json.dumps(meta, sort_keys=True))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: {os.path.getsize(args.out) / 2**10:.1f} KiB")


if __name__ == "__main__":
    main()
