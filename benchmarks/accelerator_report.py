"""The accelerator check's report: versions and the markdown table of
``benchmarks/accelerator.py``'s payload (parity, timings, memory)."""

from __future__ import annotations

import os
import platform

import jax
from common import markdown_table

from tools import golden_checks as gc

MIB = 2**20


def versions() -> dict:
    import jaxlib

    dev = jax.devices()[0]
    out = {
        "device": f"{dev.platform}: {dev.device_kind} (x{jax.device_count()})",
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
    }
    try:
        import torch

        out["torch"] = torch.__version__ + (
            f" (CUDA {torch.version.cuda})" if torch.cuda.is_available() else " (CPU)"
        )
    except ImportError:
        out["torch"] = "not installed"
    return out


def _cell(seconds: float | None, batch: int) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.2f} ms ({batch / seconds:.1f} img/s)"


def render(payload: dict) -> str:
    v = payload["versions"]
    lines = [
        f"device: {v['device']}; jax {v['jax']}, jaxlib {v['jaxlib']}, torch {v['torch']}, "
        f"python {v['python']}; mode: {payload['mode']}; repeats {payload['repeats']}",
        f"config: {payload['config']}",
        "",
    ]
    lines.append(
        f"Parity (matmul precision {gc.PRECISION!r}; the tests' tolerances, see "
        "benchmarks/accelerator.py):\n"
    )
    ptable = [
        [
            p["check"],
            p["compared"],
            "-" if p["worst_rel_over_tol"] is None else f"{p['worst_rel_over_tol']:.3f}",
            "ok" if p["passed"] else "FAIL",
        ]
        for p in payload["parity"]
    ]
    lines += [markdown_table(["check", "compared", "worst rel/tol", "result"], ptable), ""]
    torch_col = f"torch ({payload['torch_device']})" if payload["torch_device"] else "torch"
    header = [
        "row",
        "batch",
        "precision",
        "ours",
        torch_col,
        "speed-up (torch time / ours)",
        "peak MiB / train image (ours; torch)",
    ]
    rows = []
    for r in payload["rows"]:
        ratio = f"{r['torch_s'] / r['ours_s']:.2f}x" if r["torch_s"] else "-"
        torch = _cell(r["torch_s"], r["batch"])
        if not r["torch_s"]:
            torch = f"not run: {payload['torch_reason']}"
        mem = "-"
        if "memory" in r and r["memory"]["mib_per_image"] is not None:
            tb = r["torch_peak_bytes"]
            mem = f"{r['memory']['mib_per_image']:.1f}; " + (
                f"{tb / MIB / r['batch']:.1f}" if tb else "-"
            )
        rows.append(
            [
                r["what"],
                r["batch"],
                r["precision"],
                _cell(r["ours_s"], r["batch"]),
                torch,
                ratio,
                mem,
            ]
        )
    lines.append(markdown_table(header, rows))
    ffi = sorted({k for r in payload["rows"] for k in r.get("ffi_kernels", ())})
    lines.append(
        f"\nC++ FFI kernels in the compiled train steps: {', '.join(ffi) or 'none'} "
        "(CPU-only kernels: expected none on an accelerator)"
    )
    mem_sources = {r["memory"]["source"] for r in payload["rows"] if "memory" in r}
    lines.append(
        f"\nmemory source: {', '.join(sorted(mem_sources))} (includes parameters, "
        "optimizer state, EMA and the batch); torch: torch.cuda.max_memory_allocated()"
    )
    return "\n".join(lines)
