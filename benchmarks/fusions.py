"""What each inference fusion of the folded model is worth: the folded model with all of
them against the same model with one switched off, in the same process, called in turn.

    python benchmarks/fusions.py [--sizes 320 416] [--repeats 20] [--json out.json]

BatchNorm folding (``models/batchnorm_folding.py``) marks convolutions whose C++ kernel
takes over work of its neighbours; each row clears one mark on every convolution:

* ``shuffle in the 1x1``: ``stores_interleaved`` (ShuffleNetV2's channel shuffle stored by
  branch2's last 1x1; off: XLA's interleave after the kernel);
* ``split read in place``: ``input_channel_offset`` (the stride-1 block's branch reads its
  half of the input; off: a slice first);
* ``max pool in the stem``: ``max_pool`` (off: the pool in XLA after the stem kernel).

The calls take turns within every repeat (``common.interleaved_medians``), so a busy
spell on a shared machine slows all variants alike; ``ratio`` is the variant's median
over the all-fusions median (> 1: the fusion saves time). Outputs are compared too.
Weights are random (speed does not depend on them).
"""

from __future__ import annotations

import argparse

import common  # noqa: F401 -- puts the repository on sys.path
import jax
import numpy as np
from common import interleaved_medians, machine_summary, markdown_table, write_json
from flax import nnx

from nanodet_jax import runtime
from nanodet_jax.config.loading import load_config
from nanodet_jax.models import build_model
from nanodet_jax.models.inference import InferenceModel
from nanodet_jax.models.layers import Conv2d

CONFIGS = {320: "configs/nanodet_plus_m.py", 416: "configs/nanodet_plus_m_416.py"}
# row name -> (Conv2d attribute, its value when off)
FUSIONS = {
    "shuffle in the 1x1": ("stores_interleaved", False),
    "split read in place": ("input_channel_offset", 0),
    "max pool in the stem": ("max_pool", False),
}


def without(model: nnx.Module, attr: str, off: object) -> tuple[InferenceModel, int]:
    """The folded inference model of ``model`` with ``attr`` cleared on every convolution,
    and how many were marked."""
    inference = InferenceModel(model)
    module = inference.merge(inference.arrays)
    marked = 0
    for _, conv in nnx.iter_modules(module):
        if isinstance(conv, Conv2d) and getattr(conv, attr) != off:
            setattr(conv, attr, off)
            marked += 1
    inference.set_module(module)
    return inference, marked


def main() -> None:
    runtime.configure_xla()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[320, 416])
    p.add_argument("--repeats", type=int, default=20, help="batch-16 calls; batch 1: 5x")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    print(machine_summary())
    rows, results = [], []
    for size in args.sizes:
        model = build_model(load_config(CONFIGS[size]), with_aux=False)
        variants = {"all fusions": (InferenceModel(model), 0)}
        variants.update({name: without(model, *FUSIONS[name]) for name in FUSIONS})
        for batch in (1, 16):
            x = np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(np.float32)
            x = jax.device_put(x)
            calls, outs = {}, {}
            for name, (inference, _) in variants.items():
                forward = inference.jit(lambda m, v: m(v))
                outs[name] = np.asarray(forward(x))
                calls[name] = lambda f=forward, x=x: f(x).block_until_ready()
            repeats = args.repeats * (5 if batch == 1 else 1)
            medians = interleaved_medians(calls, repeats, warmup=2)
            base = medians["all fusions"]
            for name, (_, marked) in variants.items():
                diff = float(np.abs(outs[name] - outs["all fusions"]).max())
                ratio = medians[name] / base
                ms = f"{medians[name] * 1e3:.2f} ms"
                rows.append([f"m-{size}", batch, name, marked or "", ms, f"{ratio:.3f}",
                             f"{diff:.1e}"])  # fmt: skip
                result = dict(variant=name, marked=marked, seconds=medians[name])
                results.append(dict(size=size, batch=batch, ratio=ratio, max_abs_diff=diff,
                                    **result))  # fmt: skip
    header = ["model", "batch", "variant (off)", "convs marked", "median", "ratio", "max |diff|"]
    print(markdown_table(header, rows))
    write_json(args.json, {"machine": machine_summary(), "rows": results})


if __name__ == "__main__":
    main()
