"""Record golden outputs of NanoDet's EfficientNet-Lite, GhostNet and CustomCspNet backbones
for ``tests/models/test_backbones_2.py``.

Usage (from the repository root, with torch installed)::

    python tools/make_golden_backbones_2.py /path/to/nanodet \
        [--out tests/data/golden_backbones_2.npz]

For every entry of :data:`BACKBONES` (built as the legacy configs build them: the
EfficientNet-Lite0 recipe, nanodet-g's CustomCspNet at half its widths, GhostNet 1.0x
with NanoDet's defaults) the
script builds NanoDet's own module, fills it with
``nanodet_jax.testing.random_state_dict(shapes, seed)`` (every BatchNorm affine parameter
and running statistic randomised), feeds a seeded N(0, 1) input and records, NHWC:

* ``<net>/eval/<i>``: output stage ``i`` in eval mode;
* ``<net>/train/<i>``: output stage ``i`` of one train-mode forward, and
  ``<net>/train/state/<key>`` every BatchNorm statistic after it (the first
  :data:`STAT_CHANNELS` channels of each);
* ``<net>/train/uniform/<j>``: EfficientNet-Lite's drop connect draws ``torch.rand`` once
  per residual block in training; the script replaces ``torch.rand`` by seeded numpy
  uniforms for that forward and records the ``j``-th call's values, so the test can
  feed the same ones to our drop connect.

The float64 twin of each module gives the reference's own float32 error,
``meta["nets"][net]["float32_noise"]`` (``max|f32 - f64| / max|f64|`` per tensor). ``meta``
also holds the constructor arguments, the reference's state_dict keys and shapes (in
order), the seeds and SHA-256 digests of the weights and the input.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from nanodet_jax.testing import array_digest, normal_input, random_state_dict  # noqa: E402
from tools.reference import load_reference  # noqa: E402

INPUT_SHAPE = (2, 3, 64, 64)  # NCHW: output stages at 8x8, 4x4 and 2x2
# nanodet-g.yml's net_cfg with every width halved (the same stage kinds, kernels, strides
# and residual counts): at nanodet-g's widths its outputs alone would take 460 KB.
NANODET_G_NET_CFG = [
    ["Conv", 3, 16, 3, 2],
    ["MaxPool", 3, 2],
    ["CspBlock", 16, 1, 3, 1],
    ["CspBlock", 32, 2, 3, 2],
    ["CspBlock", 64, 2, 3, 2],
    ["CspBlock", 128, 3, 3, 2],
]
# name -> (reference module, registry name, constructor kwargs, weight seed, input seed)
BACKBONES: dict[str, tuple[str, str, dict, int, int]] = {
    "efficientnet_lite0": (
        "nanodet.model.backbone.efficientnet_lite",
        "EfficientNetLite",
        {"model_name": "efficientnet_lite0", "out_stages": [2, 4, 6], "activation": "ReLU6"},
        21,
        31,
    ),
    "ghostnet": (
        "nanodet.model.backbone.ghostnet",
        "GhostNet",
        {"width_mult": 1.0, "out_stages": [4, 6, 9], "activation": "ReLU"},
        22,
        32,
    ),
    "custom_csp": (
        "nanodet.model.backbone.custom_csp",
        "CustomCspNet",
        {"net_cfg": NANODET_G_NET_CFG, "out_stages": [3, 4, 5], "activation": "LeakyReLU"},
        23,
        33,
    ),
}
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
# BatchNorm statistics are recorded for each layer's first channels only: the update is
# the same per-channel code everywhere, and all channels of EfficientNet-Lite0 and GhostNet
# would take 250 KB.
STAT_CHANNELS = 8
UNIFORM_SEED = 41


def _nhwc(t) -> np.ndarray:
    a = t.detach().cpu().numpy()
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def rel_error(a: np.ndarray, ref: np.ndarray) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    scale = float(np.abs(ref).max())
    return float(np.abs(a - ref).max()) / (scale if scale > 0 else 1.0)


@contextlib.contextmanager
def recorded_rand(values: list[np.ndarray], replay: bool):
    """``torch.rand`` from seeded numpy uniforms (appended to ``values``), or replaying them."""
    import torch

    original = torch.rand
    rng = np.random.default_rng(UNIFORM_SEED)
    calls = iter(range(10**6))

    def rand(size, dtype=None, device=None, **_):
        i = next(calls)
        if not replay:
            values.append(rng.uniform(size=tuple(size)).astype(np.float32))
        return torch.from_numpy(values[i].astype(np.float64)).to(dtype or torch.float32)

    torch.rand = rand
    try:
        yield
    finally:
        torch.rand = original


def run(tm, x: np.ndarray, uniforms: list[np.ndarray], replay: bool) -> list[np.ndarray]:
    import torch

    with torch.no_grad(), recorded_rand(uniforms, replay):
        return [_nhwc(t) for t in tm(torch.from_numpy(x))]


def record(ref, net: str) -> tuple[dict[str, np.ndarray], dict]:
    import torch

    module, registry_name, kwargs, weight_seed, input_seed = BACKBONES[net]
    cls = getattr(ref.module(module), registry_name)
    ctor = dict(copy.deepcopy(kwargs))
    if registry_name != "CustomCspNet":
        ctor["pretrain"] = False  # no ImageNet download
    tm = cls(**ctor)
    shapes = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    weights = random_state_dict(shapes, weight_seed)
    tm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()}, strict=True)
    tm64 = copy.deepcopy(tm).double()
    x = normal_input(input_seed, INPUT_SHAPE)
    arrays: dict[str, np.ndarray] = {}
    noise: dict[str, float] = {}
    for mode in ("eval", "train"):
        getattr(tm, mode)()
        getattr(tm64, mode)()
        uniforms: list[np.ndarray] = []
        out32 = run(tm, x, uniforms, replay=False)
        out64 = run(tm64, x.astype(np.float64), uniforms, replay=True)
        for i, (a, b) in enumerate(zip(out32, out64)):
            arrays[f"{net}/{mode}/{i}"] = a.astype(np.float32)
            noise[f"{mode}/{i}"] = rel_error(a, b)
        for j, u in enumerate(uniforms):
            arrays[f"{net}/{mode}/uniform/{j}"] = u.reshape(-1)
    sd32, sd64 = tm.state_dict(), tm64.state_dict()
    for k, v in sd32.items():
        stat = k.rsplit(".", 1)[-1]
        if stat in BN_STATS:
            if stat == "num_batches_tracked":
                arrays[f"{net}/train/state/{k}"] = v.numpy()
                continue
            arrays[f"{net}/train/state/{k}"] = v.numpy()[:STAT_CHANNELS]
            worst = noise.get(f"train/state/{stat}", 0.0)
            err = rel_error(v.numpy()[:STAT_CHANNELS], sd64[k].numpy()[:STAT_CHANNELS])
            noise[f"train/state/{stat}"] = max(worst, err)
    meta = {
        "registry_name": registry_name,
        "kwargs": kwargs,
        "weight_seed": weight_seed,
        "input_seed": input_seed,
        "input_shape_nchw": list(INPUT_SHAPE),
        "torch_keys": [[k, list(s)] for k, s in shapes.items()],
        "weights_sha256": array_digest(weights),
        "input_sha256": array_digest({"input": x}),
        "float32_noise": noise,
    }
    return arrays, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", help="path to a RangiLyu/nanodet checkout")
    parser.add_argument("--out", default=os.path.join(REPO, "tests/data/golden_backbones_2.npz"))
    args = parser.parse_args()
    ref = load_reference(args.reference)
    arrays: dict[str, np.ndarray] = {}
    meta: dict = {"format_version": 1, "nets": {}}
    for net in BACKBONES:
        a, m = record(ref, net)
        arrays.update(a)
        meta["nets"][net] = m
        worst = max(m["float32_noise"].items(), key=lambda kv: kv[1])
        print(f"{net}: {len(a)} arrays, worst float32 noise {worst[0]} {worst[1]:.2e}")
    np.savez_compressed(args.out, meta=np.asarray(json.dumps(meta)), **arrays)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
