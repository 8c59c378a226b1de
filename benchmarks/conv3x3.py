"""Dense 3x3 convolution (the aux head's layers) on NanoDet-Plus-m shapes: ours vs torch.

    python benchmarks/conv3x3.py [--batch 16] [--repeats 5] [--json out.json]
    python benchmarks/conv3x3.py --weight-grad [--batch 16 32] [--repeats 7]
    python benchmarks/conv3x3.py --tiles [--batch 16 32] [--repeats 7]

For one 192 -> 192 channel layer on each pyramid level of a 320 input (40, 20, 10, 5), and
the four levels summed, times the forward and forward + backward (d/dx and d/dkernel) of

* ``lax``   XLA's ``lax.conv_general_dilated``,
* ``ffi``   the C++ Winograd kernels (forward, input and weight gradients), i.e. what
  ``nanodet_jax.ops.conv3x3`` runs on CPU (4x4 or 2x2 output tiles by image size),
* ``torch`` ``torch.nn.functional.conv2d`` in NCHW and channels_last (skipped without torch),

with the ratio torch NCHW / ours (> 1: we are faster). Median of ``--repeats`` after warm-up.

``--weight-grad`` times only d/dkernel, XLA's convolution and ours taking turns within each
repeat (the two cores are shared), per level and for every ``--batch`` given: median, min
and max.

``--tiles`` times our kernels with 2x2 and with 4x4 output tiles (F(2x2, 3x3) and
F(4x4, 3x3)), taking turns: forward, forward + backward and the weight gradient alone, per
level, the evidence for ``MIN_SIDE_FOR_4X4`` in ``nanodet_jax/ops/conv3x3.py``.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from common import interleaved_times, machine_summary, markdown_table, median_seconds, write_json

from nanodet_jax import runtime  # noqa: E402
from nanodet_jax.ops import conv3x3, ffi_build
from nanodet_jax.ops.conv3x3 import MIN_SIDE_FOR_4X4, conv3x3_winograd

CHANNELS = 192
LEVELS = (40, 20, 10, 5)


def jax_times(impl: str, x: jax.Array, k: jax.Array, g: jax.Array, repeats: int) -> tuple:
    fwd = jax.jit(lambda x, k: conv3x3(x, k, impl=impl))

    @jax.jit
    def fwd_bwd(x, k, g):
        y, vjp = jax.vjp(lambda x, k: conv3x3(x, k, impl=impl), x, k)
        return y, *vjp(g)

    t_f = median_seconds(lambda: jax.block_until_ready(fwd(x, k)), repeats)
    t_fb = median_seconds(lambda: jax.block_until_ready(fwd_bwd(x, k, g)), repeats)
    return t_f, t_fb


def weight_grad_times(x: jax.Array, g: jax.Array, repeats: int) -> dict[str, list[float]]:
    """Seconds per repeat of d/dkernel alone (dx and the forward are dead code under jit)."""
    k = jnp.zeros((3, 3, x.shape[3], g.shape[3]), jnp.float32)
    fns = {}
    for impl in ("lax", "ffi"):
        f = jax.jit(lambda x, k, g, impl=impl: jax.vjp(lambda k: conv3x3(x, k, impl=impl), k)[1](g))
        fns[impl] = lambda f=f: jax.block_until_ready(f(x, k, g))
    return interleaved_times(fns, repeats, warmup=2)  # the first call compiles


def weight_grad_main(batches: list[int], repeats: int) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        for size in LEVELS:
            shape = (batch, size, size, CHANNELS)
            x, g = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
            t = weight_grad_times(x, g, repeats)
            cells = [f"{np.median(v) * 1e3:.1f} ({min(v) * 1e3:.1f}-{max(v) * 1e3:.1f})"
                     for v in t.values()]  # fmt: skip
            ratio = np.median(t["lax"]) / np.median(t["ffi"])
            rows.append([str(batch), f"{size}x{size}", *cells, f"{ratio:.2f}x"])
    print(f"\nweight gradient alone, {CHANNELS} -> {CHANNELS} channels, ms: median (min-max)")
    print(markdown_table(["batch", "level", "XLA", "ours", "XLA / ours"], rows))


def _run(f, *args: jax.Array) -> None:
    jax.block_until_ready(f(*args))


def tile_main(batches: list[int], repeats: int) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        for size in LEVELS:
            shape = (batch, size, size, CHANNELS)
            x, g = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
            k = jnp.asarray(rng.standard_normal((3, 3, CHANNELS, CHANNELS)) / 40, jnp.float32)
            fns = {}
            for tile in (2, 4):
                conv = functools.partial(conv3x3_winograd, tile=tile)
                fwd = jax.jit(conv)
                fwd_bwd = jax.jit(lambda x, k, g, conv=conv: jax.vjp(conv, x, k)[1](g))
                wgrad = jax.jit(lambda x, k, g, conv=conv: jax.vjp(lambda k: conv(x, k), k)[1](g))
                fns[f"fwd {tile}"] = functools.partial(_run, fwd, x, k)
                fns[f"fwd+bwd {tile}"] = functools.partial(_run, fwd_bwd, x, k, g)
                fns[f"wgrad {tile}"] = functools.partial(_run, wgrad, x, k, g)
            t = {name: np.median(v) * 1e3 for name, v in interleaved_times(fns, repeats, 2).items()}
            cells = []
            for what in ("fwd", "fwd+bwd", "wgrad"):
                two, four = t[f"{what} 2"], t[f"{what} 4"]
                cells += [f"{two:.1f} / {four:.1f} ({two / four:.2f}x)"]
            rows.append([str(batch), f"{size}x{size}", *cells])
    print(f"\n2x2 / 4x4 output tiles, {CHANNELS} -> {CHANNELS} channels, ms (median), "
          f"in parentheses 2x2 over 4x4 (> 1: 4x4 is faster); 4x4 from "
          f"{MIN_SIDE_FOR_4X4} pixels a side")  # fmt: skip
    print(markdown_table(["batch", "level", "forward", "forward + backward", "weight grad"], rows))


def torch_times(layout: str, x: np.ndarray, k: np.ndarray, g: np.ndarray, repeats: int):
    import torch

    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).contiguous(memory_format=fmt)
    wt = torch.from_numpy(k.transpose(3, 2, 0, 1).copy()).contiguous(memory_format=fmt)
    gt = torch.from_numpy(g.transpose(0, 3, 1, 2).copy()).contiguous(memory_format=fmt)
    xt.requires_grad_(True)
    wt.requires_grad_(True)

    def fwd():
        with torch.no_grad():
            torch.nn.functional.conv2d(xt, wt, padding=1)

    def fwd_bwd():
        y = torch.nn.functional.conv2d(xt, wt, padding=1)
        torch.autograd.grad(y, (xt, wt), gt)

    return median_seconds(fwd, repeats), median_seconds(fwd_bwd, repeats)


def main() -> None:
    runtime.configure_xla()  # the entry points' XLA settings, before any computation
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[16])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--weight-grad", action="store_true", help="time d/dkernel alone")
    p.add_argument("--tiles", action="store_true", help="2x2 against 4x4 output tiles")
    p.add_argument("--json")
    args = p.parse_args()
    print(machine_summary())
    if args.weight_grad:
        weight_grad_main(args.batch, args.repeats)
        return
    if args.tiles:
        if not ffi_build.load():
            raise SystemExit("--tiles needs the C++ kernels, which could not be built")
        tile_main(args.batch, args.repeats)
        return
    args.batch = args.batch[0]
    try:
        import torch  # noqa: F401 - default threads, as in train_step.py

        layouts = ["NCHW", "channels_last"]
    except ImportError:
        print("(torch not installed: torch columns skipped)")
        layouts = []
    rng = np.random.default_rng(0)
    impls = ["lax", "ffi"]
    header = ["level", *[f"{i} {m}" for m in ("fwd", "fwd+bwd") for i in impls + layouts]]
    rows, totals = [], {}
    for size in LEVELS:
        shape = (args.batch, size, size, CHANNELS)
        x = rng.standard_normal(shape).astype(np.float32)
        k = (rng.standard_normal((3, 3, CHANNELS, CHANNELS)) / 40).astype(np.float32)
        g = rng.standard_normal(shape).astype(np.float32)
        times = {i: jax_times(i, jnp.asarray(x), jnp.asarray(k), jnp.asarray(g), args.repeats)
                 for i in impls}  # fmt: skip
        times.update({lay: torch_times(lay, x, k, g, args.repeats) for lay in layouts})
        for name, t in times.items():
            totals[name] = tuple(a + b for a, b in zip(totals.get(name, (0.0, 0.0)), t))
        rows.append([f"{size}x{size}", *[f"{times[n][m] * 1e3:.1f}" for m in (0, 1)
                                         for n in impls + layouts]])  # fmt: skip
    rows.append(["sum", *[f"{totals[n][m] * 1e3:.1f}" for m in (0, 1) for n in impls + layouts]])
    print(f"\nbatch {args.batch}, {CHANNELS} -> {CHANNELS} channels, ms (median):")
    print(markdown_table(header, rows))
    for ref in ["lax", *layouts]:
        print(f"sum: {ref} / ffi = forward {totals[ref][0] / totals['ffi'][0]:.2f}x, "
              f"forward+backward {totals[ref][1] / totals['ffi'][1]:.2f}x")  # fmt: skip
    write_json(args.json, {"batch": args.batch, "ms": {n: [t * 1e3 for t in v]
                                                       for n, v in totals.items()}})  # fmt: skip


if __name__ == "__main__":
    main()
