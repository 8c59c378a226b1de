"""NanoDet's legacy necks (FPN, PAN, TAN) against golden outputs of the PyTorch reference.

``tests/data/golden_necks.npz`` is written by ``python tools/make_golden_necks.py REF_PATH``
(see there for the variants). Each variant's neck is built from the registry with the
recorded config, its state_dict keys and shapes must be NanoDet's, it gets the same
``random_state_dict`` weights and the same seeded input levels, and every output must
match in eval mode and in train mode (BatchNorm on batch statistics, dropout off), as
must the BatchNorm statistics after the training forward. Metric per tensor (as
``test_golden_parity.py``): ``max|ours - ref| / max|ref| <= tol`` and elementwise
``|ours - ref| <= 1e-4 |ref| + tol max|ref|``, ``tol = max(1e-5, 10 x`` the float32
reference's own error against float64``)``; the recorded noise is <= 3e-7 for every
tensor, so ``tol`` is 1e-5 throughout. ``F.interpolate`` (bilinear, by size and by scale
factor, odd sizes included) is checked on its own.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanodet_jax.models.necks import NECKS
from nanodet_jax.models.norm import LayerNorm
from nanodet_jax.models.resize import interpolate_bilinear
from nanodet_jax.testing import array_digest, normal_input, random_state_dict
from nanodet_jax.weights.pytorch import load_torch_weights, model_variables, to_torch_layout
from tests.conftest import REPO

GOLDEN = os.path.join(REPO, "tests", "data", "golden_necks.npz")
VARIANTS = ("fpn", "fpn_levels_gn", "pan", "pan_bn", "tan")
MAX_REL, NOISE_FACTOR, RTOL = 1e-5, 10.0, 1e-4


@pytest.fixture(scope="module")
def golden():
    if not os.path.isfile(GOLDEN):
        pytest.fail(
            "tests/data/golden_necks.npz is absent: run tools/make_golden_necks.py",
            pytrace=False,
        )
    with np.load(GOLDEN) as data:
        arrays = {k: data[k] for k in data.files}
    return json.loads(str(arrays.pop("meta"))), arrays


def check(ours, ref, tol: float, what: str) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != reference {ref.shape}"
    diff = np.abs(ours - ref)
    scale = float(np.abs(ref).max()) or 1.0
    rel = float(diff.max()) / scale
    assert rel <= tol, f"{what}: max relative error {rel:.2e} > {tol:.1e}"
    assert np.all(diff <= RTOL * np.abs(ref) + tol * scale), f"{what}: elementwise"
    return rel


def build_neck(meta: dict, variant: str) -> tuple[nnx.Module, list[jax.Array]]:
    """Our neck with the variant's weights, and its NHWC input levels."""
    spec = meta["variants"][variant]
    neck = NECKS.build(spec["cfg"], rngs=nnx.Rngs(0))
    shapes = {
        k: to_torch_layout(np.asarray(v[...])).shape for k, v in model_variables(neck).items()
    }
    recorded = {k: tuple(s) for k, s in spec["torch_keys"].items()}
    assert shapes == recorded, (
        f"state_dict keys or shapes differ: only ours {sorted(set(shapes) - set(recorded))}, "
        f"only the reference's {sorted(set(recorded) - set(shapes))}"
    )
    weights = random_state_dict(shapes, meta["weight_seed"])
    assert array_digest(weights) == spec["weights_sha256"], "random_state_dict changed"
    load_torch_weights(neck, weights)
    xs = [normal_input(meta["input_seed"] + i, s) for i, s in enumerate(spec["input_shapes_nchw"])]
    assert array_digest({str(i): x for i, x in enumerate(xs)}) == spec["inputs_sha256"]
    return neck, [jnp.asarray(x.transpose(0, 2, 3, 1)) for x in xs]


def run(neck: nnx.Module, xs: list[jax.Array], mode: str):
    """Outputs and the state after one jitted forward in ``mode`` (dropout always off)."""
    if mode == "train":
        neck.train()
        for _, m in nnx.iter_modules(neck):
            if isinstance(m, nnx.Dropout):
                m.deterministic = True  # as the reference records: masks are not reproducible
    else:
        neck.eval()
    graphdef, state = nnx.split(neck)

    @jax.jit
    def f(state, xs):
        m = nnx.merge(graphdef, state, copy=True)
        outs = m(xs)
        return outs, {k: v[...] for k, v in model_variables(m).items()}

    return jax.device_get(f(state, xs))


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_neck_matches_reference(golden, variant: str, mode: str) -> None:
    meta, arrays = golden
    noise = meta["variants"][variant]["float32_noise"]
    neck, xs = build_neck(meta, variant)
    outs, state = run(neck, xs, mode)
    expected = sorted(
        k for k in arrays if k.startswith(f"{variant}/{mode}/") and "/state/" not in k
    )
    assert len(outs) == len(expected), f"{len(outs)} outputs, reference {len(expected)}"
    for i, out in enumerate(outs):
        tol = max(MAX_REL, NOISE_FACTOR * noise[f"{mode}/{i}"])
        check(out, arrays[f"{variant}/{mode}/{i}"], tol, f"{variant}/{mode}/{i}")
    if mode == "train":
        prefix = f"{variant}/train/state/"
        stats = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
        for key, ref in stats.items():
            if key.endswith("num_batches_tracked"):
                assert int(state[key]) == int(ref), key
            else:
                tol = max(MAX_REL, NOISE_FACTOR * noise[f"train/state/{key}"])
                check(state[key], ref, tol, key)


