"""Inference speed of NanoDet-Plus-m (320 and 416): ours vs the PyTorch reference, same run.

    python benchmarks/infer.py --nanodet /path/to/nanodet [--repeats 20] [--json out.json]
    python benchmarks/infer.py --zoo [--only SUBSTRING] --nanodet /path/to/nanodet
    python benchmarks/infer.py --configs configs/a.py,configs/b.py [--nanodet ...]
    python benchmarks/infer.py --fcos [options of benchmarks/fcos.py]

``--fcos``: FCOS-R50-FPN against torchvision (forward and training step, ``fcos.py``).

``--zoo`` (every config paired with a NanoDet .yml) or ``--configs`` switch to one row
per config at its own input size: batch 1 of ours, our ONNX export in onnxruntime
(``--no-onnx``: skipped) and NanoDet's eager model, and batch 16 of ours and NanoDet's
(``--repeats16``; 0 skips it); see ``benchmarks/zoo.py``. Without them:

Rows per input size:
* ``forward``: the model on normalised float32 NHWC input (raw head output), through
  ``Predictor`` (BatchNorm folded into the convolutions, weights as one flat list);
* ``end to end``: uint8 images -> normalisation -> model -> decode -> NMS (what
  ``Predictor`` runs on the device; host-side JPEG decoding and resizing excluded);
* ``torch eager``: NanoDet's model in eval mode under ``torch.no_grad()``, NCHW;
* ``torch channels_last``: the same with channels-last memory format (often faster on CPU);
* ``forward, BN not folded``: the same through ``Predictor(fold_bn=False)``;
* ``onnxruntime``: our ONNX export (``nanodet_jax.deploy.onnx_export``), batch 1, default and
  single-thread session; at batch 16 the ``--dynamic-batch`` export.
Batch 1 reports latency (ms, median of repeats after warm-up); batch 16 reports
throughput (images/s). ``speed-up`` is torch eager time / our time on the same row.
Weights are random (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from common import (
    load_reference_or_none,
    machine_summary,
    markdown_table,
    median_seconds,
    single_thread,
    thread_summary,
    write_json,
)
from zoo import TABLE_HEADER, table_rows, time_config, zoo_configs

from nanodet_jax import runtime  # noqa: E402
from nanodet_jax.config.loading import load_config
from nanodet_jax.evaluation.predictor import Predictor
from nanodet_jax.models import build_model
from nanodet_jax.models.inference import InferenceModel

CONFIGS = {320: "configs/nanodet_plus_m.py", 416: "configs/nanodet_plus_m_416.py"}


def our_forward_run(config, batch: int, dtype=jnp.float32):
    """A closure running our jitted inference model (``InferenceModel``, as ``Predictor``
    runs it: BatchNorm folded) on random normalised NHWC input, blocking; ``dtype``
    bfloat16 casts the weights and the input (``InferenceModel(dtype=)``)."""
    inference = InferenceModel(build_model(config, with_aux=False), dtype=dtype)
    forward = inference.jit(lambda m, v: m(v))
    size = config.data.val.input_size[0]
    x = np.random.default_rng(0).normal(size=(batch, size, size, 3))
    x = jax.device_put(x.astype(np.float32)).astype(dtype)
    return lambda: forward(x).block_until_ready()


def ours(config, batch: int, repeats: int) -> dict[str, float]:
    """Rows of ours, all through ``Predictor`` (what eval and predict run): the raw
    forward with BatchNorm folded, the same without folding, and end to end."""
    model = build_model(config, with_aux=False)
    size = config.data.val.input_size[0]
    x = jax.device_put(np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype("f4"))
    predictor = Predictor(model, config)
    unfolded = Predictor(model, config, fold_bn=False)
    # Equality of the two: tests/models/test_batchnorm_folding.py, tools/check_zoo.py.
    out = {
        "forward": median_seconds(lambda: predictor.raw_outputs(x).block_until_ready(), repeats),
        "forward, BN not folded": median_seconds(
            lambda: unfolded.raw_outputs(x).block_until_ready(), repeats
        ),
    }
    u8 = np.random.default_rng(1).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    valid = np.full((batch, 2), size, np.int32)
    u8, valid = jax.device_put(u8), jax.device_put(valid)
    out["end to end"] = median_seconds(
        lambda: jax.block_until_ready(predictor.forward(u8, valid)), repeats
    )
    return out


def onnxruntime_times(config, batch: int, repeats: int) -> dict[str, float]:
    """Our ONNX export in onnxruntime: batch 1 from the static export (default threads and
    one), larger batches from the ``--dynamic-batch`` export."""
    try:
        from nanodet_jax.deploy.onnx_export import export_onnx, onnxruntime_latency
    except ImportError:
        return {}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.onnx")
        model = build_model(config, with_aux=False)
        if batch > 1:
            export_onnx(model, config, path, dynamic_batch=True)
            return {"onnxruntime (dynamic batch)": onnxruntime_latency(path, repeats, batch=batch)}
        export_onnx(model, config, path)
        return {
            "onnxruntime": onnxruntime_latency(path, repeats),
            "onnxruntime 1 thread": onnxruntime_latency(path, repeats, threads=1),
        }


def torch_forward_run(ref, config, batch: int, *, cuda: bool = False, bf16: bool = False,
                      channels_last: bool = False):  # fmt: skip
    """A closure running NanoDet's eval-mode inference model (no aux branch) under
    ``torch.no_grad()`` on random NCHW input, synchronised on CUDA; ``bf16``: under
    ``torch.autocast(bfloat16)``."""
    import torch

    model = ref.build_model(config.model.arch.to_dict())
    del model.aux_fpn, model.aux_head  # inference model only
    model.eval()
    size = config.data.val.input_size[0]
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(batch, 3, size, size)).astype("f4"))
    if cuda:
        model, x = model.cuda(), x.cuda()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cuda" if cuda else "cpu", torch.bfloat16, enabled=bf16)

    def run():
        with torch.no_grad(), autocast:
            model(x)
        if cuda:
            torch.cuda.synchronize()

    return run


def torch_times(ref, config, batch: int, repeats: int) -> dict[str, float]:
    return {
        name: median_seconds(torch_forward_run(ref, config, batch, channels_last=cl), repeats)
        for name, cl in (("torch eager", False), ("torch channels_last", True))
    }


def run_configs(paths: list[str], ref: Any, args: argparse.Namespace) -> None:
    """The per-config table (batch-1 latency), printed row by row as it is measured."""
    results = []
    for path in paths:
        results.append(
            time_config(path, ref, args.nanodet, args.repeats, args.repeats16, not args.no_onnx)
        )
        r = results[-1]
        notes = "; ".join(f"{k}: {v}" for k, v in r["errors"].items())
        cells = " | ".join(table_rows([r])[0])
        print(f"| {cells} | ({r['wall']:.0f} s) {notes}", flush=True)
    print(f"\nbatch 1: median of {args.repeats}, speed-up = faster torch eager ms / ms; "
          f"batch 16: median of {args.repeats16}, speed-up = ours img/s / torch's\n")  # fmt: skip
    print(markdown_table(TABLE_HEADER, table_rows(results)))
    write_json(args.json, {"machine": machine_summary(), "repeats": args.repeats,
                           "repeats16": args.repeats16, "configs": results})  # fmt: skip


def main() -> None:
    if "--fcos" in sys.argv[1:]:
        import fcos

        fcos.main([a for a in sys.argv[1:] if a != "--fcos"])
        return
    runtime.configure_xla()  # the entry points' XLA settings, before any computation
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nanodet", help="path of a RangiLyu/nanodet checkout (torch rows)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--sizes", type=int, nargs="+", default=[320, 416])
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--zoo", action="store_true", help="every config of NanoDet's zoo")
    p.add_argument("--configs", default="", help="comma-separated config paths")
    p.add_argument("--only", default="", help="with --zoo/--configs: paths containing this")
    p.add_argument("--repeats16", type=int, default=3, help="with --zoo/--configs: batch 16")
    p.add_argument("--no-onnx", action="store_true", help="with --zoo/--configs: no ORT")
    p.add_argument("--threads1", action="store_true", help="one thread each (common.py)")
    args = p.parse_args()
    if args.threads1:
        single_thread()
    if args.nanodet and (args.zoo or args.configs):
        # timm (NanoDet's ConvNeXt wrapper) imports torchvision, which must come in before
        # the reference loader puts its stand-ins for NanoDet's optional imports in place.
        from tools.torchvision_cpu import import_torchvision

        try:
            import_torchvision()
        except Exception as e:  # noqa: BLE001 -- only the TIMMWrapper config needs it
            print(f"note: torchvision unavailable ({e}); no torch row for TIMMWrapper configs")
    ref = load_reference_or_none(args.nanodet)
    if ref is not None:
        import torch

        print(f"torch {torch.__version__}")
    print(f"{machine_summary()}; {thread_summary()}")
    if args.zoo or args.configs:
        paths = zoo_configs() if args.zoo else [c for c in args.configs.split(",") if c]
        run_configs([c for c in paths if args.only in c], ref, args)
        return

    rows, results = [], {}
    for size in args.sizes:
        config = load_config(CONFIGS[size])
        for batch in (1, 16):
            reps = args.repeats if batch == 1 else max(3, args.repeats // 4)
            times = ours(config, batch, reps)
            times |= onnxruntime_times(config, batch, reps)
            if ref is not None:
                times |= torch_times(ref, config, batch, reps)
            results[f"{size}/b{batch}"] = times
            base = times.get("torch eager")
            for name, t in times.items():
                value = f"{t * 1e3:.1f} ms" if batch == 1 else f"{batch / t:.1f} img/s"
                speedup = f"{base / t:.2f}x" if base else "-"
                rows.append([f"m-{size}", batch, name, value, speedup])
    print(markdown_table(["model", "batch", "implementation", "latency / throughput",
                          "speed-up vs torch eager"], rows))  # fmt: skip
    write_json(args.json, {"machine": machine_summary(), "seconds": results})


if __name__ == "__main__":
    main()
