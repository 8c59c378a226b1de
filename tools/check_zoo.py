"""Whole-model parity and the .pth round trip for every .yml under NanoDet's ``config/``.

    python tools/check_zoo.py /path/to/nanodet [--size N] [--only SUBSTRING]

For each NanoDet config file (recursively under ``config/``):

1. NanoDet's own model is built from the file's ``model`` section (``build_model`` of its
   ``nanodet.model.arch``; the backbone's ImageNet start switched off) and filled with
   ``random_state_dict`` of its own state_dict layout, so every norm's affine and running
   statistics are away from identity. Ours is ``build_model(load_config(yml))`` and gets the
   same values through ``load_torch_weights``: strict, every key of the file used and every
   variable of ours set.
2. Both run in eval mode on one seeded ``normal_input`` batch (2 images, ``--size`` px
   square; a neck with a learned position embedding (TAN's ``feature_hw``) fixes the size,
   so those take the config's ``data.train.input_size``). The error is
   ``max|ours - ref| / max|ref|`` of the raw head output: NanoDet's heads return
   ``[B, priors, channels]``, the layout of ours, so the two are compared as they come.
3. ONNX: our inference model goes through the package's exporter (``export_onnx``, what
   ``nanodet-export`` runs) for the same input size and runs in onnxruntime (CPU) on the same
   batch; the output (class sigmoids + DFL logits) is compared with ours and NanoDet's in
   that space (``tools/zoo_onnx.py``). A model that does not export gets the exporter's line.
4. Our weights go back through ``torch_state_dict`` (what ``nanodet-convert
   --export-torch`` writes) into a fresh NanoDet model with ``load_state_dict(strict=True)``;
   the re-loaded model's output must equal step 2's reference output.
5. The inference model with BatchNorm folded into its convolutions (what ``Predictor``
   runs, ``nanodet_jax.models.batchnorm_folding``; on CPU the fused C++ kernels) against
   the same reference output, and against our plain model's output ("folded vs ours").

NanoDet-Plus: NanoDet's model always has the training-only AGM (``aux_fpn``, ``aux_head``).
Parity runs on our *inference* model (built without them, as the predictor and the ONNX
export use it: training-only keys of the file are ignored, every other key must be used);
the round trip needs the whole state_dict, so it exports a second model of ours built
*with* the training branches and loaded strictly from the same file.

Prints one row per file; exits 1 if a parity error exceeds ``--tol`` (1e-4), a strict load
fails, the exported values differ from the ones loaded, or the re-loaded output differs
from the first by more than 1e-6 relative (the same PyTorch model on the same values: 0);
also if a model does not export to ONNX or the file's output is off by more than ``--tol``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import glob
import inspect
import io
import os
import sys
import time
import zlib
from typing import Any

import numpy as np
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from nanodet_jax import runtime  # noqa: E402
from nanodet_jax.config.loading import load_config  # noqa: E402
from nanodet_jax.testing import normal_input, random_state_dict  # noqa: E402
from tools.reference import _AttrDict, load_reference  # noqa: E402
from tools.zoo_onnx import format_onnx, onnx_columns, onnx_failure  # noqa: E402

INPUT_SEED = 5
# The raw head output should stay in the range of a trained model's logits and
# distribution logits: beyond it, float32 rounding of large values dominates the metric
# and a sigmoid / softmax downstream would saturate. Random BatchNorm statistics through
# deep stacks can grow activations, so the final convs are scaled down until it is met.
MAX_LOGIT = 50.0


def nanodet_files(nanodet: str) -> list[str]:
    root = os.path.join(nanodet, "config")
    return sorted(glob.glob(os.path.join(root, "**", "*.yml"), recursive=True))


def reference_arch(ref, yml: str) -> dict:
    """The file's ``model.arch`` as NanoDet reads it, with no pretrained download."""
    with open(yml, encoding="utf-8") as f:
        arch = copy.deepcopy(yaml.safe_load(f)["model"]["arch"])
    backbone = arch["backbone"]
    cls = getattr(ref.module("nanodet.model.backbone"), backbone["name"])
    params = inspect.signature(cls.__init__).parameters
    # The keyword differs by backbone (timm's wrapper says ``pretrained``); some have none.
    for key in ("pretrain", "pretrained"):
        if key in params:
            backbone[key] = False
    return arch


