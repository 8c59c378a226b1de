"""Record golden outputs of NanoDet's ResNet, MobileNetV2 and RepVGG backbones for
``tests/models/test_backbones_1.py``.

Usage (from the repository root, with torch installed)::

    python tools/make_golden_backbones.py /path/to/nanodet [--out tests/data/golden_backbones_1.npz]

For every variant in :data:`VARIANTS` the script builds NanoDet's own backbone class, fills
it with ``nanodet_jax.testing.random_state_dict(shapes, seed)`` (every conv, every BatchNorm
affine parameter and running statistic random), feeds a seeded N(0, 1) ``[2, 3, 64, 64]``
input and records, NHWC float32:

* ``<variant>/eval/<i>``: every output stage in eval mode (running statistics);
* ``<variant>/train/<last>``: the last output stage in train mode (batch statistics), one
  forward; every earlier layer feeds it, and storing only it keeps the file small.

The shallow Bottleneck variant is NanoDet's ResNet class with its ``resnet_spec`` table
overridden (a subclass), so a full ResNet-50's 23M weights are not needed to check the
Bottleneck path. The same models run in float64 too: ``meta[variant]["float32_noise"]``
is the float32 reference's own error ``max|f32 - f64| / max|f64|`` per tensor.

For RepVGG the script also runs NanoDet's ``repvgg_model_convert`` into a ``deploy=True``
model and records what it produced, compactly (the fused A0 has 8M weights):
``repvgg_a0/fused/bias`` every block's bias, ``repvgg_a0/fused/proj`` every block's kernel
(OIHW) flattened per output channel times a seeded N(0, 1) vector (``normal_input``
of seed :data:`PROJ_SEED`, length I*9), both concatenated in ``meta["fused_blocks"]`` order,
and the full kernels of the blocks in :data:`FULL_KERNELS` under ``repvgg_a0/fused/<block>``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from nanodet_jax.testing import array_digest, normal_input, random_state_dict  # noqa: E402
from tools.reference import load_reference  # noqa: E402

INPUT_SHAPE = (2, 3, 64, 64)
PROJ_SEED = 99
FULL_KERNELS = ("stage0",)  # the stem; the projections cover every block's kernel
SHORT_BOTTLENECK_LAYERS = [2, 1, 1, 1]  # layer1 has a block without downsample

# name -> (reference class, constructor kwargs, weight seed, input seed)
VARIANTS: dict[str, tuple[str, dict, int, int]] = {
    "resnet18": ("ResNet", {"depth": 18, "out_stages": [2, 3, 4]}, 1, 11),
    "resnet50_short": (
        "ResNetShort",
        {"depth": 50, "out_stages": [4], "activation": "LeakyReLU"},
        2,
        12,
    ),
    "mobilenetv2": ("MobileNetV2", {"width_mult": 1.0, "out_stages": [1, 2, 4, 6]}, 3, 13),
    # NanoDet's legacy RepVGG-A0 config: out_stages [2, 3, 4], last_channel 512.
    "repvgg_a0": (
        "RepVGG",
        {"arch": "A0", "out_stages": [2, 3, 4], "activation": "ReLU", "last_channel": 512},
        4,
        14,
    ),
}


def _reference_class(ref, name: str):
    if name == "ResNet" or name == "ResNetShort":
        mod = ref.module("nanodet.model.backbone.resnet")
        if name == "ResNet":
            return lambda **kw: mod.ResNet(pretrain=False, **kw)
        spec = {50: (mod.Bottleneck, SHORT_BOTTLENECK_LAYERS)}
        short = type("ResNetShort", (mod.ResNet,), {"resnet_spec": spec})
        return lambda **kw: short(pretrain=False, **kw)
    if name == "MobileNetV2":
        return ref.module("nanodet.model.backbone.mobilenetv2").MobileNetV2
    if name == "RepVGG":
        return ref.module("nanodet.model.backbone.repvgg").RepVGG
    raise KeyError(name)


def _nhwc(t) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy().transpose(0, 2, 3, 1))


def rel_error(a: np.ndarray, ref: np.ndarray) -> float:
    """max|a - ref| / max|ref| (the test's metric)."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - ref).max()) / max(float(np.abs(ref).max()), 1e-30)


def _outputs(tm, x: np.ndarray) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        return [_nhwc(t) for t in tm(torch.from_numpy(x))]


def _build(cls, kwargs: dict):
    with contextlib.redirect_stdout(io.StringIO()):  # RepVGG blocks print themselves
        return cls(**kwargs)


def record_variant(ref, name: str) -> tuple[dict[str, np.ndarray], dict]:
    import torch

    cls_name, kwargs, weight_seed, input_seed = VARIANTS[name]
    cls = _reference_class(ref, cls_name)
    tm = _build(cls, kwargs)
    shapes = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    weights = random_state_dict(shapes, weight_seed)
    tm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    arrays: dict[str, np.ndarray] = {}
    meta: dict = {}
    if cls_name == "RepVGG":  # before the train-mode forward changes the running statistics
        arrays.update(_record_fusion(ref, tm, cls, kwargs, name, meta))
    tm64 = copy.deepcopy(tm).double()
    x = normal_input(input_seed, INPUT_SHAPE)
    noise: dict[str, float] = {}
    for mode in ("eval", "train"):
        getattr(tm, mode)()
        getattr(tm64, mode)()
        out32, out64 = _outputs(tm, x), _outputs(tm64, x.astype(np.float64))
        keep = range(len(out32)) if mode == "eval" else [len(out32) - 1]
        for i in keep:
            arrays[f"{name}/{mode}/{i}"] = out32[i].astype(np.float32)
            noise[f"{mode}/{i}"] = rel_error(out32[i], out64[i])
    meta |= {
        "reference_class": cls_name,
        "kwargs": kwargs,
        "weight_seed": weight_seed,
        "input_seed": input_seed,
        "input_shape_nchw": list(INPUT_SHAPE),
        "input_sha256": array_digest({"input": x}),
        "weights_sha256": array_digest(weights),
        # (key, shape) pairs in state_dict order (a JSON object would be key-sorted)
        "torch_keys": [[k, list(s)] for k, s in shapes.items()],
        "float32_noise": noise,
    }
    return arrays, meta


def _record_fusion(ref, tm, cls, kwargs: dict, name: str, meta: dict) -> dict[str, np.ndarray]:
    convert = ref.module("nanodet.model.backbone.repvgg").repvgg_model_convert
    tm.eval()
    deploy = _build(cls, {**kwargs, "deploy": True})
    with contextlib.redirect_stdout(io.StringIO()):  # it prints every parameter
        deploy = convert(tm, deploy)
    sd = {k: v.detach().cpu().numpy() for k, v in deploy.state_dict().items()}
    blocks = [k[: -len(".rbr_reparam.weight")] for k in sd if k.endswith(".rbr_reparam.weight")]
    arrays, projections = {}, []
    for block in blocks:
        kernel = sd[f"{block}.rbr_reparam.weight"].astype(np.float64)
        r = normal_input(PROJ_SEED, (kernel[0].size,)).astype(np.float64)
        projections.append(kernel.reshape(kernel.shape[0], -1) @ r)
        if block in FULL_KERNELS:
            arrays[f"{name}/fused/{block}"] = sd[f"{block}.rbr_reparam.weight"]
    arrays[f"{name}/fused/proj"] = np.concatenate(projections).astype(np.float32)
    arrays[f"{name}/fused/bias"] = np.concatenate(
        [sd[f"{b}.rbr_reparam.bias"] for b in blocks]
    ).astype(np.float32)
    meta["fused_blocks"] = blocks
    meta["deploy_torch_keys"] = [[k, list(v.shape)] for k, v in sd.items()]
    return arrays


def _git_commit(path: str) -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("ref_path", help="checkout of RangiLyu/nanodet")
    p.add_argument("--out", default=os.path.join(REPO, "tests", "data", "golden_backbones_1.npz"))
    args = p.parse_args(argv)

    import torch

    torch.manual_seed(0)  # only the (overwritten) default init draws from it
    ref = load_reference(args.ref_path)
    arrays: dict[str, np.ndarray] = {}
    meta = {
        "reference_commit": _git_commit(args.ref_path),
        "torch_version": torch.__version__,
        "proj_seed": PROJ_SEED,
        "short_bottleneck_layers": SHORT_BOTTLENECK_LAYERS,
        "variants": {},
    }
    for name in VARIANTS:
        variant_arrays, meta["variants"][name] = record_variant(ref, name)
        arrays.update(variant_arrays)
        noise = meta["variants"][name]["float32_noise"]
        print(f"{name}: {len(variant_arrays)} arrays, f32 noise {noise}")
    arrays["meta"] = np.asarray(json.dumps(meta, sort_keys=True))
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: {os.path.getsize(args.out) / 2**10:.0f} KiB")


if __name__ == "__main__":
    main()
