"""Accelerator check: golden parity, then NanoDet-Plus-m-320 speed and memory against PyTorch.

    python benchmarks/accelerator.py --nanodet /path/to/nanodet --out DIR   # the GPU run
    python benchmarks/accelerator.py --reduced --out DIR                    # CPU smoke run

``benchmarks/accelerator.sh`` wraps the GPU run (wheels from ``.wheels/``, PYTHONPATH, a
time limit); docs/benchmarks.md has the steps. In one process:

1. Parity under ``jax.default_matmul_precision("highest")`` (GPUs otherwise run float32
   convolutions in TF32), with the tests' own tolerances (``tools/golden_checks.py``):
   ``golden_model.npz`` (eval and train-mode forward of both recorded variants; per tensor
   ``max|ours - ref| / max|ref| <= max(1e-5, 10 x the float32 reference's noise)`` and
   elementwise ``|d| <= 1e-4 |ref| + tol max|ref|``), ``golden_train.npz`` (one training
   step, both AGM phases: identical assignment, loss terms to 1e-5, gradients to
   ``max(1e-4, 10 x noise)`` of ``max|ref|``) and ``golden_grad_precision.npz`` (float64
   gradients are NanoDet's; float32 gradients within ``max(2 x PyTorch's float32 error,
   1e-5)`` of float64, ``tools/grad_precision_checks.py``).
2. Timing, at the frameworks' default precision: inference (eval model, raw head output)
   at batch 1 and 64 and the full training step (``benchmarks/train_step.py``: colour
   augmentation, forward, assigner, losses, backward, clipping, AdamW, EMA) at batch 96,
   each in fp32 and bf16 (ours: ``device.precision: bf16``, bfloat16 compute with float32
   master weights; torch: ``torch.autocast(bfloat16)``), against NanoDet's model from
   ``--nanodet`` on CUDA when ``torch.cuda.is_available()``. Median of ``--repeats`` after
   warm-up, ours and torch taking turns (``common.interleaved_medians``).
3. Peak memory per training image: ``device.memory_stats()['peak_bytes_in_use']`` where the
   backend reports it (GPU), else the compiled step's ``memory_analysis()``.
4. ``accelerator.md`` and ``accelerator.json`` in ``--out``.

Exit status 1 when a parity check failed (the timings are still written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Let torch, in the same process, have GPU memory too; JAX's peak statistic counts
# buffers in use, not what it reserved, so the memory figures are unaffected.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ (in a test)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from accelerator_report import MIB, render, versions  # noqa: E402
from common import REPO, interleaved_medians, reference_or_reason  # noqa: E402
from infer import our_forward_run, torch_forward_run  # noqa: E402
from train_step import torch_train_run, train_setup  # noqa: E402

from nanodet_jax import runtime  # noqa: E402
from nanodet_jax.config.loading import load_config  # noqa: E402
from nanodet_jax.ops import ffi_build  # noqa: E402
from nanodet_jax.testing import SMALL_MODEL_OVERRIDES  # noqa: E402
from tools import golden_checks as gc  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "nanodet_plus_m.py")
# --reduced: a narrow 5-class model at 64 x 64 (the tests' small config).
REDUCED = (
    *SMALL_MODEL_OVERRIDES,
    "--config.data.train.input_size=[64, 64]",
    "--config.data.val.input_size=[64, 64]",
)
PRECISIONS = ("fp32", "bf16")


# ------------------------------------------------------------------------------- parity


def _summary(name: str, rows: list[gc.Row]) -> dict:
    ratios = [0.0 if r == 0 else (r / t if t > 0 else float("inf")) for _, r, t, _ in rows]
    bad = gc.failed(rows)
    return {
        "check": name,
        "compared": len(rows),
        "worst_rel_over_tol": max(ratios),
        "passed": not bad,
        "failed": bad[:10],
    }


def parity(reduced: bool, grad_precision: bool, train: bool = True) -> list[dict]:
    """One summary per golden check (``--reduced``: the small variant's eval mode and the
    training step only, the programs the tests compile too; ``train`` False: no training
    step)."""
    out = []
    meta, arrays = gc.load_golden(gc.MODEL_GOLDEN)
    cases = [("small", "eval")] if reduced else [(v, m) for v in gc.VARIANTS for m in gc.MODES]
    for variant, mode in cases:
        rows = gc.parity_report(meta, arrays, variant, mode)
        out.append(_summary(f"golden_model {variant}/{mode}", rows))
    if not train:
        return out
    golden = gc.train_golden()
    outputs = gc.train_step_outputs(golden)
    for phase in ("joint", "detached"):
        rows = gc.train_step_report(golden, outputs, phase)
        out.append(_summary(f"golden_train step/{phase}", rows))
    if grad_precision:
        from tools import grad_precision_checks as gp

        g = gp.load_golden()
        g32, g64, natural = gp.golden_gradients(g)
        n = len(g["param_names"])
        bad64 = gp.float64_mismatches(g, natural)
        out.append(
            {
                "check": "golden_grad_precision float64 = NanoDet's",
                "compared": n,
                "worst_rel_over_tol": None,
                "passed": not bad64,
                "failed": bad64[:10],
            }
        )
        miss = gp.float32_misses(g, g32, g64)
        out.append(
            {
                "check": "golden_grad_precision float32 bound",
                "compared": n,
                "worst_rel_over_tol": miss[0][0] if miss else None,
                "passed": not miss,
                "failed": [m[1] for m in miss[:10]],
            }
        )
    for s in out:
        print(
            f"{'ok  ' if s['passed'] else 'FAIL'} {s['check']}: {s['compared']} compared, "
            f"worst rel/tol {s['worst_rel_over_tol']}",
            flush=True,
        )
    return out


# ------------------------------------------------------------------------------- memory


def _analysis_bytes(compiled) -> int | None:
    """Arguments + outputs + temporaries of a compiled program, the donated outputs (which
    reuse their argument's buffer) counted once."""
    ma = compiled.memory_analysis()
    if ma is None:
        return None
    return (
        ma.argument_size_in_bytes
        + ma.output_size_in_bytes
        - ma.alias_size_in_bytes
        + ma.temp_size_in_bytes
    )


def measure_step_memory(compiled, run_once, batch: int) -> dict:
    """Peak device memory of one step. JAX has no peak reset: the peak is since the process
    started, so the steps are measured smallest first (``raised`` says whether this one
    set it; if not the figure is an upper bound)."""
    analysis = _analysis_bytes(compiled)
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        before = stats["peak_bytes_in_use"]
        run_once()
        peak = jax.devices()[0].memory_stats()["peak_bytes_in_use"]
        return {
            "source": "memory_stats()['peak_bytes_in_use']",
            "bytes": peak,
            "raised": peak > before,
            "analysis_bytes": analysis,
            "mib_per_image": peak / MIB / batch,
        }
    run_once()
    return {
        "source": "compiled memory_analysis() (argument + output - alias + temp)",
        "bytes": analysis,
        "analysis_bytes": analysis,
        "mib_per_image": None if analysis is None else analysis / MIB / batch,
    }


def torch_peak(run, cuda: bool) -> float | None:
    if not cuda:
        return None
    import torch

    torch.cuda.reset_peak_memory_stats()
    run()
    return torch.cuda.max_memory_allocated()


# ------------------------------------------------------------------------------- timing


def _configs(reduced: bool, precisions) -> dict:
    base = REDUCED if reduced else ()
    return {p: load_config(CONFIG, [*base, f"--config.device.precision={p}"]) for p in precisions}


def _time(ours, theirs, repeats: int, warmup: int) -> tuple[float, float | None]:
    fns = {"ours": ours} | ({"torch": theirs} if theirs else {})
    t = interleaved_medians(fns, repeats, warmup)
    return t["ours"], t.get("torch")


def train_rows(configs, batch: int, ref, cuda: bool, repeats: int, warmup: int, setup: dict):
    rows = []
    for precision in sorted(configs):  # bf16 first: the smaller peak (measure_step_memory)
        config = configs[precision]
        step, state, data = train_setup(config, batch, **setup)
        start = time.perf_counter()
        compiled = step.lower(state, data).compile()
        compile_s = time.perf_counter() - start
        # The C++ FFI kernels are CPU-only: on an accelerator the ops must pick XLA's.
        text = compiled.as_text()
        ffi = sorted(t for t in ffi_build.TARGETS if t in text)
        holder = {"state": state}

        def ours(compiled=compiled, holder=holder, data=data):
            holder["state"], metrics = compiled(holder["state"], data)
            jax.block_until_ready(metrics)

        memory = measure_step_memory(compiled, ours, batch)
        theirs = ref and torch_train_run(ref, config, batch, cuda=cuda, bf16=precision == "bf16")
        torch_bytes = torch_peak(theirs, cuda) if ref else None
        ours_s, torch_s = _time(ours, theirs, repeats, warmup)
        rows.append(
            {
                "what": "train step",
                "batch": batch,
                "precision": precision,
                "ours_s": ours_s,
                "torch_s": torch_s,
                "compile_s": compile_s,
                "ffi_kernels": ffi,
                "memory": memory,
                "torch_peak_bytes": torch_bytes,
            }
        )
        del holder, state, data, compiled, ours
    return rows


def infer_rows(configs, batches, ref, cuda: bool, repeats: int, warmup: int) -> list[dict]:
    rows = []
    for batch in batches:
        for precision in configs:
            dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
            ours = our_forward_run(configs[precision], batch, dtype)
            theirs = ref and torch_forward_run(
                ref, configs[precision], batch, cuda=cuda, bf16=precision == "bf16"
            )
            ours_s, torch_s = _time(ours, theirs, repeats, warmup)
            rows.append(
                {
                    "what": "inference",
                    "batch": batch,
                    "precision": precision,
                    "ours_s": ours_s,
                    "torch_s": torch_s,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    runtime.configure_xla()  # the entry points' XLA settings, before any computation
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nanodet", help="path of a RangiLyu/nanodet checkout (torch rows)")
    p.add_argument("--out", default=".", help="folder for accelerator.md / accelerator.json")
    p.add_argument(
        "--reduced",
        action="store_true",
        help="small model, 64 x 64, batches 1/2 and 2, 1 repeat (a CPU smoke run)",
    )
    p.add_argument("--repeats", type=int, help="timed repeats (default 20; --reduced 1)")
    p.add_argument("--warmup", type=int, help="untimed runs first (default 3; --reduced 1)")
    p.add_argument("--infer-batches", type=int, nargs="+", help="default 1 64 (--reduced 1 2)")
    p.add_argument("--train-batch", type=int, help="default 96 (--reduced 2)")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument(
        "--no-grad-precision",
        action="store_true",
        help="skip the golden_grad_precision check (2 more step compiles)",
    )
    p.add_argument(
        "--inference-only",
        action="store_true",
        help="no training step: neither its golden check nor its rows (a quick smoke run)",
    )
    args = p.parse_args(argv)
    red = args.reduced
    repeats = args.repeats or (1 if red else 20)
    warmup = args.warmup or (1 if red else 3)
    infer_batches = args.infer_batches or ([1, 2] if red else [1, 64])
    train_batch = args.train_batch or (2 if red else 96)
    ref, reason = reference_or_reason(args.nanodet)
    cuda = False
    if ref is not None:
        import torch

        cuda = torch.cuda.is_available()
        torch.backends.cudnn.benchmark = True  # its fastest algorithms, as XLA autotunes
    payload = {
        "versions": versions(),
        "mode": "reduced" if red else "full",
        "repeats": repeats,
        "warmup": warmup,
        "config": "configs/nanodet_plus_m.py"
        + (" + small-model overrides, 64 x 64" if red else " (NanoDet-Plus-m-320)"),
        "torch_device": None if ref is None else ("cuda" if cuda else "cpu"),
        "torch_reason": reason,
    }
    print(payload["versions"], flush=True)
    start = time.perf_counter()
    train = not args.inference_only
    grad_precision = train and not (red or args.no_grad_precision)
    payload["parity"] = parity(red, grad_precision, train)
    payload["parity_s"] = time.perf_counter() - start
    configs = _configs(red, args.precisions)
    # --reduced: test_trainer.py's bf16 step, gt slots and schedule length included, so
    # that a test session compiles it once for both (persistent cache, conftest.py).
    setup = {"slots": 4, "total_steps": 10} if red else {}
    payload["rows"] = (
        train_rows(configs, train_batch, ref, cuda, repeats, warmup, setup) if train else []
    )
    payload["rows"] += infer_rows(configs, infer_batches, ref, cuda, repeats, warmup)
    payload["total_s"] = time.perf_counter() - start
    text = render(payload)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "accelerator.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "accelerator.json"), "w") as f:
        json.dump(payload, f, indent=1, default=str)
    print(f"wrote {args.out}/accelerator.md and accelerator.json ({payload['total_s']:.0f} s)")
    return 0 if all(p["passed"] for p in payload["parity"]) else 1


if __name__ == "__main__":
    sys.exit(main())
