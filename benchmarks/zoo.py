"""Batch-1 latency and batch-16 throughput of the zoo's configs, in the same run (``infer.py``).

For each config, at its own input (the val ``input_size`` rounded up to 32, the canvas
of ``Predictor`` and the ONNX export):

* ``ours``: the inference model (no training branches), jitted, normalised NHWC input;
  the default backends (the C++ FFI kernels on CPU);
* ``onnxruntime``: our ONNX export of that model (``export_onnx``), default CPU session;
* ``torch eager``: NanoDet's model from its own .yml (the config's pair in
  ``tools/record_nanodet_yml.CONFIGS``), eval mode, ``torch.no_grad()``, NCHW, with torch's
  default intra-op threads and with one: on a loaded machine (more runnable jobs than
  cores) torch's OpenMP threads wait on each other at every operator and the default can
  be several times slower than one thread, so the speed-ups are taken against the faster;
* batch 16 (``repeats16`` > 0): images/s of ours and of NanoDet's eager model with torch's
  default threads (one per core, as XLA's CPU pool uses), speed-up = ours / torch.

Weights are random (speed does not depend on them); each figure is the median of
``repeats`` (batch 16: ``repeats16``) after warm-up calls (the first of ours also
compiles); ours and torch take turns within every repeat (``interleaved_medians``), so
the load of a shared machine hits both alike.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from common import REPO, interleaved_medians

IMPLEMENTATIONS = ("ours", "onnxruntime", "torch eager", "torch eager 1 thread")
BATCH16 = ("ours b16", "torch eager b16")


def zoo_configs() -> list[str]:
    """Our config of every NanoDet .yml, in the order of ``record_nanodet_yml.CONFIGS``."""
    from tools.record_nanodet_yml import CONFIGS

    return [os.path.join(REPO, "configs", py) for py in CONFIGS.values()]


def nanodet_yml(config_path: str, nanodet: str) -> str | None:
    """NanoDet's file of the same model, if the config has one."""
    from tools.record_nanodet_yml import CONFIGS

    rel = os.path.relpath(os.path.abspath(config_path), os.path.join(REPO, "configs"))
    ymls = [yml for yml, py in CONFIGS.items() if py == rel]
    return os.path.join(nanodet, "config", ymls[0]) if ymls else None


def our_forward(model: Any, hw: tuple[int, int], batch: int) -> Callable[[], Any]:
    """A blocking call of the jitted inference model (``InferenceModel``: BatchNorm
    folded, as ``Predictor`` runs it) on a random normalised batch."""
    import jax

    from nanodet_jax.models.inference import InferenceModel

    forward = InferenceModel(model).jit(lambda m, v: m(v))
    x = jax.device_put(np.random.default_rng(0).normal(size=(batch, *hw, 3)).astype("f4"))
    return lambda: forward(x).block_until_ready()


def time_onnx(model: Any, config: Any, repeats: int) -> float:
    from nanodet_jax.deploy.onnx_export import export_onnx, onnxruntime_latency

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.onnx")
        export_onnx(model, config, path)
        return onnxruntime_latency(path, repeats)


def torch_forward(
    model: Any, hw: tuple[int, int], batch: int, threads: int | None = None
) -> Callable[[], None]:
    """A call of NanoDet's eager model under ``no_grad``, at ``threads`` intra-op threads
    (None: torch's default) and back to the default after."""
    import torch

    x = torch.from_numpy(np.random.default_rng(0).normal(size=(batch, 3, *hw)).astype("f4"))
    default = torch.get_num_threads()

    def run():
        torch.set_num_threads(threads or default)
        try:
            with torch.no_grad():
                model(x)
        finally:
            torch.set_num_threads(default)

    return run


def time_config(
    path: str, ref: Any, nanodet: str | None, repeats: int, repeats16: int = 0, onnx: bool = True
) -> dict[str, Any]:
    """Seconds per implementation (absent: not measured) and what went wrong, for one config."""
    from nanodet_jax.config.loading import load_config
    from nanodet_jax.deploy.onnx_export import onnx_input_hw
    from nanodet_jax.models import build_model

    start = time.perf_counter()
    config = load_config(path)
    hw = onnx_input_hw(config)
    model = build_model(config, with_aux=False)
    result: dict[str, Any] = {"config": path, "input": f"{hw[0]}x{hw[1]}", "errors": {}}
    yml = nanodet_yml(path, nanodet) if nanodet else None
    theirs = None
    if ref is not None and yml is not None:
        from tools.check_zoo import build_reference, reference_arch

        theirs = build_reference(ref, reference_arch(ref, yml))  # eval, no ImageNet download
    elif ref is not None:
        result["errors"]["torch eager"] = "no NanoDet .yml pairs this config"
    fns = {"ours": our_forward(model, hw, 1)}
    if theirs is not None:
        fns["torch eager"] = torch_forward(theirs, hw, 1)
        import torch

        if torch.get_num_threads() > 1:  # else the same as the row above
            fns["torch eager 1 thread"] = torch_forward(theirs, hw, 1, threads=1)
    seconds = result["seconds"] = interleaved_medians(fns, repeats, warmup=2)
    if repeats16:
        fns = {"ours b16": our_forward(model, hw, 16)}
        if theirs is not None:
            fns["torch eager b16"] = torch_forward(theirs, hw, 16)
        seconds |= interleaved_medians(fns, repeats16, warmup=1)
    if onnx:
        try:
            seconds["onnxruntime"] = time_onnx(model, config, repeats)
        except (ImportError, NotImplementedError) as e:  # no onnx installed, or no emitter
            result["errors"]["onnxruntime"] = str(e).splitlines()[0]
    result["wall"] = time.perf_counter() - start
    return result


def table_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    """One row per config: batch 1, ms per implementation, then NanoDet's faster eager time
    (default threads or one) / each of ours; batch 16, images/s and ours / torch."""
    rows = []
    for r in results:
        s = r["seconds"]
        ms = [f"{s[k] * 1e3:.1f}" if k in s else "-" for k in IMPLEMENTATIONS]
        base = min((s[k] for k in IMPLEMENTATIONS[2:] if k in s), default=None)
        ratios = [f"{base / s[k]:.2f}x" if base and k in s else "-" for k in IMPLEMENTATIONS[:2]]
        rates = [f"{16 / s[k]:.1f}" if k in s else "-" for k in BATCH16]
        ratio16 = f"{s[BATCH16[1]] / s[BATCH16[0]]:.2f}x" if all(k in s for k in BATCH16) else "-"
        name = os.path.relpath(os.path.abspath(r["config"]), os.path.join(REPO, "configs"))
        rows.append([name, r["input"], *ms, *ratios, *rates, ratio16])
    return rows


TABLE_HEADER = [
    "config",
    "input",
    "ours ms",
    "onnxruntime ms",
    "torch eager ms",
    "torch 1 thread ms",
    "speed-up ours",
    "speed-up onnxruntime",
    "ours b16 img/s",
    "torch b16 img/s",
    "speed-up ours b16",
]
