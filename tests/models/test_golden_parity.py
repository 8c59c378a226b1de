"""Parity of our model with the PyTorch NanoDet reference, against recorded golden outputs.

``tests/data/golden_model.npz`` is written by ``python tools/make_golden.py REF_PATH``
(see that script). For each recorded variant this test rebuilds our model from the
same config and overrides, fills it with the same ``random_state_dict`` weights
(generated from OUR model's keys, in PyTorch layout; no torch needed), runs the same
input and compares every recorded tensor:

* eval mode: backbone, fpn, head, aux_fpn, aux_head outputs;
* train mode (BatchNorm on batch statistics, one forward): the same outputs and every
  BatchNorm's running_mean / running_var (PyTorch updates running_var with the
  *unbiased* batch variance) / num_batches_tracked.

Metric, per tensor: ``rel = max|ours - ref| / max|ref|`` must be <= ``tol`` and
elementwise ``|ours - ref| <= 1e-4 * |ref| + tol * max|ref|`` must hold, with
``tol = max(1e-5, 10 * noise)``. ``noise`` is the float32 reference's own error against
the same reference run in float64 (recorded by make_golden): about 1e-6 in eval mode,
so there ``tol = 1e-5``; in train mode BatchNorm normalises the coarsest levels over as
few as 2 x 1 x 2 = 4 values per channel, which amplifies float32 rounding (PyTorch's own
float32 head output is ~1e-4 away from its float64 one) and no float32 implementation
can meet 1e-5 there. ``num_batches_tracked`` must be equal. The public entry points are
checked too: ``model(x)`` against the eval head output, ``forward_train`` against both
modes' head and aux_head outputs (and, in train mode, its updated statistics).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanodet_jax.config.loading import load_config
from nanodet_jax.models import build_model
from nanodet_jax.testing import array_digest, normal_input, random_state_dict
from nanodet_jax.weights.pytorch import load_torch_weights, model_variables
from tests.conftest import REPO

GOLDEN = os.path.join(REPO, "tests", "data", "golden_model.npz")
VARIANTS = ("m", "small")  # as recorded by tools/make_golden.py
MODES = ("eval", "train")
MAX_REL = 1e-5  # max|ours - ref| / max|ref|, unless the reference's own noise is larger:
NOISE_FACTOR = 10.0  # tol = max(MAX_REL, NOISE_FACTOR * float32 noise of the reference)
RTOL = 1e-4  # elementwise: |ours - ref| <= RTOL * |ref| + tol * max|ref|
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module")
def golden():
    if not os.path.isfile(GOLDEN):
        pytest.fail(
            f"{os.path.relpath(GOLDEN, REPO)} is absent (a committed fixture); create it with "
            "`python tools/make_golden.py /path/to/RangiLyu/nanodet`",
            pytrace=False,
        )
    with np.load(GOLDEN) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays.pop("meta")))
    return meta, arrays


def _torch_shape(value) -> tuple[int, ...]:
    s = tuple(value.shape)
    return (s[3], s[2], s[0], s[1]) if len(s) == 4 else s  # HWIO -> OIHW


def _build(meta: dict, variant: str):
    """Our model with the variant's weights, its input (NHWC) and the recorded metadata."""
    spec = meta["variants"][variant]
    config = load_config(os.path.join(REPO, meta["config"]), spec["overrides"])
    model = build_model(config, with_aux=True)
    shapes = {k: _torch_shape(v[...]) for k, v in model_variables(model).items()}
    recorded = {k: tuple(s) for k, s in spec["torch_keys"].items()}
    if shapes != recorded:
        only_ours = sorted(set(shapes) - set(recorded))
        only_ref = sorted(set(recorded) - set(shapes))
        wrong = sorted(k for k in set(shapes) & set(recorded) if shapes[k] != recorded[k])
        pytest.fail(
            f"state_dict keys differ from the reference's: only ours {only_ours[:10]}, "
            f"only reference {only_ref[:10]}, shape differs {wrong[:10]}"
        )
    weights = random_state_dict(shapes, spec["weight_seed"])
    assert array_digest(weights) == spec["weights_sha256"], (
        "random_state_dict no longer produces the weights the fixture was recorded with "
        "(numpy RNG stream or nanodet_jax.testing changed): re-run tools/make_golden.py"
    )
    x = normal_input(spec["input_seed"], spec["input_shape_nchw"])
    assert array_digest({"input": x}) == spec["input_sha256"], "input RNG stream changed"
    load_torch_weights(model, weights)
    return model, jnp.asarray(x.transpose(0, 2, 3, 1)), spec


def _forward_all(m) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """All recorded tensors from one pass through every sub-module (as forward_train)."""

    def run(x):
        feats = m.backbone(x)
        fpn = m.fpn(feats)
        aux_fpn = m.aux_fpn(feats)
        out = {"head": m.head(fpn)}
        out["aux_head"] = m.aux_head(
            [jnp.concatenate([f, a], axis=-1) for f, a in zip(fpn, aux_fpn)]
        )
        for name, tensors in (("backbone", feats), ("fpn", fpn), ("aux_fpn", aux_fpn)):
            out.update({f"{name}/{i}": t for i, t in enumerate(tensors)})
        return out

    return run


