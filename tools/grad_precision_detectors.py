"""tools/grad_precision.py's check for the legacy detectors and FCOS: how far our float32
training gradients are from the reference's float64 ones, against the reference's own
float32 distance.

Usage (from the repository root, torch and torchvision installed)::

    python tools/grad_precision_detectors.py /path/to/nanodet [--detector gfl] [--size 64]
        [--floor 1e-4] [--top 8] [--literal-only]

Detectors:

* ``gfl`` / ``nanodet_dw``: ``tools/make_golden_legacy.py``'s variants (NanoDet's
  OneStageDetector, GFLHead / NanoDetHead + ATSS) on its batch (3 images: a few boxes,
  none, crowded). ``--config configs/legacy/nanodet_m.py`` takes that config's
  architecture instead (80 classes, random weights); at ``--size`` other than 64 the
  images are ``size x size`` and the boxes scaled with them.
* ``fcos``: torchvision's FCOS, ``tools/make_golden_fcos_loss.py``'s setup (ResNet-18 with
  FrozenBatchNorm2d, 20 classes, 3 x 64 x 96) at the default ``--size 0``; at another
  size, ``configs/fcos_quickstart.py``'s model (trainable BatchNorm, 3 classes) on
  ``size x size`` images with the boxes scaled. The float64 copy trains on the float32
  matching, as in the golden.

Every norm affine and running statistic is randomised (``random_state_dict``). For each
trainable parameter ``d = max|g - g64| / max|g64|`` of ours (float32) and the reference's
float32 run against the reference's float64 one; a miss is ``d_ours > max(2 d_ref,
floor)``. Then kink-aligned (``tools/kinks.py``): each float32 run against a float64 run
on the ReLU/LeakyReLU sides it took (ours: our own float64 run). The exit status counts
the misses of the last table printed.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from nanodet_jax import runtime  # noqa: E402
from nanodet_jax.config.loading import load_config  # noqa: E402
from nanodet_jax.testing import normal_input, random_state_dict  # noqa: E402
from tools import make_golden_fcos, make_golden_fcos_loss  # noqa: E402
from tools import make_golden_legacy as legacy  # noqa: E402
from tools.grad_precision import gradient_rows, print_rows  # noqa: E402
from tools.kinks import JaxKinks, torch_kinks  # noqa: E402

DETECTORS = ("gfl", "nanodet_dw", "fcos")


def our_gradients(
    arch: dict, weights: dict, x: np.ndarray, targets: dict, dtype: type, masks: list | None = None
) -> tuple[dict, list, dict]:
    """Our gradients of every trainable parameter (PyTorch names and layout) of one
    ``loss(images, targets, "train")`` step, the kink sides the run took and the loss
    terms. ``dtype`` float64 (under ``jax.enable_x64``) casts parameters, buffers and input;
    ``masks`` (a previous call's sides) forces every ReLU/LeakyReLU onto them."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    from flax import nnx

    from nanodet_jax.models import build_model
    from nanodet_jax.weights.pytorch import load_torch_weights, model_variables, to_torch_layout

    model = build_model(ml_collections.ConfigDict({"arch": arch}))
    load_torch_weights(model, weights)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    cast = lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
    params, rest = jax.tree.map(cast, params), jax.tree.map(cast, rest)
    images = jnp.asarray(x.transpose(0, 2, 3, 1), dtype)
    targets = {k: jnp.asarray(v) for k, v in targets.items()}
    kinks = JaxKinks()

    @jax.jit
    def grads_of(params, rest, masks):
        def total(params):
            kinks.start(masks)
            loss, terms = nnx.merge(graphdef, params, rest, copy=True).loss(
                images, targets, "train"
            )
            return loss, (kinks.record, terms)

        grads, (record, terms) = jax.grad(total, has_aux=True)(params)
        named = model_variables(nnx.merge(graphdef, grads, rest, copy=True))
        return {k: v[...] for k, v in named.items() if isinstance(v, nnx.Param)}, record, terms

    with kinks.patched():
        grads, sides, terms = jax.device_get(grads_of(params, rest, masks))
    grads = {k: to_torch_layout(np.asarray(v, np.float64)) for k, v in grads.items()}
    return grads, sides, {k: float(v) for k, v in terms.items()}


def torch_runs(step, tm) -> dict[str, dict]:
    """``f32``, ``f64`` and ``f64_aligned`` gradients of ``step(model, float64: bool) ->
    (loss terms, gradients)``, and the float32 run's ``terms``."""
    tm64 = copy.deepcopy(tm).double()
    with torch_kinks(tm) as masks:
        terms, f32 = step(tm, False)
    f64 = step(tm64, True)[1]
    with torch_kinks(tm64, dict(masks)):
        aligned = step(tm64, True)[1]
    return {"f32": f32, "f64": f64, "f64_aligned": aligned, "terms": terms}


def legacy_setup(ref, name: str, config: str | None, size: int) -> tuple:
    """(our arch, weights, NCHW input, padded targets, torch step) of a legacy variant."""
    import torch

    from nanodet_jax.assigners.atss import grid_cells

    spec = legacy.VARIANTS[name]
    arch = load_config(config).model.arch.to_dict() if config else spec["arch"]
    tm = legacy.build(ref, arch)
    weights = random_state_dict({k: tuple(v.shape) for k, v in tm.state_dict().items()},
                                spec["weight_seed"])  # fmt: skip
    tm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    cells, counts = grid_cells(legacy.INPUT_SHAPE[2:], (8, 16, 32), 5)
    scale, classes = size / 64, int(arch["head"]["num_classes"])
    gts = [(b * np.float32(scale), lab % classes)
           for b, lab in legacy.make_ground_truth(cells, list(counts))]  # fmt: skip
    x = normal_input(legacy.INPUT_SEED, (3, 3, size, size))
    padded = {"gt_boxes": np.zeros((3, legacy.MAX_GTS, 4), np.float32),
              "gt_labels": np.zeros((3, legacy.MAX_GTS), np.int32),
              "gt_mask": np.zeros((3, legacy.MAX_GTS), bool)}  # fmt: skip
    for i, (b, lab) in enumerate(gts):
        padded["gt_boxes"][i, : len(b)], padded["gt_labels"][i, : len(b)] = b, lab
        padded["gt_mask"][i, : len(b)] = True
    names = tuple(k for k, _ in tm.named_parameters())

    def step(model, _float64):
        _, losses, grads = legacy.train_step(model, x, gts, names)
        return losses, grads

    return arch, weights, x, padded, torch_runs(step, tm)


def fcos_setup(size: int) -> tuple:
    """(our arch, weights, NCHW input, padded targets, torch runs) of FCOS."""
    import torch

    tv = make_golden_fcos_loss.import_torchvision()
    padded = make_golden_fcos_loss.padded_targets()
    if size == 0:
        shape, seed = make_golden_fcos_loss.INPUT
        tm = make_golden_fcos.small_fcos(tv).train(True)
        arch = {
            "name": "FCOS",
            "backbone": {"name": "ResNet", "depth": 18, "out_stages": [2, 3, 4]},
            "fpn": {"name": "FeaturePyramidNetwork", "in_channels": [128, 256, 512],
                    "out_channels": make_golden_fcos.FPN_CHANNELS},
            "head": {"name": "FCOSHead", "in_channels": make_golden_fcos.FPN_CHANNELS,
                     "num_classes": make_golden_fcos.NUM_CLASSES},
        }  # fmt: skip
        names = make_golden_fcos_loss.trainable(tm)
    else:
        arch = load_config(os.path.join(REPO, "configs", "fcos_quickstart.py")).model.arch
        # torchvision gets the same array: no BGR -> RGB reversal in ours either.
        arch = arch.to_dict() | {"input_channel_order": "RGB"}
        classes = int(arch["head"]["num_classes"])
        shape, seed = (3, 3, size, size), make_golden_fcos_loss.INPUT[1]
        tm = make_golden_fcos.small_fcos(
            tv, classes, int(arch["fpn"]["out_channels"]), torch.nn.BatchNorm2d
        ).train(True)
        hw = make_golden_fcos_loss.INPUT[0][2:]
        padded["gt_boxes"] = padded["gt_boxes"] * np.float32([size / hw[1], size / hw[0]] * 2)
        padded["gt_labels"] = padded["gt_labels"] % classes
        names = tuple(k for k, _ in tm.named_parameters())  # trainable_backbone_layers=5
    weights = make_golden_fcos.small_weights(
        {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    )
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    x = normal_input(seed, shape)
    matched = make_golden_fcos_loss.train_step(tm, torch.from_numpy(x), padded, names=names)[1]

    def step(model, float64):
        xt = torch.from_numpy(x).double() if float64 else torch.from_numpy(x)
        terms, _, _, grads = make_golden_fcos_loss.train_step(model, xt, padded, matched, names)
        return terms, grads

    return arch, weights, x, padded, torch_runs(step, tm)


def main(argv: list[str] | None = None) -> None:
    runtime.configure_xla()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("ref_path", help="checkout of RangiLyu/nanodet (the legacy detectors)")
    p.add_argument("--detector", choices=DETECTORS, default="gfl")
    p.add_argument("--config", help="legacy: a configs/legacy/*.py architecture instead")
    p.add_argument("--size", type=int, help="default: the golden's (64; FCOS 0 = 64 x 96)")
    p.add_argument("--floor", type=float, default=1e-4, help="the tests' floor")
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--literal-only", action="store_true", help="skip the kink-aligned table")
    args = p.parse_args(argv)

    import jax
    import torch

    torch.manual_seed(0)
    if args.detector == "fcos":
        size = 0 if args.size is None else args.size
        arch, weights, x, targets, runs = fcos_setup(size)
    else:
        from tools.reference import load_reference

        size = 64 if args.size is None else args.size
        ref = load_reference(args.ref_path)
        arch, weights, x, targets, runs = legacy_setup(ref, args.detector, args.config, size)
    ours, sides, terms = our_gradients(arch, weights, x, targets, np.float32)
    runs["f32"] = {k: runs["f32"][k] for k in ours}  # ours: the trainable ones
    print(f"{args.detector} {args.config or ''} input {tuple(x.shape)}, {len(ours)} parameters")
    # The same function first: float32 loss terms of both (they differ if the matching does).
    print("loss terms: ours", {k: f"{v:.6g}" for k, v in terms.items()})
    print("  reference", {k: f"{v:.6g}" for k, v in runs["terms"].items()})
    rows, zero = gradient_rows(ours, runs["f32"], {k: runs["f64"][k] for k in ours}, args.floor)
    missing = print_rows("against the reference's float64", rows, zero, args.floor, args.top)
    if not args.literal_only:
        with jax.enable_x64(True):
            ours64 = our_gradients(arch, weights, x, targets, np.float64, masks=sides)[0]
        aligned = {k: runs["f64_aligned"][k] for k in ours}
        rows, zero = gradient_rows(ours, runs["f32"], aligned, args.floor, ours64)
        missing = print_rows("kink-aligned", rows, zero, args.floor, args.top)
    sys.exit(1 if missing else 0)


if __name__ == "__main__":
    main()
