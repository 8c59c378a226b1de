"""ResNet, MobileNetV2 and RepVGG against NanoDet's own classes (recorded goldens).

``tests/data/golden_backbones_1.npz`` is written by
``python tools/make_golden_backbones.py /path/to/RangiLyu/nanodet``. Each variant is rebuilt
here from the recorded constructor arguments, its state_dict keys (and their order) must
be the reference's, it gets the same ``random_state_dict`` weights (every BatchNorm affine
parameter and running statistic random) and input, and its outputs must match:

* eval mode, every output stage: ``max|ours - ref| / max|ref| <= 1e-5``;
* train mode (batch statistics), the last stage: ``<= max(1e-5, 10 x the float32
  reference's own error against float64)``. BatchNorm on the 2 x 2 x 2 values per channel
  of stride 32 amplifies rounding (MobileNetV2's own float32 error there is ~1e-4).

Both also hold elementwise: ``|ours - ref| <= 1e-4 |ref| + tol max|ref|``. For RepVGG the
deploy fusion must reproduce the weights NanoDet's ``repvgg_model_convert`` produced, and
the fused model the three-branch model's outputs.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanodet_jax.models.backbones import BACKBONES
from nanodet_jax.models.backbones.pretrained import load_pretrained_backbone
from nanodet_jax.models.backbones.repvgg import RepVGG, repvgg_det_model_convert
from nanodet_jax.models.backbones.resnet import Bottleneck, ResNet
from nanodet_jax.models.layers import Conv2d
from nanodet_jax.testing import array_digest, normal_input, random_state_dict
from nanodet_jax.weights.pytorch import (
    WeightMismatchError,
    load_torch_weights,
    model_variables,
    to_torch_layout,
)
from tests.conftest import REPO

GOLDEN = os.path.join(REPO, "tests", "data", "golden_backbones_1.npz")
VARIANTS = ("resnet18", "resnet50_short", "mobilenetv2", "repvgg_a0")
MAX_REL, NOISE_FACTOR, RTOL = 1e-5, 10.0, 1e-4


@pytest.fixture(scope="module")
def golden() -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(GOLDEN) as data:
        arrays = {k: data[k] for k in data.files}
    return json.loads(str(arrays.pop("meta"))), arrays


def build(meta: dict, variant: str, **extra) -> nnx.Module:
    spec = meta["variants"][variant]
    kwargs = {**spec["kwargs"], **extra}
    if spec["reference_class"] == "ResNetShort":
        # The fixture's shallow Bottleneck ResNet: NanoDet's class with its table overridden.
        layers = tuple(meta["short_bottleneck_layers"])
        cls = type("ResNetShort", (ResNet,), {"resnet_spec": {50: (Bottleneck, layers)}})
        return cls(**kwargs, rngs=nnx.Rngs(0))
    return BACKBONES.build({"name": spec["reference_class"], **kwargs}, rngs=nnx.Rngs(0))


def torch_shapes(model: nnx.Module) -> dict[str, list[int]]:
    return {
        k: list(to_torch_layout(np.asarray(v[...])).shape)
        for k, v in model_variables(model).items()
    }


def loaded(meta: dict, variant: str) -> tuple[nnx.Module, jnp.ndarray]:
    spec = meta["variants"][variant]
    model = build(meta, variant)
    weights = random_state_dict(
        {k: tuple(s) for k, s in torch_shapes(model).items()}, spec["weight_seed"]
    )
    assert array_digest(weights) == spec["weights_sha256"], "random_state_dict changed: re-record"
    load_torch_weights(model, weights)
    x = normal_input(spec["input_seed"], tuple(spec["input_shape_nchw"]))
    assert array_digest({"input": x}) == spec["input_sha256"], "input RNG stream changed"
    return model, jnp.asarray(x.transpose(0, 2, 3, 1))


def rel_error(ours, ref, tol: float) -> tuple[float, bool]:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"shape {ours.shape} != reference {ref.shape}"
    diff, scale = np.abs(ours - ref), float(np.abs(ref).max())
    return float(diff.max()) / scale, bool(np.all(diff <= RTOL * np.abs(ref) + tol * scale))


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_keys_are_nanodets(golden, variant):
    meta, _ = golden
    spec = meta["variants"][variant]
    ours = torch_shapes(build(meta, variant))
    assert [list(kv) for kv in ours.items()] == spec["torch_keys"]  # same keys, shapes, order
    if "deploy_torch_keys" in spec:
        deploy = torch_shapes(build(meta, variant, deploy=True))
        assert [list(kv) for kv in deploy.items()] == spec["deploy_torch_keys"]


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_outputs_match_nanodet(golden, variant, mode):
    meta, arrays = golden
    noise = meta["variants"][variant]["float32_noise"]
    model, x = loaded(meta, variant)
    getattr(model, mode)()
    outs = model(x)
    recorded = sorted(k for k in arrays if k.startswith(f"{variant}/{mode}/"))
    assert recorded, f"no {mode} outputs recorded for {variant}"
    if mode == "eval":
        assert len(recorded) == len(outs)
    for key in recorded:
        i = int(key.rsplit("/", 1)[1])
        tol = MAX_REL if mode == "eval" else max(MAX_REL, NOISE_FACTOR * noise[f"{mode}/{i}"])
        rel, elementwise = rel_error(outs[i], arrays[key], tol)
        assert rel <= tol and elementwise, f"{key}: rel {rel:.2e} > {tol:.2e} (or elementwise)"


def test_repvgg_fusion_reproduces_nanodets_conversion(golden):
    meta, arrays = golden
    spec = meta["variants"]["repvgg_a0"]
    model, x = loaded(meta, "repvgg_a0")
    model.eval()
    deploy = repvgg_det_model_convert(model, build(meta, "repvgg_a0", deploy=True))
    fused = {
        k: np.asarray(to_torch_layout(np.asarray(v[...])))
        for k, v in model_variables(deploy).items()
    }
    projections, biases = [], []
    for block in spec["fused_blocks"]:
        kernel = fused[f"{block}.rbr_reparam.weight"].astype(np.float64)
        r = normal_input(meta["proj_seed"], (kernel[0].size,)).astype(np.float64)
        projections.append(kernel.reshape(kernel.shape[0], -1) @ r)
        biases.append(fused[f"{block}.rbr_reparam.bias"])
        if f"repvgg_a0/fused/{block}" in arrays:
            np.testing.assert_allclose(
                fused[f"{block}.rbr_reparam.weight"],
                arrays[f"repvgg_a0/fused/{block}"],
                rtol=1e-6,
                atol=1e-7,
            )
    for name, ours in (("proj", projections), ("bias", biases)):
        ref = arrays[f"repvgg_a0/fused/{name}"]
        rel = np.abs(np.concatenate(ours) - ref).max() / np.abs(ref).max()
        assert rel <= 1e-6, f"fused {name}: rel {rel:.2e}"
    # The single-conv model computes what the three branches did (eval mode), and so
    # NanoDet's recorded outputs.
    train_outs, deploy_outs = model(x), deploy(x)
    for i, (a, b) in enumerate(zip(train_outs, deploy_outs)):
        rel, elementwise = rel_error(b, a, MAX_REL)
        assert rel <= MAX_REL and elementwise, f"deploy output {i}: rel {rel:.2e}"
        rel, _ = rel_error(b, arrays[f"repvgg_a0/eval/{i}"], MAX_REL)
        assert rel <= MAX_REL, f"deploy output {i} vs NanoDet: rel {rel:.2e}"


def test_det_model_convert_copies_the_rest_of_the_detector():
    class Det(nnx.Module):  # a backbone and a (neck-like) layer the conversion must copy
        def __init__(self, deploy: bool, seed: int):
            rngs = nnx.Rngs(seed)
            self.backbone = RepVGG("A0", (4,), deploy=deploy, last_channel=16, rngs=rngs)
            self.fpn = Conv2d(16, 8, 1, rngs=rngs)

    trained, deploy = Det(False, 0), Det(True, 1)
    trained.eval()
    repvgg_det_model_convert(trained, deploy)
    np.testing.assert_array_equal(deploy.fpn.weight[...], trained.fpn.weight[...])
    x = jnp.asarray(normal_input(5, (1, 32, 32, 3)))
    a, b = trained.backbone(x)[0], deploy.backbone(x)[0]
    assert float(jnp.abs(a - b).max()) <= 1e-5 * float(jnp.abs(a).max())


def test_random_init_is_nanodets():
    def convs(m):
        return [
            v for k, v in model_variables(m).items() if k.endswith("weight") and v[...].ndim == 4
        ]

    resnet = ResNet(18, rngs=nnx.Rngs(0))
    # kaiming_normal(fan_out): std sqrt(2 / (cout * kh * kw)); BatchNorm at (1, 0).
    # (a 64 -> 128 conv: fan_out is twice fan_in, so the mode shows)
    w = np.asarray(resnet.layer2[0].conv1.weight[...])
    assert abs(w.std() / np.sqrt(2.0 / (128 * 9)) - 1) < 0.02
    assert (
        float(resnet.bn1.weight[...].min()) == 1.0
        and float(jnp.abs(resnet.bn1.bias[...]).max()) == 0
    )
    mbv2 = BACKBONES.build({"name": "MobileNetV2"}, rngs=nnx.Rngs(0))
    stds = [float(np.asarray(v[...]).std()) for v in convs(mbv2)]
    assert max(abs(s / 1e-3 - 1) for s in stds) < 0.2  # N(0, 0.001); the smallest has 288 values
    # RepVGG keeps PyTorch's default conv init: U(+-1 / sqrt(fan_in)).
    repvgg = RepVGG("A0", rngs=nnx.Rngs(0))
    w = np.asarray(repvgg.stage3[1].rbr_dense[0].weight[...])
    bound = 1 / np.sqrt(192 * 9)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound


def test_imagenet_resnet_loads_as_nanodets_pretrain(golden, tmp_path, monkeypatch):
    """A torchvision-format ResNet-18 (``fc.*`` included) loads as NanoDet's strict=False
    load does: every backbone tensor from the file, the classifier left out, and then the
    outputs NanoDet gave on those tensors. ``pretrain=True`` names NanoDet's file."""
    meta, arrays = golden
    spec = meta["variants"]["resnet18"]
    state = random_state_dict({k: tuple(s) for k, s in spec["torch_keys"]}, spec["weight_seed"])
    state |= {"fc.weight": np.ones((1000, 512), np.float32), "fc.bias": np.zeros(1000, np.float32)}
    model = build(meta, "resnet18")
    report = load_pretrained_backbone(model, state)
    assert sorted(report.loaded) == sorted(model_variables(model))
    model.eval()
    for i, out in enumerate(model(loaded(meta, "resnet18")[1])):
        rel, _ = rel_error(out, arrays[f"resnet18/eval/{i}"], MAX_REL)
        assert rel <= MAX_REL, f"stage {i}: rel {rel:.2e}"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ResNet-18 .*resnet18-5c106cde.pth"):
        load_pretrained_backbone(model, True)
    with pytest.raises(WeightMismatchError, match="torchvision's ResNet-50 .*no key of this"):
        load_pretrained_backbone(build(meta, "resnet50_short"), {"x.weight": np.ones(3)})
    mbv2 = BACKBONES.build({"name": "MobileNetV2"}, rngs=nnx.Rngs(0))
    assert load_pretrained_backbone(mbv2, None) is None
    with pytest.raises(ValueError, match="no ImageNet weights for MobileNetV2"):
        load_pretrained_backbone(mbv2, True)
