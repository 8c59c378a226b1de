"""NanoDet's TIMMWrapper over timm's ConvNeXt against golden outputs of the PyTorch reference.

``tests/data/golden_convnext.npz`` is written by ``python tools/make_golden_convnext.py
REF_PATH``: ``convnext_atto`` (1x1-conv MLPs) as NanoDet's yml configures convnext_nano,
and a reduced ``convnext_tiny`` (Linear MLPs, per-stage kernels, stage 3 left out, drop
path that eval ignores, ``ls_init_value: None`` meaning timm's default). Our backbone is
built from the registry with the recorded config; its state_dict keys (all of them, in
order) and shapes must be the wrapper's, it gets the same ``random_state_dict`` weights
(gamma and norms randomised), and every output stage must match to ``max|ours - ref| /
max|ref| <= 1e-5`` in eval mode and in train mode (the same: ConvNeXt has no BatchNorm).
"""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from nanodet_jax.models.backbones import BACKBONES
from nanodet_jax.models.backbones.pretrained import load_pretrained_for_training
from nanodet_jax.models.backbones.timm_convnext import (
    CONVNEXT_VARIANTS,
    ConvNeXtBlock,
    load_timm_checkpoint,
)
from nanodet_jax.testing import array_digest, normal_input, random_state_dict
from nanodet_jax.weights.pytorch import load_torch_weights, model_variables, to_torch_layout
from tests.conftest import REPO

GOLDEN = os.path.join(REPO, "tests", "data", "golden_convnext.npz")
MAX_REL = 1e-5


@pytest.fixture(scope="module")
def golden():
    if not os.path.isfile(GOLDEN):
        pytest.fail(
            "tests/data/golden_convnext.npz is absent: run tools/make_golden_convnext.py",
            pytrace=False,
        )
    with np.load(GOLDEN) as data:
        arrays = {k: data[k] for k in data.files}
    return json.loads(str(arrays.pop("meta"))), arrays


def torch_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    return {k: to_torch_layout(np.asarray(v[...])).shape for k, v in model_variables(model).items()}


def image(meta: dict) -> jax.Array:
    x = normal_input(meta["input_seed"], meta["input_shape_nchw"])
    return jnp.asarray(x.transpose(0, 2, 3, 1))


def forward(model: nnx.Module, x: jax.Array, mode: str) -> list[np.ndarray]:
    model.train() if mode == "train" else model.eval()
    graphdef, state = nnx.split(model)
    outs = jax.jit(lambda s, x: nnx.merge(graphdef, s, copy=True)(x))(state, x)
    return [np.asarray(o) for o in jax.device_get(outs)]


def max_rel(ours: np.ndarray, ref: np.ndarray, what: str) -> float:
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != reference {ref.shape}"
    rel = float(np.abs(ours.astype(np.float64) - ref).max() / np.abs(ref).max())
    assert rel <= MAX_REL, f"{what}: max relative error {rel:.2e} > {MAX_REL:.0e}"
    return rel


@pytest.mark.parametrize("variant", ["atto", "tiny_reduced"])
def test_backbone_matches_reference(golden, variant: str) -> None:
    meta, arrays = golden
    spec = meta["variants"][variant]
    model = BACKBONES.build(spec["cfg"], rngs=nnx.Rngs(0))
    shapes = torch_shapes(model)
    recorded = [(k, tuple(s)) for k, s in spec["torch_keys"]]
    assert list(shapes.items()) == recorded, (
        f"state_dict differs: only ours {sorted(set(shapes.items()) - set(recorded))}, "
        f"only the reference's {sorted(set(recorded) - set(shapes.items()))}"
    )
    weights = random_state_dict(shapes, meta["weight_seed"])
    assert array_digest(weights) == spec["weights_sha256"], "random_state_dict changed"
    load_torch_weights(model, weights)
    x = image(meta)
    for mode in spec["modes"]:
        outs = forward(model, x, mode)
        expected = sorted(k for k in arrays if k.startswith(f"{variant}/{mode}/"))
        assert len(outs) == len(expected)
        assert model.out_channels == [arrays[k].shape[-1] for k in expected]
        for i, out in enumerate(outs):
            max_rel(out, arrays[f"{variant}/{mode}/{i}"], f"{variant}/{mode}/{i}")


def _feature_state(meta: dict) -> dict[str, np.ndarray]:
    """The atto golden's weights as timm's feature net names them (``stem_0.weight``)."""
    shapes = {k: tuple(s) for k, s in meta["variants"]["atto"]["torch_keys"]}
    return {
        k.removeprefix("timm."): v
        for k, v in random_state_dict(shapes, meta["weight_seed"]).items()
    }


