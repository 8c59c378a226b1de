"""Record NanoDet's ShuffleNetV2 on torchvision-format weights for tests/models/test_pretrained.py.

Usage (from the repository root, torch and torchvision installed, see torchvision_cpu.py)::

    python tools/make_golden_pretrained.py /path/to/nanodet [--out tests/data/golden_pretrained.npz]

For each model size, ``seeded_shufflenet_state_dict(size, seed)`` (torchvision's exact
keys, seeded values) goes through NanoDet's own ``pretrain=True`` path: its
``model_zoo.load_url`` is replaced by a function returning that state_dict, so
NanoDet's ``load_state_dict(strict=False)`` does the mapping and ignoring. The script
checks that NanoDet asked for torchvision's file of that size and that it left out
exactly ``fc.*`` and ``conv5.*``, then records, for a seeded N(0, 1) input of
:data:`INPUT_SHAPE`, the eval-mode outputs of stages 2, 3, 4 (NHWC, float32) as
``<size>/stage<i>``. The weights are not stored: the test regenerates them with
torchvision from the seed. ``meta`` (JSON) holds the seeds, the keys NanoDet left out
per size, and the float32 reference's own error ``max|f32 - f64| / max|f64|``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# torchvision before the reference: tools/reference.py stubs it only when it is absent.
from tools.torchvision_cpu import import_torchvision, seeded_shufflenet_state_dict  # noqa: E402

SIZES = ("0.5x", "1.0x", "1.5x", "2.0x")
ACTIVATION = "LeakyReLU"  # what NanoDet-Plus configures (the ImageNet weights used ReLU)
INPUT_SHAPE = (1, 3, 64, 64)  # NCHW; stages 2/3/4 give 8x8, 4x4, 2x2
WEIGHT_SEED, INPUT_SEED = 20261201, 7
FORMAT_VERSION = 1


def golden_input() -> np.ndarray:
    return np.random.RandomState(INPUT_SEED).standard_normal(INPUT_SHAPE).astype(np.float32)


def nanodet_outputs(ref_path: str, size: str) -> tuple[list[np.ndarray], list[str], float]:
    """NanoDet's stage outputs (NCHW), the keys its load left out, the float32 noise."""
    import torch

    from tools.reference import load_reference

    shufflenet = load_reference(ref_path).module("nanodet.model.backbone.shufflenetv2")
    state_dict = seeded_shufflenet_state_dict(size, WEIGHT_SEED)
    asked = []

    def load_url(url, *args, **kwargs):
        asked.append(url)
        return state_dict

    original = shufflenet.model_zoo.load_url
    shufflenet.model_zoo.load_url = load_url
    try:
        model = shufflenet.ShuffleNetV2(
            model_size=size, out_stages=(2, 3, 4), activation=ACTIVATION, pretrain=True
        )
    finally:
        shufflenet.model_zoo.load_url = original
    expected_file = os.path.basename(shufflenet.model_urls[f"shufflenetv2_{size}"])
    assert [os.path.basename(u) for u in asked] == [expected_file], asked
    # What NanoDet's strict=False load skipped (its own call discards the answer).
    result = model.load_state_dict(state_dict, strict=False)
    assert not result.missing_keys, result.missing_keys
    left_out = sorted(result.unexpected_keys)
    assert all(k.startswith(("fc.", "conv5.")) for k in left_out), left_out
    model.eval()
    x = torch.from_numpy(golden_input())
    with torch.no_grad():
        outs = [o.numpy() for o in model(x)]
        outs64 = [o.numpy() for o in model.double()(x.double())]
    noise = max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(outs, outs64))
    return outs, left_out, noise


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("reference", help="a RangiLyu/nanodet checkout")
    p.add_argument("--out", default=os.path.join(REPO, "tests", "data", "golden_pretrained.npz"))
    args = p.parse_args()
    tv = import_torchvision()
    commit = subprocess.run(
        ["git", "-C", args.reference, "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    arrays, left_out, noise = {}, {}, {}
    for size in SIZES:
        outs, left_out[size], noise[size] = nanodet_outputs(args.reference, size)
        for stage, out in zip((2, 3, 4), outs):
            arrays[f"{size}/stage{stage}"] = np.transpose(out, (0, 2, 3, 1)).astype(np.float32)
        scale = max(float(np.abs(o).max()) for o in outs)
        print(f"{size}: max|output| {scale:.3g}, float32 noise {noise[size]:.2e}")
    meta = {
        "format_version": FORMAT_VERSION,
        "sizes": list(SIZES),
        "activation": ACTIVATION,
        "input_shape": list(INPUT_SHAPE),
        "input_seed": INPUT_SEED,
        "weight_seed": WEIGHT_SEED,
        "nanodet_left_out": left_out,
        "float32_noise": noise,
        "torchvision": tv.__version__,
        "nanodet_commit": commit,
    }
    np.savez_compressed(args.out, meta=np.asarray(json.dumps(meta)), **arrays)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
