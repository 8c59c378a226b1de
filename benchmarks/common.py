"""Timing helpers shared by the benchmark scripts: warm-up, then the median of repeats."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
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


def load_reference_or_none(path: str | None):
    """The PyTorch NanoDet reference (tools/reference.py), or None with a printed reason."""
    if not path:
        print("(no --nanodet PATH: PyTorch reference rows skipped)")
        return None
    try:
        import torch  # noqa: F401
    except ImportError:
        print("(torch not installed: PyTorch reference rows skipped)")
        return None
    from tools.reference import load_reference

    return load_reference(path)
