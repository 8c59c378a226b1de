"""Record golden outputs of the PyTorch NanoDet reference for
``tests/models/test_golden_parity.py``.

Usage (from the repository root, with torch installed)::

    python tools/make_golden.py /path/to/nanodet [--out tests/data/golden_model.npz]

``/path/to/nanodet`` is a checkout of RangiLyu/nanodet. For every variant in
:data:`VARIANTS` (NanoDet-Plus-m as configured in ``configs/nanodet_plus_m.py``, and
a narrow ShuffleNetV2-0.5x variant of it made with ``--config.`` overrides) the script
builds NanoDet's own ``NanoDetPlus`` (aux branch included), fills it with
``nanodet_jax.testing.random_state_dict(shapes, seed)``, feeds a seeded N(0, 1) input
and records

* ``<variant>/eval/...``: eval mode (BatchNorm uses running statistics);
* ``<variant>/train/...``: train mode (BatchNorm uses batch statistics), one forward;
* ``<variant>/train/state/<stat>``: every BatchNorm's ``running_mean``,
  ``running_var`` and ``num_batches_tracked`` after that training forward, each kind
  concatenated over the layers listed (sorted) in the variant's ``bn_layers``;

where ``...`` is ``backbone/<i>``, ``fpn/<i>``, ``head``, ``aux_fpn/<i>``, ``aux_head``.
The same model is also run in float64; ``meta["variants"][v]["float32_noise"]`` holds,
per recorded tensor (per statistic kind for the BatchNorm state: worst layer), the
float32 reference's own error ``max|f32 - f64| / max|f64|``.
Feature maps are stored NHWC (our layout), everything float32 except
``num_batches_tracked`` (int64). The entry ``meta`` is a JSON string with the config
path, the overrides, the seeds, the input shape, the reference's key names and
shapes, and SHA-256 digests of the input and of the weights, so the test can
rebuild exactly the same model and input without torch.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from collections.abc import Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from nanodet_jax import runtime  # noqa: E402
from nanodet_jax.config.loading import load_config  # noqa: E402
from nanodet_jax.testing import (  # noqa: E402
    SMALL_MODEL_OVERRIDES,
    array_digest,
    normal_input,
    random_state_dict,
)
from tools.reference import load_reference  # noqa: E402

CONFIG = "configs/nanodet_plus_m.py"
INPUT_SHAPE = (2, 3, 64, 96)  # NCHW; 64x96 gives 8x12, 4x6, 2x3 and 1x2 head levels
FORMAT_VERSION = 1

VARIANTS: dict[str, dict] = {
    "m": {"overrides": [], "weight_seed": 1, "input_seed": 11},
    # ShuffleNetV2 0.5x and 32-channel PAN: every code path of the full model, a third
    # of the values to store.
    "small": {
        "overrides": [o for o in SMALL_MODEL_OVERRIDES if ".arch." in o],
        "weight_seed": 2,
        "input_seed": 12,
    },
}

BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def make_input(seed: int, shape: Sequence[int] = INPUT_SHAPE) -> np.ndarray:
    """The NCHW float32 N(0, 1) input of a variant (the test builds the same one)."""
    return normal_input(seed, tuple(shape))


def _nhwc(t) -> np.ndarray:
    a = t.detach().cpu().numpy()
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1) if a.ndim == 4 else a)


def run_reference(tm, x_nchw: np.ndarray) -> dict[str, np.ndarray]:
    """One pass through every sub-module, as NanoDetPlus.forward_train wires them.

    Each BatchNorm runs exactly once, so in train mode the running statistics see
    exactly one update.
    """
    import torch

    with torch.no_grad():
        x = torch.from_numpy(x_nchw)
        feats = tm.backbone(x)
        fpn_feats = tm.fpn(feats)
        aux_fpn_feats = tm.aux_fpn(feats)
        head = tm.head(fpn_feats)
        dual = [torch.cat([f, a], dim=1) for f, a in zip(fpn_feats, aux_fpn_feats)]
        aux_head = tm.aux_head(dual)
    out = {}
    for name, tensors in (("backbone", feats), ("fpn", fpn_feats), ("aux_fpn", aux_fpn_feats)):
        for i, t in enumerate(tensors):
            out[f"{name}/{i}"] = _nhwc(t)
    out["head"] = _nhwc(head)
    out["aux_head"] = _nhwc(aux_head)
    return out


def rel_error(a: np.ndarray, ref: np.ndarray) -> float:
    """max|a - ref| / max|ref| (the test's metric)."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    scale = float(np.abs(ref).max())
    return float(np.abs(a - ref).max()) / (scale if scale > 0 else 1.0)


def _bn_stats(tm) -> dict[str, np.ndarray]:
    return {
        k: v.detach().cpu().numpy()
        for k, v in tm.state_dict().items()
        if k.rsplit(".", 1)[-1] in BN_STATS
    }


def record_variant(ref, name: str, spec: dict) -> tuple[dict[str, np.ndarray], dict]:
    import torch

    config = load_config(os.path.join(REPO, CONFIG), spec["overrides"])
    tm = ref.build_model(config.model.arch.to_dict())
    shapes = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    weights = random_state_dict(shapes, spec["weight_seed"])
    tm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()}, strict=True)
    # The same model in float64: its outputs are (nearly) exact, so the distance of the
    # float32 reference from them is the reference's own rounding error. Train-mode
    # BatchNorm on the coarse levels normalises over as few as 2 x 1 x 2 = 4 values per
    # channel, which amplifies rounding a lot; the test scales its tolerance with this.
    tm64 = copy.deepcopy(tm).double()
    x = make_input(spec["input_seed"])

    arrays: dict[str, np.ndarray] = {}
    noise: dict[str, float] = {}
    for mode in ("eval", "train"):
        getattr(tm, mode)()
        getattr(tm64, mode)()
        out32 = run_reference(tm, x)
        out64 = run_reference(tm64, x.astype(np.float64))
        for k, v in out32.items():
            arrays[f"{name}/{mode}/{k}"] = v.astype(np.float32)
            noise[f"{mode}/{k}"] = rel_error(v, out64[k])

    # The statistics of all BatchNorm layers are packed into one array per kind (a
    # zip entry costs ~300 bytes and there are ~140 layers per variant); the layer
    # order is meta["bn_layers"], each layer's length its weight's length.
    state, state64 = _bn_stats(tm), _bn_stats(tm64)
    bn_layers = sorted(k[: -len(".running_mean")] for k in state if k.endswith(".running_mean"))
    for stat in BN_STATS:
        keys = [f"{layer}.{stat}" for layer in bn_layers]
        dtype = np.int64 if stat == "num_batches_tracked" else np.float32
        packed = np.concatenate([np.atleast_1d(state[k]) for k in keys]).astype(dtype)
        arrays[f"{name}/train/state/{stat}"] = packed
        if stat != "num_batches_tracked":  # worst layer, each layer on its own scale
            noise[f"train/state/{stat}"] = max(rel_error(state[k], state64[k]) for k in keys)

    meta = {
        "overrides": list(spec["overrides"]),
        "weight_seed": spec["weight_seed"],
        "input_seed": spec["input_seed"],
        "input_shape_nchw": list(x.shape),
        "input_sha256": array_digest({"input": x}),
        "weights_sha256": array_digest(weights),
        "torch_keys": {k: list(s) for k, s in shapes.items()},
        "bn_layers": bn_layers,
        "float32_noise": noise,
    }
    return arrays, meta


def _git_commit(path: str) -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> None:
    runtime.configure_xla()  # the entry points' XLA settings, before any computation
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("ref_path", help="checkout of RangiLyu/nanodet")
    p.add_argument("--out", default=os.path.join(REPO, "tests", "data", "golden_model.npz"))
    args = p.parse_args(argv)

    import torch

    torch.manual_seed(0)  # only the (overwritten) default init draws from it
    ref = load_reference(args.ref_path)
    arrays: dict[str, np.ndarray] = {}
    meta = {
        "format": FORMAT_VERSION,
        "config": CONFIG,
        "reference_commit": _git_commit(args.ref_path),
        "torch_version": torch.__version__,
        "layout": "feature maps NHWC float32; head outputs [B, priors, channels]",
        "variants": {},
    }
    for name, spec in VARIANTS.items():
        variant_arrays, meta["variants"][name] = record_variant(ref, name, spec)
        arrays.update(variant_arrays)
        print(
            f"{name}: {len(variant_arrays)} arrays, "
            f"{sum(a.size for a in variant_arrays.values())} values"
        )
    arrays["meta"] = np.asarray(json.dumps(meta, sort_keys=True))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: {os.path.getsize(args.out) / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
