"""Our float32 training gradients against ``tests/data/golden_grad_precision.npz``.

Shared by ``tests/training/test_grad_precision.py`` (which explains the fixture and the
bounds) and ``benchmarks/accelerator.py``. The golden (``tools/record_grad_precision.py``)
holds, for a NanoDet-Plus-m training step (80 classes, 128 x 128, batch 2), PyTorch's
float32 distance from its float64 run per parameter and a sample of NanoDet's float64
gradients: our float64 run must reproduce that sample (:func:`float64_mismatches`), and
our float32 gradients must be no further from our float64 ones than TORCH_FACTOR (3) x PyTorch's
distance, floor 1e-5 relative (:func:`float32_misses`); both on the float32 run's own
ReLU/LeakyReLU kink sides (``tools/kinks.py``).
"""

from __future__ import annotations

import numpy as np

from nanodet_jax.config.loading import load_config
from tools.golden_checks import PRECISION
from tools.grad_precision import TORCH_FACTOR, our_gradients
from tools.make_golden import rel_error
from tools.record_grad_precision import CONFIG, OUT, inputs

# NanoDet's float64 run assigns on float32 copies (tools/make_golden_train.py), so its
# IoU and distance targets carry float32 rounding that ours (float64 throughout) does
# not: the aux head's box branch differs by up to ~5e-8 of its norm; other parameters
# agree to ~1e-9.
SAME_FUNCTION_RTOL = 2e-7
SAME_FUNCTION_ATOL = 1e-11  # gradients that are 0 up to float64 rounding (~1e-14)
FLOOR = 1e-5
PHASE = "joint"
# Still beyond the bound on the CPU-kernel path (d_ours / max(2 d_torch, 1e-5) measured
# when this was written, times 2/3 since the factor became TORCH_FACTOR = 3: the same
# absolute bounds); each may not get worse than 1.5 x that, every other parameter
# must meet the bound. Remove entries as they are fixed. aux_head.scales.2.scale is a
# scalar: the whole stride-32 box output times its cotangent, summed.
KNOWN_MISSES = {
    "aux_head.scales.2.scale": 2.26,
    "backbone.stage4.3.branch2.1.weight": 1.49,
    "backbone.stage2.0.branch2.1.weight": 0.73,
    "fpn.bottom_up_blocks.1.blocks.0.ghost2.primary_conv.1.weight": 0.70,
    "aux_fpn.bottom_up_blocks.1.blocks.0.ghost2.primary_conv.1.weight": 0.69,
    "fpn.bottom_up_blocks.1.blocks.0.shortcut.3.weight": 0.68,
    # These two pass with a centred BN forward, which norm.py does not use (see there).
    "fpn.top_down_blocks.1.blocks.0.ghost1.primary_conv.1.bias": 0.71,
    "aux_fpn.extra_lvl_in_conv.0.dwnorm.bias": 0.69,
}


def load_golden() -> dict[str, np.ndarray]:
    with np.load(OUT) as data:
        return {k: data[k] for k in data.files}


def golden_gradients(golden: dict) -> tuple[dict, dict, dict]:
    """Ours for the joint phase: float32, float64 on float32's kink sides, and float64 on
    its own sides (one compilation serves both float64 runs). The golden also holds the
    detached phase, which tools/grad_precision.py checks: each phase compiles the whole
    step (~25 s float32, ~40 s float64 on 2 cores), and the joint one sends every
    parameter's gradient through the backbone."""
    import jax

    shapes = {
        k: tuple(int(n) for n in s.split(",") if n)
        for k, s in zip(golden["state_names"], golden["state_shapes"])
    }
    weights, x, gts = inputs(shapes)
    config = load_config(CONFIG)
    with jax.default_matmul_precision(PRECISION):  # float32's bounds, not TF32's
        g32, sides32 = our_gradients(config, weights, x, gts, phases=(PHASE,))
    with jax.enable_x64(True), jax.default_matmul_precision(PRECISION):
        g64, _ = our_gradients(
            config, weights, x, gts, "float64", masks=sides32, phases=(PHASE,), natural=(PHASE,)
        )
    return g32[PHASE], g64[PHASE], g64[f"{PHASE}/natural"]


def float64_mismatches(golden: dict, natural: dict) -> list[str]:
    """Parameters whose float64 gradient (own kink sides) is not NanoDet's recorded one."""
    bad = []
    for i, k in enumerate(golden["param_names"]):
        ours = natural[k]
        norm = golden[f"{PHASE}/norm"][i]
        tol = SAME_FUNCTION_RTOL * norm + SAME_FUNCTION_ATOL
        got = ours.ravel()[golden[f"{PHASE}/index"][i]]
        err = max(np.abs(got - golden[f"{PHASE}/value"][i]).max(), abs(np.linalg.norm(ours) - norm))
        if err > tol:
            bad.append(f"{k}: |ours - NanoDet| {err:.2e} > {tol:.2e} (norm {norm:.2e})")
    return bad


def float32_misses(golden: dict, g32: dict, g64: dict) -> list[tuple[float, str]]:
    """``(d / bound, line)`` for each float32 gradient beyond its bound, worst first."""
    norms = golden[f"{PHASE}/norm"]
    rows = []
    for i, k in enumerate(golden["param_names"]):
        if norms[i] < 1e-9 * norms.max():
            continue  # 0 in exact arithmetic (train-mode BN -> conv -> BN): no scale
        d = rel_error(g32[k], g64[k])
        torch_d = golden[f"{PHASE}/bound"][i]
        bound = max(TORCH_FACTOR * torch_d, FLOOR) * 1.5 * KNOWN_MISSES.get(k, 1 / 1.5)
        if d > bound:
            rows.append((d / bound, f"{k}: ours {d:.2e} > bound {bound:.2e} "
                                    f"(PyTorch float32 {torch_d:.2e})"))  # fmt: skip
    return sorted(rows, reverse=True)