def test_bilinear_resize_matches_torch(golden) -> None:
    meta, arrays = golden
    x = jnp.asarray(
        normal_input(meta["input_seed"], meta["resize_input_nchw"]).transpose(0, 2, 3, 1)
    )
    for name, size, scale in meta["resizes"]:
        out = interpolate_bilinear(
            x, size=None if size is None else tuple(size), scale_factor=scale
        )
        check(out, arrays[f"resize/{name}"], 1e-6, name)


def test_layer_norm_has_pytorchs_eps() -> None:
    # nn.LayerNorm's default eps (1e-5; NanoDet keeps it) only shows on low-variance
    # tokens: the golden's tokens have variance ~1, where 1e-6 would pass unnoticed.
    x = normal_input(5, (2, 6, 32)) * 1e-3
    mean = x.astype(np.float64).mean(-1, keepdims=True)
    var = np.square(x - mean).mean(-1, keepdims=True)
    check(LayerNorm(32)(jnp.asarray(x)), (x - mean) / np.sqrt(var + 1e-5), 1e-5, "LayerNorm")


def test_initialisation_is_nanodets() -> None:
    """Spread of every parameter at nanodet-m / nanodet-t widths, as NanoDet initialises."""
    levels = {"in_channels": [116, 232, 464]}
    pan = NECKS.build(
        {"name": "PAN", **levels, "out_channels": 96, "num_outs": 3}, rngs=nnx.Rngs(0)
    )
    for conv in pan.lateral_convs:  # xavier_uniform, zero bias
        w = np.asarray(conv.conv.weight[...])
        bound = np.sqrt(6.0 / (w.shape[2] + w.shape[3]))
        assert np.abs(w).max() <= bound and abs(w.std() / (bound / np.sqrt(3)) - 1) < 0.05
        assert not np.any(np.asarray(conv.conv.bias[...]))
    tan_cfg = {"name": "TAN", **levels, "out_channels": 128, "feature_hw": [20, 20]}
    tan_cfg.update(num_heads=8, num_encoders=1, mlp_ratio=4, dropout_ratio=0.1)
    variables = model_variables(NECKS.build(tan_cfg, rngs=nnx.Rngs(0)))
    for key, var in variables.items():
        v = np.asarray(var[...], np.float64)
        leaf = key.rsplit(".", 1)[-1]
        if key.endswith("conv.weight"):  # normal_init(m, 0.01): mean 0.01, std 1
            assert abs(v.std() - 1) < 0.05 and abs(v.mean() - 0.01) < 0.05, key
        elif leaf == "in_proj_weight":  # nn.MultiheadAttention's xavier_uniform
            bound = np.sqrt(6.0 / (v.shape[0] + v.shape[1]))
            assert np.abs(v).max() <= bound and abs(v.std() * np.sqrt(3) / bound - 1) < 0.05, key
        elif leaf == "pos_embed" or (leaf == "weight" and v.ndim == 2):  # trunc_normal 0.02
            assert abs(v.std() / 0.02 - 1) < 0.05 and abs(v.mean()) < 0.002, key
        elif leaf in ("running_var", "weight"):  # BatchNorm / LayerNorm identity
            assert np.all(v == 1), key
        else:  # biases, running means, batch counters
            assert not np.any(v), key


def test_unsupported_arguments_fail_clearly() -> None:
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="num_outs 2 < the 3 levels"):
        NECKS.build(
            {"name": "PAN", "in_channels": [8, 8, 8], "out_channels": 8, "num_outs": 2}, rngs=rngs
        )
    with pytest.raises(ValueError, match="end_level - start_level"):
        NECKS.build(
            {
                "name": "FPN",
                "in_channels": [8, 8, 8],
                "out_channels": 8,
                "num_outs": 3,
                "end_level": 2,
            },
            rngs=rngs,
        )
    tan = {
        "name": "TAN", "in_channels": [8, 8, 8], "out_channels": 8, "feature_hw": [2, 2],
        "num_heads": 2, "num_encoders": 1, "mlp_ratio": 2, "dropout_ratio": 0.0,
    }  # fmt: skip
    with pytest.raises(ValueError, match="exactly 3 input levels"):
        NECKS.build({**tan, "in_channels": [8, 8]}, rngs=rngs)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        NECKS.build({**tan, "num_heads": 3}, rngs=rngs)
    neck = NECKS.build(tan, rngs=rngs)
    levels = [jnp.zeros((1, s, s, 8)) for s in (8, 4, 2)]
    with pytest.raises(ValueError, match="position embedding was built for feature_hw"):
        neck(levels)
