"""Where a zoo config's inference time goes: backbone, neck and head, ours vs NanoDet's eager
model, and ours under other op implementations, in the same run.

    python benchmarks/zoo_parts.py --nanodet PATH --configs configs/a.py,configs/b.py
        [--batches 1 16] [--repeats 5] [--variants NANODET_JAX_CONV3X3=lax ...]

Each part is timed on the previous part's real output (jitted alone: ours; ``no_grad``:
torch), the implementations taking turns within each repeat. A variant
``VAR=value`` sets one of the op-dispatch environment variables (read at trace time:
``NANODET_JAX_CONV3X3``, ``NANODET_JAX_DEPTHWISE``) while our part is traced, so the
column shows what that part costs with, e.g., XLA's convolution instead of our Winograd
kernel. Weights are random.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from common import (
    interleaved_medians,
    machine_summary,
    markdown_table,
    single_thread,
    thread_summary,
)
from flax import nnx
from zoo import nanodet_yml

from nanodet_jax import runtime
from nanodet_jax.config.loading import load_config
from nanodet_jax.deploy.onnx_export import onnx_input_hw
from nanodet_jax.models import build_model

PARTS = ("backbone", "fpn", "head")


@contextlib.contextmanager
def environment(variant: str) -> Iterator[None]:
    """``VAR=value`` set for the duration (``default``: nothing changed)."""
    if variant == "default":
        yield
        return
    name, value = variant.split("=", 1)
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def jitted_part(module: nnx.Module, variant: str, example: jax.Array) -> Callable[[], Any]:
    """The part jitted and compiled under ``variant``; a blocking call on ``example``."""
    graphdef, state = nnx.split(module)
    fn = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
    with environment(variant):
        compiled = fn.lower(state, example).compile()  # traced now, under the variant
    return lambda: jax.block_until_ready(compiled(state, example))


def config_rows(
    ref: Any, path: str, nanodet: str, batch: int, repeats: int, variants: list[str]
) -> list[list]:
    import torch

    from tools.check_zoo import build_reference, reference_arch

    config = load_config(path)
    hw = onnx_input_hw(config)
    ours = build_model(config, with_aux=False)
    theirs = build_reference(ref, reference_arch(ref, nanodet_yml(path, nanodet)))
    x = np.random.default_rng(0).normal(size=(batch, 3, *hw)).astype("f4")
    j_in, t_in = jax.device_put(x.transpose(0, 2, 3, 1)), torch.from_numpy(x)
    rows, name = [], os.path.basename(path)
    for part in PARTS:
        o_mod, t_mod = getattr(ours, part), getattr(theirs, part)
        fns = {v: jitted_part(o_mod, v, j_in) for v in ("default", *variants)}

        def run_torch(t_mod=t_mod, t_in=t_in):
            with torch.no_grad():
                return t_mod(t_in)

        fns["torch"] = run_torch
        t = interleaved_medians(fns, repeats)
        rows.append([name, batch, part, *(f"{t[k] * 1e3:.1f}" for k in fns),
                     f"{t['torch'] / t['default']:.2f}x"])  # fmt: skip
        print("| " + " | ".join(str(c) for c in rows[-1]) + " |", flush=True)
        # The next part's input: each implementation's own output of this part.
        j_in = nnx.jit(lambda m, x: m(x))(o_mod, j_in)
        with torch.no_grad():
            t_in = list(t_mod(t_in))
    return rows


def main() -> None:
    runtime.configure_xla()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nanodet", required=True)
    p.add_argument("--configs", required=True, help="comma-separated config paths")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", nargs="*", default=[], help="VAR=value per extra column")
    p.add_argument("--threads1", action="store_true", help="one thread each (common.py)")
    args = p.parse_args()
    if args.threads1:
        single_thread()
    from tools.torchvision_cpu import import_torchvision

    with contextlib.suppress(ImportError):
        import_torchvision()  # timm (the ConvNeXt wrapper) imports it
    from common import load_reference_or_none

    ref = load_reference_or_none(args.nanodet)
    import torch

    print(f"{machine_summary()}; torch {torch.__version__}; {thread_summary()};"
          f" median of {args.repeats}, ms")  # fmt: skip
    rows = []
    for path in [c for c in args.configs.split(",") if c]:
        for batch in args.batches:
            rows += config_rows(ref, path, args.nanodet, batch, args.repeats, args.variants)
    header = ["config", "batch", "part", "ours", *args.variants, "torch", "torch / ours"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
