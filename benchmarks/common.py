"""Timing helpers shared by the benchmark scripts: warm-up, then the median of repeats."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()``; ``fn`` must block until its work is done."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_times(
    fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall time of each ``fn()`` in every repeat, the functions taking turns within it.

    On a shared machine the load changes over a run; timing the implementations in turn
    (ours, theirs, ours, ...) rather than one block after the other lets a busy spell hit
    all of them alike, so their ratio is steadier than their absolute times.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def interleaved_medians(
    fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median of :func:`interleaved_times` per function."""
    times = interleaved_times(fns, repeats, warmup)
    return {name: statistics.median(t) for name, t in times.items()}


def single_thread() -> None:
    """One thread for XLA's CPU computations and for torch's intra-op pool, before either
    starts. On a shared machine with more runnable jobs than cores, multi-threaded
    operators wait on their slowest thread at every barrier; torch's OpenMP pool suffers
    most (measured here: FCOS-R50 512 forward, torch 2 threads 10.6 s, 1 thread 4.3 s,
    ours 3.1 s), so one thread each is the setting that is fair to both there."""
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


def thread_summary() -> str:
    eigen = "--xla_cpu_multi_thread_eigen=false" not in os.environ.get("XLA_FLAGS", "")
    out = f"XLA: {'its default pool' if eigen else '1 thread'}"
    try:
        import torch
    except ImportError:
        return out
    return f"{out}, torch: {torch.get_num_threads()} threads"


def machine_summary() -> str:
    import jax

    cpu = platform.processor() or platform.machine()
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), jax {jax.__version__} on "
        f"{jax.default_backend()} ({jax.devices()[0].device_kind})"
    )


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"wrote {path}")


def reference_or_reason(path: str | None):
    """(the PyTorch NanoDet reference of tools/reference.py, None) or (None, why not)."""
    if not path:
        return None, "no --nanodet PATH given"
    try:
        import torch  # noqa: F401
    except ImportError:
        return None, "torch not installed"
    from tools.reference import load_reference

    return load_reference(path), None


def load_reference_or_none(path: str | None):
    """The PyTorch NanoDet reference (tools/reference.py), or None with a printed reason."""
    ref, reason = reference_or_reason(path)
    if reason:
        print(f"({reason}: PyTorch reference rows skipped)")
    return ref