def _bn_state(m) -> dict[str, jax.Array]:
    return {k: v[...] for k, v in model_variables(m).items() if k.rsplit(".", 1)[-1] in BN_STATS}


def _run(model, x, mode: str):
    """Jitted: recorded tensors + BN state via the sub-modules, and via the public API."""
    if mode == "train":
        model.train()
    else:
        model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, x):
        # copy=True: merge otherwise shares the Variables of ``state``, and the second
        # copy would see the BatchNorm statistics already updated by the first.
        m = nnx.merge(graphdef, state, copy=True)
        outs = _forward_all(m)(x)
        api = nnx.merge(graphdef, state, copy=True)
        head, aux_head = api.forward_train(x, detach_aux=False)
        api_outs = {"forward_train/head": head, "forward_train/aux_head": aux_head}
        if mode == "eval":
            api_outs["__call__/head"] = api(x)
        return outs, _bn_state(m), api_outs, _bn_state(api)

    return jax.device_get(f(state, x))


def _unpack_stats(spec: dict, arrays: dict, prefix: str, lengths: dict) -> dict:
    out, offsets = {}, dict.fromkeys(BN_STATS, 0)
    for layer in spec["bn_layers"]:
        for stat in BN_STATS:
            n = 1 if stat == "num_batches_tracked" else lengths[layer]
            flat = arrays[f"{prefix}/{stat}"]
            value = flat[offsets[stat] : offsets[stat] + n]
            out[f"{layer}.{stat}"] = value[0] if stat == "num_batches_tracked" else value
            offsets[stat] += n
    for stat in BN_STATS:
        assert offsets[stat] == arrays[f"{prefix}/{stat}"].size, f"{stat}: length mismatch"
    return out


def compare(ours, ref, tol: float = MAX_REL) -> tuple[float, bool]:
    """(max|ours - ref| / max|ref|, elementwise check with ``tol`` passed)."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"shape {ours.shape} != reference {ref.shape}"
    diff = np.abs(ours - ref)
    scale = float(np.abs(ref).max())
    rel = float(diff.max()) / scale if scale > 0 else float(diff.max())
    elementwise = bool(np.all(diff <= RTOL * np.abs(ref) + tol * scale))
    return rel, elementwise


Row = tuple[str, float, float, bool]  # (tensor, rel error, tolerance, elementwise ok)


def parity_report(meta, arrays, variant: str, mode: str) -> list[Row]:
    """One row per compared tensor, for one variant and mode."""
    model, x, spec = _build(meta, variant)
    noise = spec["float32_noise"]

    def tol(name: str) -> float:
        return max(MAX_REL, NOISE_FACTOR * noise[f"{mode}/{name}"])

    outs, bn, api_outs, api_bn = _run(model, x, mode)
    prefix = f"{variant}/{mode}"
    rows: list[Row] = []
    for name, value in outs.items():
        t = tol(name)
        rel, ok = compare(value, arrays[f"{prefix}/{name}"], t)
        rows.append((name, rel, t, ok))
    for name, value in api_outs.items():
        target = name.split("/")[1]
        t = tol(target)
        rel, ok = compare(value, arrays[f"{prefix}/{target}"], t)
        rows.append((name, rel, t, ok))
    if mode == "train":
        lengths = {layer: bn[f"{layer}.running_mean"].shape[0] for layer in spec["bn_layers"]}
        ref_bn = _unpack_stats(spec, arrays, f"{prefix}/state", lengths)
        assert set(ref_bn) == set(bn), "BatchNorm layers differ from the reference's"
        for tag, state in (("", bn), ("forward_train:", api_bn)):
            for stat in BN_STATS:
                keys = [k for k in ref_bn if k.endswith(stat)]
                if stat == "num_batches_tracked":
                    ok = all(int(state[k]) == int(ref_bn[k]) for k in keys)
                    rows.append(
                        (f"{tag}{stat} (all layers, exact)", 0.0 if ok else np.inf, 0.0, ok)
                    )
                    continue
                t = tol(f"state/{stat}")
                results = {k: compare(state[k], ref_bn[k], t) for k in keys}
                worst_key = max(keys, key=lambda k: results[k][0])
                ok = all(r[1] for r in results.values())
                rows.append(
                    (f"{tag}{stat} (worst layer: {worst_key})", results[worst_key][0], t, ok)
                )
    return rows


def format_rows(rows: list[Row]) -> str:
    return "\n".join(
        f"  {name:75s} rel={rel:.2e} tol={t:.1e} elementwise={'ok' if ok else 'FAIL'}"
        for name, rel, t, ok in rows
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_golden_parity(golden, variant: str, mode: str) -> None:
    meta, arrays = golden
    if variant not in meta["variants"]:
        pytest.fail(f"variant {variant!r} not in the fixture", pytrace=False)
    rows = parity_report(meta, arrays, variant, mode)
    bad = [name for name, rel, t, ok in rows if not (rel <= t and ok)]
    assert not bad, f"{variant}/{mode}: parity broken for {bad}\n{format_rows(rows)}"