def build_reference(ref, arch: dict):
    # NanoDet's builders read the config by attribute (yacs nodes); an attribute dict
    # stands in for yacs, which the reference loader does not need otherwise.
    # Its constructors print progress lines, which would break up the table.
    with contextlib.redirect_stdout(io.StringIO()):
        model = ref.module("nanodet.model.arch").build_model(_AttrDict.wrap({"arch": arch}))
    return model.eval()


def input_hw(config: Any, arch: dict, size: int) -> tuple[int, int]:
    if "feature_hw" in arch.get("fpn", {}):
        w, h = config.data.train.input_size  # NanoDet writes [w, h]
        return int(h), int(w)
    return size, size


def final_convs(state: dict[str, np.ndarray]) -> list[str]:
    """Kernels and biases of the heads' output convs (the layers producing the raw output)."""
    leaves = ("gfl_cls", "gfl_reg")
    return [k for k in state if any(f".{leaf}." in k for leaf in leaves)]


def torch_forward(model, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def load_into_reference(model, state: dict[str, np.ndarray]) -> None:
    import torch

    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})


def realistic_weights(
    tm, x: np.ndarray, seed: int
) -> tuple[dict[str, np.ndarray], np.ndarray, float]:
    """Random weights for NanoDet's model, output convs scaled so the output stays moderate;
    returns the weights, NanoDet's output and the total scale applied."""
    state = random_state_dict({k: tuple(v.shape) for k, v in tm.state_dict().items()}, seed)
    load_into_reference(tm, state)
    out, total = torch_forward(tm, x), 1.0
    for _ in range(8):
        peak = float(np.abs(out).max())
        if peak <= MAX_LOGIT:
            break
        factor = 0.5 * MAX_LOGIT / peak
        for k in final_convs(state):
            state[k] = (state[k] * factor).astype(np.float32)
        load_into_reference(tm, state)
        out, total = torch_forward(tm, x), total * factor
    return state, out, total


def rel(a: np.ndarray, ref: np.ndarray) -> float:
    scale = float(np.abs(ref).max())
    return float(np.abs(np.asarray(a, np.float64) - ref).max()) / (scale if scale > 0 else 1.0)


def strict_into_ours(model, state: dict[str, np.ndarray], inference: bool) -> None:
    """``load_torch_weights`` and the check that nothing was skipped on either side."""
    from nanodet_jax.weights.pytorch import load_torch_weights, model_variables

    report = load_torch_weights(model, state, source="NanoDet's random weights")
    training_only = tuple(getattr(model, "TRAINING_ONLY", ()))
    expected = {
        k for k in state if not (inference and training_only and k.startswith(training_only))
    }
    unused = sorted(expected - set(report.loaded))
    unset = sorted(set(model_variables(model)) - set(report.loaded))
    if unused or unset or report.missing_aux or report.reinitialized:
        raise AssertionError(f"not strict: unused {unused[:5]}, unset {unset[:5]}")


def check_file(ref, yml: str, rel_name: str, size: int) -> dict:
    import jax.numpy as jnp

    from nanodet_jax.models import build_model
    from nanodet_jax.models.batchnorm_folding import fold_batchnorm
    from nanodet_jax.weights.pytorch import torch_state_dict

    t0 = time.perf_counter()
    config = load_config(yml)
    arch = reference_arch(ref, yml)
    h, w = input_hw(config, arch, size)
    x = normal_input(INPUT_SEED, (2, 3, h, w))
    tm = build_reference(ref, arch)
    state, ref_out, scale = realistic_weights(tm, x, seed=zlib.crc32(rel_name.encode()) % 2**31)

    ours = build_model(config, with_aux=False)
    strict_into_ours(ours, state, inference=True)
    x_nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
    ours_out = np.asarray(ours(x_nhwc))
    row = {
        "shape_ok": ours_out.shape == ref_out.shape,
        "ref_max": float(np.abs(ref_out).max()),
        "scale": scale,
        # The float32 reference's own rounding error (against the same model in float64):
        # the scale a parity error is to be judged on.
        "noise": rel(ref_out, torch_forward(copy.deepcopy(tm).double(), x.astype(np.float64))),
    }
    row["parity"] = rel(ours_out, ref_out) if row["shape_ok"] else float("inf")
    # What Predictor runs: BatchNorm folded into the convolutions (batchnorm_folding.py).
    folded, row["folds"] = fold_batchnorm(ours)
    folded_out = np.asarray(folded(x_nhwc))
    row["folded"] = rel(folded_out, ref_out) if row["shape_ok"] else float("inf")
    row["folded_vs_ours"] = rel(folded_out, ours_out)  # the optimised path against the plain
    if row["shape_ok"]:
        row |= onnx_columns(ours, config, x, ours_out, ref_out)

    # The round trip: the whole state_dict (training branches included) back to NanoDet.
    full = build_model(config) if ours.TRAINING_ONLY else ours
    if full is not ours:
        strict_into_ours(full, state, inference=False)
    exported = torch_state_dict(full)
    fresh = build_reference(ref, arch)
    try:
        fresh.load_state_dict(exported, strict=True)
        row["strict"] = True
    except RuntimeError as e:
        row["strict"], row["strict_error"] = False, str(e).splitlines()[0]
    row["values_equal"] = set(exported) == set(state) and all(
        np.array_equal(exported[k].numpy(), state[k]) for k in state
    )
    row["round_trip"] = rel(torch_forward(fresh.eval(), x), ref_out) if row["strict"] else None
    a = config.model.arch
    row.update(
        file=rel_name,
        model=f"{a.get('name', 'NanoDetPlus')}/{a.backbone.name}/{a.fpn.name}/{a.head.name}",
        size=f"{h}x{w}",
        seconds=time.perf_counter() - t0,
    )
    return row


