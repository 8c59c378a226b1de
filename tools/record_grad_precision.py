"""Record ``tests/data/golden_grad_precision.npz`` for ``tests/test_grad_precision.py``.

Usage (from the repository root, torch installed)::

    python tools/record_grad_precision.py /path/to/nanodet

NanoDet-Plus-m with 80 classes, random weights (``random_state_dict``) and the seeded
input/ground truth of ``tools/make_golden_train.py`` at :data:`SIZE` x :data:`SIZE`,
batch :data:`BATCH` (small, so the test's float64 run of ours stays cheap), both AGM
phases. Per phase and parameter it stores

* ``bound``: PyTorch's float32 distance ``max|g32 - g64| / max|g64|`` against its
  float64 run on the same kink sides (``tools/kinks.py``), the bound the test applies
  (times 2, floor 1e-5) to our float32 gradients against our float64 ones;
* a sample of NanoDet's float64 gradients (natural kink sides): the entry of largest
  magnitude, :data:`NUM_SAMPLES` - 1 seeded entries and the L2 norm, which our float64
  gradients must reproduce;

plus the state_dict's names and shapes (the test rebuilds the weights without torch).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from nanodet_jax.config.loading import load_config  # noqa: E402
from nanodet_jax.testing import normal_input, random_state_dict  # noqa: E402
from tools import make_golden_train as golden_train  # noqa: E402
from tools.grad_precision import PHASES, torch_gradients  # noqa: E402
from tools.make_golden import rel_error  # noqa: E402
from tools.reference import load_reference  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "nanodet_plus_m.py")
SIZE, BATCH, NUM_SAMPLES = 128, 2, 4
OUT = os.path.join(REPO, "tests", "data", "golden_grad_precision.npz")


def inputs(shapes: dict) -> tuple[dict, np.ndarray, list]:
    """The weights, NCHW input and ground truth both sides use."""
    weights = random_state_dict(shapes, golden_train.WEIGHT_SEED)
    x = normal_input(golden_train.INPUT_SEED, (BATCH, 3, SIZE, SIZE))
    return weights, x, golden_train.make_ground_truth(SIZE, SIZE)[:BATCH]


def sample_indices(g: np.ndarray, seed: int) -> np.ndarray:
    flat = np.abs(g).ravel()
    rng = np.random.default_rng(seed)
    return np.concatenate([[flat.argmax()], rng.integers(0, flat.size, NUM_SAMPLES - 1)])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("ref_path", help="checkout of RangiLyu/nanodet")
    p.add_argument("--out", default=OUT)
    args = p.parse_args(argv)

    import torch

    torch.manual_seed(0)
    arch = load_config(CONFIG).model.arch
    ref = load_reference(args.ref_path)
    state = ref.build_model(arch.to_dict()).state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    weights, x, gts = inputs(shapes)  # scalars' shapes are stored as ""
    grads = torch_gradients(ref, arch, weights, x, gts)
    names = list(grads["f64"][PHASES[0]])
    out: dict[str, np.ndarray] = {
        "state_names": np.array(list(shapes)),
        "state_shapes": np.array([",".join(map(str, s)) for s in shapes.values()]),
        "param_names": np.array(names),
    }
    for phase in PHASES:
        g64 = grads["f64"][phase]
        idx = [sample_indices(g64[k], i) for i, k in enumerate(names)]
        out[f"{phase}/bound"] = np.array(
            [rel_error(grads["f32"][phase][k], grads["f64_aligned"][phase][k]) for k in names]
        )
        out[f"{phase}/index"] = np.stack(idx)
        out[f"{phase}/value"] = np.stack([g64[k].ravel()[i] for k, i in zip(names, idx)])
        out[f"{phase}/norm"] = np.array([np.linalg.norm(g64[k]) for k in names])
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes, {len(names)} parameters)")


if __name__ == "__main__":
    main()
