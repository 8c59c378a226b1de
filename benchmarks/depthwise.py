"""Benchmark depthwise convolution implementations on NanoDet-Plus-m shapes (CPU).

Times forward and forward+backward (value, d/dx and d/dkernel) of

* ``lax``   grouped ``lax.conv_general_dilated`` (feature_group_count=C),
* ``xla``   pure-XLA shift-add with a custom VJP,
* ``ffi``   the C++ XLA FFI kernels,
* ``torch`` ``torch.nn.functional.conv2d(groups=C)`` on channels_last tensors with
  ``torch.set_num_threads(2)`` (skipped when torch is not importable),

reporting the median (or, with ``--stat min``, the minimum) in milliseconds and the ratio
to torch. Candidates are timed round-robin so background load hits them alike.

Usage (from the repo root)::

    python benchmarks/depthwise.py [--quick] [--batch 1 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nanodet_jax import runtime  # noqa: E402
from nanodet_jax.ops import depthwise_ffi  # noqa: E402
from nanodet_jax.ops.depthwise import depthwise_conv2d  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    channels: int
    size: int  # input H == W
    k: int
    stride: int

    @property
    def padding(self) -> int:
        return self.k // 2


# Depthwise convolutions of NanoDet-Plus-m at 320x320 input.
SHAPES = [
    # ShuffleNetV2-1.0x backbone, dw 3x3 (first block of each stage has stride 2).
    Shape("stage2 down branch1", 24, 80, 3, 2),
    Shape("stage2 down branch2", 58, 80, 3, 2),
    Shape("stage2", 58, 40, 3, 1),
    Shape("stage3 down", 116, 40, 3, 2),
    Shape("stage3", 116, 20, 3, 1),
    Shape("stage4 down", 232, 20, 3, 2),
    Shape("stage4", 232, 10, 3, 1),
    # GhostPAN / head dw 5x5 on 96 channels at the four output levels.
    Shape("pan/head 96ch", 96, 40, 5, 1),
    Shape("pan/head 96ch", 96, 20, 5, 1),
    Shape("pan/head 96ch", 96, 10, 5, 1),
    Shape("pan/head 96ch", 96, 5, 5, 1),
    # GhostBottleneck shortcut dw 5x5 on the 192-channel concatenation.
    Shape("ghost shortcut", 192, 40, 5, 1),
    Shape("ghost shortcut", 192, 20, 5, 1),
    Shape("ghost shortcut", 192, 10, 5, 1),
    # GhostModule cheap operation dw 3x3 on 48 channels.
    Shape("ghost cheap op", 48, 40, 3, 1),
    Shape("ghost cheap op", 48, 20, 3, 1),
    Shape("ghost cheap op", 48, 10, 3, 1),
    # GhostPAN downsample dw 5x5 stride 2.
    Shape("pan downsample", 96, 40, 5, 2),
    Shape("pan downsample", 96, 20, 5, 2),
    Shape("pan downsample", 96, 10, 5, 2),
]
QUICK = [SHAPES[i] for i in (2, 3, 7, 11, 17)]


def _time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, budget_s: float
) -> dict[str, list[float]]:
    """Wall times (ms) per candidate, measured round-robin after warm-up.

    Interleaving makes background load hit every candidate alike. A candidate that has
    used up ``budget_s`` (the very slow grouped lax conv) stops after 3 runs.
    """
    for fn in fns.values():
        for _ in range(2):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if len(times[name]) >= 3 and sum(times[name]) > budget_s * 1e3:
                continue
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def jax_candidates(impl: str, s: Shape, batch: int) -> dict[str, Callable[[], Any]]:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, s.size, s.size, s.channels)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((s.k, s.k, 1, s.channels)), jnp.float32)

    def fwd(x: jax.Array, w: jax.Array) -> jax.Array:
        return depthwise_conv2d(x, w, s.stride, s.padding, impl=impl)

    def fwd_bwd(x: jax.Array, w: jax.Array, g: jax.Array) -> tuple[jax.Array, ...]:
        y, vjp = jax.vjp(fwd, x, w)
        return (y, *vjp(g))  # return y too, or XLA drops the forward pass

    jf, jfb = jax.jit(fwd), jax.jit(fwd_bwd)
    g = jnp.ones_like(jf(x, w))
    return {
        f"{impl} fwd": lambda: jax.block_until_ready(jf(x, w)),
        f"{impl} f+b": lambda: jax.block_until_ready(jfb(x, w, g)),
    }


def torch_candidates(s: Shape, batch: int) -> dict[str, Callable[[], Any]]:
    import torch

    torch.set_num_threads(2)
    x = torch.randn(batch, s.channels, s.size, s.size).to(memory_format=torch.channels_last)
    w = torch.randn(s.channels, 1, s.k, s.k)
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)

    def conv(x: Any, w: Any) -> Any:
        return torch.nn.functional.conv2d(
            x, w, stride=s.stride, padding=s.padding, groups=s.channels
        )

    with torch.no_grad():
        g = torch.ones_like(conv(x, w))

    def fwd() -> None:
        with torch.no_grad():
            conv(x, w)

    def fwd_bwd() -> None:
        torch.autograd.grad(conv(xg, wg), (xg, wg), g)

    return {"torch fwd": fwd, "torch f+b": fwd_bwd}


def _have_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    runtime.configure_xla()  # the entry points' XLA settings, before any computation
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 shapes, fewer repeats")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--impls", nargs="+", default=["lax", "xla", "ffi"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--stat",
        choices=["median", "min"],
        default="median",
        help="statistic shown in the table (the JSON has both); min is "
        "more robust when other processes compete for the cores",
    )
    parser.add_argument("--json", type=str, default=None, help="save results to this path")
    args = parser.parse_args()

    shapes = QUICK if args.quick else SHAPES
    repeats = args.repeats or (10 if args.quick else 30)
    budget_s = 1.0 if args.quick else 3.0  # per (shape, impl, pass): caps slow lax runs
    impls = list(args.impls) + (["torch"] if _have_torch() else [])
    if "ffi" in impls and not depthwise_ffi.load():
        impls.remove("ffi")  # load() has logged why
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPUs; {args.stat} ms over up to {repeats} "
        "interleaved runs\n"
    )

    results = []
    for batch in args.batch:
        cols = " | ".join(f"{i} fwd" for i in impls) + " | " + " | ".join(f"{i} f+b" for i in impls)
        ratio = " | ffi/torch fwd | ffi/torch f+b" if "torch" in impls and "ffi" in impls else ""
        print(f"### batch {batch}\n\n| shape | C | HxW | k/s | {cols}{ratio} |")
        print("|" + "---|" * (4 + 2 * len(impls) + (2 if ratio else 0)))
        for s in shapes:
            row: dict[str, Any] = {
                "name": s.name,
                "batch": batch,
                "channels": s.channels,
                "size": s.size,
                "k": s.k,
                "stride": s.stride,
            }
            fns: dict[str, Callable[[], Any]] = {}
            for impl in impls:
                fns |= (
                    torch_candidates(s, batch)
                    if impl == "torch"
                    else jax_candidates(impl, s, batch)
                )
            for name, ts in _time_interleaved(fns, repeats, budget_s).items():
                impl, what = name.split()
                key = f"{impl}_{'fwd' if what == 'fwd' else 'fwd_bwd'}"
                row[f"{key}_ms"], row[f"{key}_min_ms"] = statistics.median(ts), min(ts)
            results.append(row)
            sfx = "_ms" if args.stat == "median" else "_min_ms"
            cells = [f"{row[f'{i}_fwd{sfx}']:.3f}" for i in impls]
            cells += [f"{row[f'{i}_fwd_bwd{sfx}']:.3f}" for i in impls]
            if ratio:
                cells.append(f"{row[f'ffi_fwd{sfx}'] / row[f'torch_fwd{sfx}']:.2f}")
                cells.append(f"{row[f'ffi_fwd_bwd{sfx}'] / row[f'torch_fwd_bwd{sfx}']:.2f}")
            print(
                f"| {s.name} | {s.channels} | {s.size}x{s.size} | {s.k}/{s.stride} | "
                + " | ".join(cells)
                + " |",
                flush=True,
            )
        print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"jax": jax.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