def format_row(r: dict) -> str:
    rt = "-" if r.get("round_trip") is None else f"{r['round_trip']:.1e}"
    strict = "ok" if r.get("strict") else "FAIL"
    if r.get("strict") and not r.get("values_equal"):
        strict = "ok, values differ"
    parity = "shape!" if not r.get("shape_ok", True) else f"{r['parity']:.1e}"
    folded = f"{r['folded']:.1e} ({r['folds']}) | {r['folded_vs_ours']:.1e}"
    return (
        f"| {r['file']} | {r['model']} | {r['size']} | {parity} | {folded} | {r['ref_max']:.1f} | "
        f"{r['scale']:.2g} | {r['noise']:.1e} | {format_onnx(r)} | "
        f"{strict} | {rt} | {r['seconds']:.0f} s |"
    )


def main(argv: list[str] | None = None) -> int:
    runtime.configure_xla()  # the entry points' XLA settings, before any computation
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("nanodet", help="a checkout of RangiLyu/nanodet")
    p.add_argument("--size", type=int, default=96, help="input side where the config allows")
    p.add_argument("--only", default="", help="only files whose path contains this")
    p.add_argument("--tol", type=float, default=1e-4, help="largest relative parity error")
    args = p.parse_args(argv)

    import torch

    from tools.torchvision_cpu import import_torchvision

    torch.manual_seed(0)  # only the (overwritten) default init draws from it
    try:
        import_torchvision()  # timm (the ConvNeXt config) imports torchvision
    except Exception as e:  # noqa: BLE001 -- the other configs do not need it
        print(f"note: torchvision unavailable ({e}); TIMMWrapper configs will fail")
    ref = load_reference(args.nanodet)
    files = [f for f in nanodet_files(args.nanodet) if args.only in f]
    if not files:
        print(f"no .yml under {args.nanodet}/config matches {args.only!r}")
        return 1
    columns = (
        "file",
        "arch/backbone/neck/head",
        "input",
        "parity",
        "BN folded (folds)",
        "folded vs ours",
        "max abs ref",
        "head scale",
        "ref noise",
        "onnx vs ours",
        "onnx vs NanoDet",
        "strict",
        "round trip",
        "time",
    )
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    failures = []
    start = time.perf_counter()
    for yml in files:
        name = os.path.relpath(yml, os.path.join(args.nanodet, "config"))
        try:
            row = check_file(ref, yml, name, args.size)
        except Exception as e:  # noqa: BLE001 -- one broken config must not hide the rest
            print(f"| {name} | ERROR {type(e).__name__}: {str(e).splitlines()[0][:150]} |")
            failures.append(name)
            continue
        print(format_row(row), flush=True)
        bad = (
            not row["shape_ok"]
            or row["parity"] > args.tol
            or row["folded"] > args.tol
            or row["folded_vs_ours"] > args.tol
            or not row["strict"]
            or not row["values_equal"]
            or row["round_trip"] > 1e-6
        )
        if bad:
            failures.append(name + (f" ({row['strict_error']})" if "strict_error" in row else ""))
        elif row["shape_ok"] and (why := onnx_failure(row, args.tol)):
            failures.append(f"{name} ({why})")
    print(f"\n{len(files)} files, {time.perf_counter() - start:.0f} s")
    for f in failures:
        print(f"FAIL {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