def test_checkpoint_path_loads_timm_state_dicts(golden, tmp_path) -> None:
    torch = pytest.importorskip("torch")
    meta, arrays = golden
    features = _feature_state(meta)
    # The whole classifier's layout (timm's released files): stem.0.*, stages.N.*, head.*,
    # under timm's checkpoint key and a DDP prefix.
    whole = {re.sub(r"^(stem|stages)_(\d+)\.", r"\1.\2.", k): v for k, v in features.items()}
    assert set(whole) | {k for k in meta["classifier_keys"] if k.startswith("head.")} == set(
        meta["classifier_keys"]
    )
    whole.update(
        {k: np.ones(3, np.float32) for k in meta["classifier_keys"] if k.startswith("head.")}
    )
    files = {
        "features.pth": {k: torch.from_numpy(v) for k, v in features.items()},
        "classifier.pth": {
            "state_dict_ema": {"module." + k: torch.from_numpy(v) for k, v in whole.items()}
        },
    }
    cfg = dict(meta["variants"]["atto"]["cfg"])
    x = image(meta)
    for name, content in files.items():
        path = str(tmp_path / name)
        torch.save(content, path)
        model = BACKBONES.build(cfg, rngs=nnx.Rngs(1))
        report = load_timm_checkpoint(model, path)
        assert len(report.loaded) == len(features)
        for i, out in enumerate(forward(model, x, "eval")):
            max_rel(out, arrays[f"atto/eval/{i}"], f"{name} output {i}")

    # Training's start point reads checkpoint_path (pretrained or not) into model.backbone.
    class Detector(nnx.Module):
        def __init__(self):
            self.backbone = BACKBONES.build(cfg, rngs=nnx.Rngs(2))

    config = ml_collections.ConfigDict({"init_from": "", "model": {"arch": {"backbone": {}}}})
    config.model.arch.backbone = {**cfg, "checkpoint_path": str(tmp_path / "features.pth")}
    detector = Detector()
    assert load_pretrained_for_training(detector, config, resuming=False) is not None
    for i, out in enumerate(forward(detector.backbone, x, "eval")):
        max_rel(out, arrays[f"atto/eval/{i}"], f"training start output {i}")


def test_pretrained_without_checkpoint_asks_for_a_file() -> None:
    cfg = {"name": "TIMMWrapper", "model_name": "convnext_nano", "pretrained": True}
    config = ml_collections.ConfigDict({"init_from": "", "model": {"arch": {"backbone": cfg}}})

    class Detector(nnx.Module):
        def __init__(self):
            self.backbone = BACKBONES.build({**cfg, "out_indices": [0]}, rngs=nnx.Rngs(0))

    detector = Detector()  # building reads no file: eval / export of the yml still work
    with pytest.raises(FileNotFoundError, match="checkpoint_path=/path/to/file"):
        load_pretrained_for_training(detector, config, resuming=False)
    config.model.arch.backbone.pretrained = False
    assert load_pretrained_for_training(detector, config, resuming=False) is None
    config.model.arch.backbone.pretrained = True
    config.init_from = "some.ckpt"  # every weight comes from there: nothing to ask for
    assert load_pretrained_for_training(detector, config, resuming=False) is None


def test_unsupported_settings_fail_clearly() -> None:
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="supported: convnext_atto, convnext_femto"):
        BACKBONES.build({"name": "TIMMWrapper", "model_name": "resnet18"}, rngs=rngs)
    base = {"name": "TIMMWrapper", "model_name": "convnext_atto"}
    for extra, message in (
        ({"features_only": False}, "features_only=True"),
        ({"out_indices": [1, 4]}, "subset of 0-3"),
        ({"output_stride": 16}, "output_stride must be 32"),
    ):
        with pytest.raises(ValueError, match=message):
            BACKBONES.build({**base, **extra}, rngs=rngs)


@pytest.mark.parametrize(
    "name, depths, dims, conv_mlp",
    [
        ("convnext_atto", (2, 2, 6, 2), (40, 80, 160, 320), True),
        ("convnext_femto", (2, 2, 6, 2), (48, 96, 192, 384), True),
        ("convnext_pico", (2, 2, 6, 2), (64, 128, 256, 512), True),
        ("convnext_nano", (2, 2, 8, 2), (80, 160, 320, 640), True),
        ("convnext_tiny", (3, 3, 9, 3), (96, 192, 384, 768), False),
    ],
)
def test_variants_are_timms(name: str, depths, dims, conv_mlp: bool) -> None:
    # timm's definitions (models/convnext.py register_model entries), copied by hand.
    v = CONVNEXT_VARIANTS[name]
    assert (v["depths"], v["dims"], v["conv_mlp"]) == (depths, dims, conv_mlp)


def test_drop_path_drops_whole_samples_in_training_only() -> None:
    rate = 0.5
    block = ConvNeXtBlock(8, 7, True, 1.0, 1e-6, rate, rngs=nnx.Rngs(0, dropout=3))
    x = jnp.asarray(normal_input(0, (16, 5, 5, 8)))
    block.eval()
    branch = np.asarray(block(x) - x)
    assert np.abs(branch).min() > 0
    block.train()
    outs = [np.asarray(block(x) - x) for _ in range(3)]
    dropped = 0
    for out in outs:
        for b in range(x.shape[0]):  # per sample: the whole branch, or all of it / keep
            if np.all(out[b] == 0):
                dropped += 1
            else:
                np.testing.assert_allclose(out[b], branch[b] / (1 - rate), rtol=1e-5, atol=1e-6)
    assert 0 < dropped < 3 * x.shape[0]
