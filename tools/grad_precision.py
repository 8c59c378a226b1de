"""How far our float32 training gradients are from a float64 run, against PyTorch's own.

Usage (from the repository root, torch installed)::

    python tools/grad_precision.py /path/to/nanodet [--config configs/nanodet_plus_m.py]
        [--size 416] [--batch 3] [--seed 3]

NanoDet-Plus with its real class count and activations is filled with
``random_state_dict`` (every norm affine and running statistic randomised) and run in
train mode (BatchNorm on batch statistics) on a seeded N(0, 1) batch with the ground
truth of ``tools/make_golden_train.py``, in both AGM phases, three times: NanoDet in
float32, NanoDet in float64, and ours (float32; set ``NANODET_JAX_DEPTHWISE=lax
NANODET_JAX_CONV3X3=lax`` for the XLA path GPUs and TPUs take). For every parameter it
prints ``d = max|g - g64| / max|g64|`` of both float32 runs and flags those where ours is
further than ``max(TORCH_FACTOR * d_torch, 1e-5)``.

Then the same with kinks aligned (``tools/kinks.py``): each float32 run is measured against
a float64 run forced onto the ReLU/LeakyReLU sides that float32 run took (ours: our own
float64 run, on XLA's float64 convolutions), which removes the chance of an element
within rounding of 0 switching sides. The exit status follows the kink-aligned count
(the literal one with ``--literal-only``).
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# How much further from float64 our float32 gradients may be than PyTorch's. The goldens
# were recorded on a Zen 4 VM, where 2 held; on a 2-core Intel Xeon VM (2026-12-02) a few
# parameters reached 2.2x (NanoDet-Plus) and 2.6x (FCOS): XLA compiles for the host CPU,
# and its vector widths change the summation order of reductions. 3 covers both; a real
# loss of precision (a bfloat16 pass, a dropped float32 accumulation) is 10x or more.
TORCH_FACTOR = 3.0
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from nanodet_jax import runtime  # noqa: E402
from nanodet_jax.config.loading import load_config  # noqa: E402
from nanodet_jax.testing import normal_input, random_state_dict  # noqa: E402
from tools import make_golden_train as golden_train  # noqa: E402
from tools.kinks import JaxKinks, torch_kinks  # noqa: E402
from tools.make_golden import rel_error  # noqa: E402
from tools.reference import load_reference  # noqa: E402

PHASES = ("joint", "detached")


def torch_gradients(ref, arch, weights, x, gts) -> dict[str, dict]:
    """NanoDet's gradients of every parameter per phase: ``f32``, ``f64`` and ``f64_aligned``
    (float64 on the float32 run's ReLU/LeakyReLU kink sides, ``tools/kinks.py``)."""
    import torch

    tm = ref.build_model(arch.to_dict())
    tm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    tm64 = copy.deepcopy(tm).double()
    golden_train.GRAD_PARAMS = tuple(k for k, _ in tm.named_parameters())
    out: dict[str, dict] = {"f32": {}, "f64": {}, "f64_aligned": {}}
    for phase in PHASES:
        epoch = 0 if phase == "joint" else arch.detach_epoch
        with torch_kinks(tm) as masks:
            out["f32"][phase] = golden_train.run_phase(tm, x, gts, epoch)[2]
        out["f64"][phase] = golden_train.run_phase(tm64, x, gts, epoch)[2]
        with torch_kinks(tm64, dict(masks)):
            out["f64_aligned"][phase] = golden_train.run_phase(tm64, x, gts, epoch)[2]
    return out


def our_gradients(
    config, weights, x, gts, dtype: str = "float32", masks=None, phases=PHASES, natural=()
):
    """Our gradients of every parameter per phase (PyTorch names and layout), and the
    kink sides (``tools/kinks.py``) the run took per phase.

    ``dtype="float64"`` runs parameters, activations, losses and XLA's own convolutions
    (the float32 C++ kernels step aside) in float64; call it under
    ``jax.enable_x64(True)``. ``masks`` (per phase, from a previous call) forces
    every ReLU/LeakyReLU onto those sides. Each phase compiles the whole step once
    (~30 s on 2 cores), hence ``phases``; the phases also named in ``natural`` are run a
    second time on their own sides, reusing that compilation, and returned under
    ``"<phase>/natural"``.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nanodet_jax.box_ops import center_priors
    from nanodet_jax.models import build_model
    from nanodet_jax.models.detectors.nanodet_plus import nanodet_plus_loss
    from nanodet_jax.weights.pytorch import load_torch_weights, model_variables, to_torch_layout

    arch = config.model.arch
    model = build_model(config, with_aux=True)
    load_torch_weights(model, weights)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if dtype == "float64":
        if not jax.config.read("jax_enable_x64"):
            raise RuntimeError("our_gradients(dtype='float64') needs jax_enable_x64")
        params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    priors = jnp.asarray(center_priors(x.shape[2:], arch.head.strides))
    padded = golden_train.pad_ground_truth(gts)
    num_classes, reg_max = int(arch.head.num_classes), int(arch.head.reg_max)
    images = jnp.asarray(x.transpose(0, 2, 3, 1), dtype)
    kinks = JaxKinks()

    @functools.partial(jax.jit, static_argnums=2)
    def grads_of(params, phase_masks, detach: bool, use_masks=True):
        def total(params):
            kinks.start(phase_masks, use_masks)
            m = nnx.merge(graphdef, params, rest, copy=True)
            head_out, aux_out = m.forward_train(images, detach_aux=detach)
            loss, _ = nanodet_plus_loss(
                head_out, aux_out, padded["gt_boxes"], padded["gt_labels"],
                padded["gt_mask"], priors, arch.head.loss, num_classes, reg_max,
            )  # fmt: skip
            return loss, kinks.record

        grads, record = jax.grad(total, has_aux=True)(params)
        named = model_variables(nnx.merge(graphdef, grads, rest, copy=True))
        return {k: v[...] for k, v in named.items() if isinstance(v, nnx.Param)}, record

    out, sides = {}, {}
    with kinks.patched():
        runs = [(p, p, True) for p in phases] + [(f"{p}/natural", p, False) for p in natural]
        for name, phase, use in runs:
            phase_masks = None if masks is None else masks[phase]
            grads, sides[name] = grads_of(params, phase_masks, phase == "detached", use)
            grads = jax.device_get(grads)
            out[name] = {k: to_torch_layout(np.asarray(v, np.float64)) for k, v in grads.items()}
    return out, sides


def gradient_rows(
    ours: dict, torch32: dict, torch64: dict, floor: float, ours64: dict | None = None
) -> tuple[list[tuple[float, float, float, str]], int]:
    """``(d_ours / bound, d_ours, d_torch, name)`` per parameter, worst first, and how many
    were left out.

    ``d_ours = rel_error(ours, ours64 or torch64)``, ``d_torch = rel_error(torch32,
    torch64)``, ``bound = max(TORCH_FACTOR * d_torch, floor)``. Parameters whose float64
    gradient is 0 in exact arithmetic (the bias of a train-mode BN followed by a conv and
    another BN, or a parameter the loss never reaches: norm < 1e-9 of the largest) have no
    scale to be relative to and are left out.
    """
    largest = max(np.linalg.norm(g) for g in torch64.values())
    rows, zero = [], 0
    for k, ref in torch64.items():
        if np.linalg.norm(ref) < 1e-9 * largest:
            zero += 1
            continue
        d_ours = rel_error(ours[k], (ours64 or torch64)[k])
        d_torch = rel_error(torch32[k], ref)
        rows.append((d_ours / max(TORCH_FACTOR * d_torch, floor), d_ours, d_torch, k))
    return sorted(rows, reverse=True), zero


# A golden's sample of each float64 gradient (golden_gradients): every entry of parameters
# of at most SAMPLES, else SAMPLES seeded ones, so that a golden of a model of 500
# parameters stays ~150 KB while its test sees every parameter.
SAMPLES = 64


def sample_indices(i: int, size: int) -> np.ndarray:
    """The entries of parameter number ``i`` (of ``size`` entries) a golden holds."""
    if size <= SAMPLES:
        return np.arange(size)
    return np.sort(np.random.default_rng(i).choice(size, SAMPLES, replace=False))


def golden_gradients(prefix: str, torch32: dict, torch64: dict) -> dict[str, np.ndarray]:
    """Arrays for a golden from which :func:`sampled_rows` applies the bound without torch:
    per parameter (``torch64``'s order) PyTorch float32's distance ``d_torch`` (whole
    tensors), ``max|g64|`` and ``|g64|_2``, and ``g64`` at :func:`sample_indices`
    (float32: its rounding, 6e-8 relative, is far below any floor)."""
    names = list(torch64)
    values = [torch64[k].ravel()[sample_indices(i, torch64[k].size)] for i, k in enumerate(names)]
    return {
        f"{prefix}/names": np.array(names),
        f"{prefix}/d_torch": np.array([rel_error(torch32[k], torch64[k]) for k in names]),
        f"{prefix}/scale": np.array([np.abs(torch64[k]).max() for k in names]),
        f"{prefix}/norm": np.array([np.linalg.norm(torch64[k]) for k in names]),
        f"{prefix}/g64": np.concatenate(values).astype(np.float32),
    }


def sampled_rows(ours: dict, golden: dict, prefix: str, floor: float) -> tuple[list, int]:
    """:func:`gradient_rows` of ``ours`` (PyTorch names and layout) against a golden's
    :func:`golden_gradients`: ``d_ours`` is taken on the sampled entries only (a lower
    bound of the whole tensor's), ``d_torch`` is the whole tensor's."""
    names, norms = golden[f"{prefix}/names"], golden[f"{prefix}/norm"]
    rows, zero, start = [], 0, 0
    for i, k in enumerate(names):
        k = str(k)
        idx = sample_indices(i, ours[k].size)
        ref = golden[f"{prefix}/g64"][start : start + len(idx)].astype(np.float64)
        start += len(idx)
        if norms[i] < 1e-9 * norms.max():
            zero += 1
            continue
        got = np.asarray(ours[k], np.float64).ravel()[idx]
        d_ours = float(np.abs(got - ref).max()) / golden[f"{prefix}/scale"][i]
        d_torch = float(golden[f"{prefix}/d_torch"][i])
        rows.append((d_ours / max(TORCH_FACTOR * d_torch, floor), d_ours, d_torch, k))
    assert start == len(golden[f"{prefix}/g64"]), "parameter sizes differ from the golden's"
    return sorted(rows, reverse=True), zero


def print_rows(title: str, rows: list, zero: int, floor: float, top: int) -> int:
    """Print the misses count and the ``top`` worst of :func:`gradient_rows`; return the
    number of misses."""
    bad = sum(r[0] > 1 for r in rows)
    print(f"{title}: {bad} of {len(rows)} parameters beyond "
          f"max({TORCH_FACTOR:g} x torch, {floor:g}) "
          f"({zero} with a float64 gradient of 0 left out)")  # fmt: skip
    for ratio, d_ours, d_torch, k in rows[:top]:
        print(f"  {k:60s} ours {d_ours:.2e}  torch f32 {d_torch:.2e}  ratio {ratio:.2f}")
    return bad


def report(ours: dict, torch32: dict, torch64: dict, top: int, ours64: dict | None = None) -> int:
    """Print the worst parameters per phase (:func:`gradient_rows`, floor 1e-5, as in the
    test); return how many miss the bound."""
    missing = 0
    for phase in PHASES:
        rows, zero = gradient_rows(
            ours[phase], torch32[phase], torch64[phase], 1e-5, ours64 and ours64[phase]
        )
        missing += print_rows(phase, rows, zero, 1e-5, top)
    return missing


def main(argv: list[str] | None = None) -> None:
    runtime.configure_xla()  # the entry points' XLA settings, before any computation
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("ref_path", help="checkout of RangiLyu/nanodet")
    p.add_argument("--config", default=os.path.join(REPO, "configs", "nanodet_plus_m.py"))
    p.add_argument("--size", type=int, default=416)
    p.add_argument("--batch", type=int, default=3)
    p.add_argument("--seed", type=int, default=golden_train.WEIGHT_SEED)
    p.add_argument("--top", type=int, default=8)
    p.add_argument(
        "--literal-only", action="store_true",
        help="skip the kink-aligned comparison (its float64 run of ours is the slow part)",
    )  # fmt: skip
    args = p.parse_args(argv)

    import torch

    torch.manual_seed(0)
    config = load_config(args.config)
    arch = config.model.arch
    ref = load_reference(args.ref_path)
    shapes = {k: tuple(v.shape) for k, v in ref.build_model(arch.to_dict()).state_dict().items()}
    weights = random_state_dict(shapes, args.seed)
    x = normal_input(golden_train.INPUT_SEED, (args.batch, 3, args.size, args.size))
    gts = golden_train.make_ground_truth(args.size, args.size)[: args.batch]
    torch_grads = torch_gradients(ref, arch, weights, x, gts)
    ours, sides = our_gradients(config, weights, x, gts)
    paths = {k: os.environ.get(k, "auto") for k in ("NANODET_JAX_DEPTHWISE", "NANODET_JAX_CONV3X3")}
    print(f"{os.path.basename(args.config)} at {args.size}, batch {args.batch}, kernels {paths}")
    print("== against NanoDet float64 (kink sides as each run took them)")
    missing = report(ours, torch_grads["f32"], torch_grads["f64"], args.top)
    if not args.literal_only:
        import jax

        with jax.enable_x64(True):
            ours64, _ = our_gradients(config, weights, x, gts, "float64", masks=sides)
        print("== kink-aligned: each float32 run against float64 on its own kink sides")
        missing = report(ours, torch_grads["f32"], torch_grads["f64_aligned"], args.top, ours64)
    sys.exit(1 if missing else 0)


if __name__ == "__main__":
    main()
