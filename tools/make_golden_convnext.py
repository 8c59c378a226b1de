"""Record golden outputs of NanoDet's ``TIMMWrapper`` over timm's ConvNeXt for
``tests/models/test_convnext.py``.

Usage (from the repository root, with torch and timm installed: ``pip install --no-deps
timm``; timm imports torchvision, loaded through ``tools/torchvision_cpu.py``)::

    python tools/make_golden_convnext.py /path/to/nanodet [--out tests/data/golden_convnext.npz]

For every entry of :data:`VARIANTS` the script builds NanoDet's backbone with
``build_backbone`` (so through timm's ``create_model(features_only=True)``), fills it with
``nanodet_jax.testing.random_state_dict(shapes, WEIGHT_SEED)`` (norms, biases and the
layer-scale ``gamma`` included) and feeds a seeded N(0, 1) 2 x 3 x 64 x 64 batch. It
records, NHWC float32:

* ``<variant>/eval/<i>``: each output stage in eval mode;
* ``<variant>/train/<i>``: train mode, for the variants without stochastic depth (its
  random masks cannot be reproduced); ConvNeXt has no BatchNorm, so these equal eval;
* ``meta["variants"][v]["torch_keys"]``: the wrapper's state_dict keys and shapes, in
  order, and ``float32_noise``: the float32 reference's error against float64.

``meta["classifier_keys"]`` lists the keys of timm's whole ``convnext_atto`` (stem.0.*,
stages.N.*, head.*), the layout of timm's released checkpoints. The script also checks,
on the reference side, the two file layouts ``load_timm_checkpoint`` accepts: the
wrapper's weights saved as the feature net's state_dict load through timm's own
``checkpoint_path``, and renamed to the whole model's keys they give the same stages.
``meta["nanodet_yml"]`` is NanoDet's :data:`YML` as parsed content (``yaml.safe_load``),
so that the suite loads it without a NanoDet checkout.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import tempfile

import numpy as np
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from nanodet_jax.testing import array_digest, normal_input, random_state_dict  # noqa: E402
from tools.reference import load_reference  # noqa: E402
from tools.torchvision_cpu import import_torchvision  # noqa: E402

WEIGHT_SEED = 11
INPUT_SEED = 12
INPUT_SHAPE = (2, 3, 64, 64)
YML = "config/convnext/nanodet-plus_convnext-nano_640.yml"
VARIANTS: dict[str, dict] = {
    # The smallest registered variant, as NanoDet's convnext yml configures convnext_nano.
    "atto": {
        "name": "TIMMWrapper",
        "model_name": "convnext_atto",
        "features_only": True,
        "pretrained": False,
        "out_indices": [1, 2, 3],
    },
    # Linear MLPs (convnext_tiny has conv_mlp=False), reduced; stage 3 left out, per-stage
    # kernel sizes, a drop-path rate that eval mode must ignore, and ls_init_value None,
    # which timm's create_model drops (None keywords mean the default: layer scale stays).
    "tiny_reduced": {
        "name": "TIMMWrapper",
        "model_name": "convnext_tiny",
        "features_only": True,
        "pretrained": False,
        "out_indices": [0, 2],
        "depths": [1, 1, 2, 1],
        "dims": [16, 24, 32, 40],
        "kernel_sizes": [7, 5, 3, 7],
        "ls_init_value": None,
        "drop_path_rate": 0.3,
    },
}


def _nhwc(t) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _run(model, x: np.ndarray, mode: str, dtype) -> list[np.ndarray]:
    import torch

    model.train(mode == "train")
    with torch.no_grad():
        return [_nhwc(o) for o in model(torch.from_numpy(x.astype(dtype)))]


def record_variant(ref, name: str, cfg: dict) -> tuple[dict[str, np.ndarray], dict, object]:
    import torch

    build_backbone = ref.module("nanodet.model.backbone").build_backbone
    model = build_backbone(copy.deepcopy(cfg))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    weights = random_state_dict(shapes, WEIGHT_SEED)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    model64 = copy.deepcopy(model).double()
    x = normal_input(INPUT_SEED, INPUT_SHAPE)
    modes = ("eval",) if cfg.get("drop_path_rate") else ("eval", "train")
    arrays, noise = {}, {}
    for mode in modes:
        for i, (o, o64) in enumerate(
            zip(_run(model, x, mode, np.float32), _run(model64, x, mode, np.float64))
        ):
            arrays[f"{name}/{mode}/{i}"] = o.astype(np.float32)
            noise[f"{mode}/{i}"] = _rel(o, o64)
    meta = {
        "cfg": cfg,
        "modes": list(modes),
        "torch_keys": [[k, list(s)] for k, s in shapes.items()],
        "weights_sha256": array_digest(weights),
        "float32_noise": noise,
    }
    return arrays, meta, model


def check_checkpoint_layouts(atto, expected: list[np.ndarray]) -> list[str]:
    """Reference-side proof of the two layouts: returns the classifier's keys."""
    import timm
    import torch

    x = torch.from_numpy(normal_input(INPUT_SEED, INPUT_SHAPE))
    feature_sd = atto.timm.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "features.pth")
        torch.save(feature_sd, path)
        loaded = timm.create_model(
            "convnext_atto", features_only=True, out_indices=[1, 2, 3], checkpoint_path=path
        ).eval()
    with torch.no_grad():
        for o, e in zip(loaded(x), expected):
            assert np.array_equal(_nhwc(o), e), "timm's checkpoint_path load differs"
    classifier = timm.create_model("convnext_atto", pretrained=False).eval()
    renamed = {re.sub(r"^(stem|stages)_(\d+)\.", r"\1.\2.", k): v for k, v in feature_sd.items()}
    missing = classifier.load_state_dict(renamed, strict=False).missing_keys
    assert all(k.startswith("head.") for k in missing), missing
    with torch.no_grad():
        outs = classifier.forward_intermediates(x, indices=[1, 2, 3], intermediates_only=True)
    for o, e in zip(outs, expected):
        assert np.array_equal(_nhwc(o), e), "the whole model's stages differ"
    print("checkpoint layouts: timm's checkpoint_path and the classifier's keys agree")
    return list(classifier.state_dict())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("ref_path", help="checkout of RangiLyu/nanodet")
    p.add_argument("--out", default=os.path.join(REPO, "tests", "data", "golden_convnext.npz"))
    args = p.parse_args(argv)

    import_torchvision()  # before timm, which imports it
    import timm
    import torch

    torch.manual_seed(0)  # only the (overwritten) default init draws from it
    ref = load_reference(args.ref_path)
    arrays: dict[str, np.ndarray] = {}
    meta = {
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "weight_seed": WEIGHT_SEED,
        "input_seed": INPUT_SEED,
        "input_shape_nchw": list(INPUT_SHAPE),
        "variants": {},
    }
    models = {}
    for name, cfg in VARIANTS.items():
        variant_arrays, meta["variants"][name], models[name] = record_variant(ref, name, cfg)
        arrays.update(variant_arrays)
        worst = max(meta["variants"][name]["float32_noise"].values())
        print(f"{name}: {len(variant_arrays)} arrays; worst float32 noise {worst:.2e}")
    expected = [arrays[f"atto/eval/{i}"] for i in range(3)]
    meta["classifier_keys"] = check_checkpoint_layouts(models["atto"], expected)
    with open(os.path.join(args.ref_path, YML), encoding="utf-8") as f:
        meta["nanodet_yml"] = yaml.safe_load(f)
    arrays["meta"] = np.asarray(json.dumps(meta, sort_keys=True))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: {os.path.getsize(args.out) / 2**10:.1f} KiB")


if __name__ == "__main__":
    main()
