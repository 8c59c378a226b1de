"""Our model and training step against the recorded PyTorch goldens in ``tests/data``.

Shared by the tests (``tests/models/test_golden_parity.py``,
``tests/losses/test_assigner_losses.py``) and the accelerator check
(``benchmarks/accelerator.py``), which runs the same comparisons on a GPU. No torch
needed: the weights are rebuilt from the recorded seeds (``random_state_dict``).

Every comparison runs under ``jax.default_matmul_precision("highest")`` (:data:`PRECISION`).

* :func:`parity_report` (``golden_model.npz``, ``tools/make_golden.py``): every recorded
  tensor of one variant and mode; the metric and tolerances are described in
  ``tests/models/test_golden_parity.py``.
* :func:`train_step_outputs` / :func:`train_step_report` (``golden_train.npz``,
  ``tools/make_golden_train.py``): loss terms, assignment and named gradients of our
  model on the fixture batch, per AGM phase.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanodet_jax.box_ops import center_priors
from nanodet_jax.config.loading import load_config
from nanodet_jax.models import build_model
from nanodet_jax.models.detectors.nanodet_plus import assign_from_aux, nanodet_plus_loss
from nanodet_jax.testing import array_digest, normal_input, random_state_dict
from nanodet_jax.weights.pytorch import load_torch_weights, model_variables, to_torch_layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_GOLDEN = os.path.join(REPO, "tests", "data", "golden_model.npz")
TRAIN_GOLDEN = os.path.join(REPO, "tests", "data", "golden_train.npz")
VARIANTS = ("m", "small")  # as recorded by tools/make_golden.py
MODES = ("eval", "train")
MAX_REL = 1e-5  # max|ours - ref| / max|ref|, unless the reference's own noise is larger:
NOISE_FACTOR = 10.0  # tol = max(MAX_REL, NOISE_FACTOR * float32 noise of the reference)
RTOL = 1e-4  # elementwise: |ours - ref| <= RTOL * |ref| + tol * max|ref|
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
# Training step (golden_train.npz): loss terms to LOSS_REL, gradients to
# max(GRAD_REL, 10 * the float32 reference's own noise), both relative to max|ref|.
LOSS_REL, GRAD_REL = 1e-5, 1e-4
TRAIN_NUM_CLASSES, TRAIN_REG_MAX = 5, 7
# The tolerances are float32's: GPUs otherwise run float32 convolutions and dots in TF32
# (10-bit mantissa, ~1e-3 relative). XLA's CPU backend ignores the setting (always full
# float32), so on CPU it changes nothing but the programs' text.
PRECISION = "highest"

Row = tuple[str, float, float, bool]  # (tensor, rel error, tolerance, elementwise ok)


def load_golden(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, arrays) of a golden ``.npz``; FileNotFoundError names the script to run."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{os.path.relpath(path, REPO)} is absent (a committed fixture); it is written by "
            f"tools/make_golden{'_train' if 'train' in os.path.basename(path) else ''}.py"
        )
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    return json.loads(str(arrays.pop("meta"))), arrays


def torch_shape(value) -> tuple[int, ...]:
    s = tuple(value.shape)
    return (s[3], s[2], s[0], s[1]) if len(s) == 4 else s  # HWIO -> OIHW


def _weights(model, seed: int, digest: str, recorded: dict | None = None) -> dict:
    shapes = {k: torch_shape(v[...]) for k, v in model_variables(model).items()}
    if recorded is not None and shapes != recorded:
        only_ours = sorted(set(shapes) - set(recorded))
        only_ref = sorted(set(recorded) - set(shapes))
        wrong = sorted(k for k in set(shapes) & set(recorded) if shapes[k] != recorded[k])
        raise AssertionError(
            f"state_dict keys differ from the reference's: only ours {only_ours[:10]}, "
            f"only reference {only_ref[:10]}, shape differs {wrong[:10]}"
        )
    weights = random_state_dict(shapes, seed)
    assert array_digest(weights) == digest, (
        "random_state_dict no longer produces the weights the fixture was recorded with "
        "(numpy RNG stream or nanodet_jax.testing changed): re-record the fixture"
    )
    return weights


def _input(spec: dict) -> jax.Array:
    x = normal_input(spec["input_seed"], spec["input_shape_nchw"])
    assert array_digest({"input": x}) == spec["input_sha256"], "input RNG stream changed"
    return jnp.asarray(x.transpose(0, 2, 3, 1))


def build_variant(meta: dict, variant: str):
    """Our model with the variant's weights, its input (NHWC) and the recorded metadata."""
    spec = meta["variants"][variant]
    config = load_config(os.path.join(REPO, meta["config"]), spec["overrides"])
    model = build_model(config, with_aux=True)
    recorded = {k: tuple(s) for k, s in spec["torch_keys"].items()}
    weights = _weights(model, spec["weight_seed"], spec["weights_sha256"], recorded)
    load_torch_weights(model, weights)
    return model, _input(spec), spec


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

    with jax.default_matmul_precision(PRECISION):
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


def parity_report(meta, arrays, variant: str, mode: str) -> list[Row]:
    """One row per compared tensor, for one variant and mode."""
    model, x, spec = build_variant(meta, variant)
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


def failed(rows: list[Row]) -> list[str]:
    return [name for name, rel, t, ok in rows if not (rel <= t and ok)]


# ------------------------------------------------------------------ training step


def train_golden() -> tuple[dict, dict, object, jax.Array]:
    """(meta, arrays, config, priors) of ``golden_train.npz``."""
    meta, arrays = load_golden(TRAIN_GOLDEN)
    config = load_config(os.path.join(REPO, meta["config"]), meta["overrides"])
    priors = center_priors(tuple(meta["input_shape_nchw"][2:]), config.model.arch.head.strides)
    return meta, arrays, config, jnp.asarray(priors)


def ground_truth(arrays: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    return tuple(jnp.asarray(arrays[k]) for k in ("gt_boxes", "gt_labels", "gt_mask"))


def train_step_outputs(golden) -> dict[str, tuple[dict, object, dict]]:
    """Per phase: (loss terms + total, assignment, every parameter's gradient by name)."""
    meta, arrays, config, priors = golden
    model = build_model(config, with_aux=True)
    load_torch_weights(model, _weights(model, meta["weight_seed"], meta["weights_sha256"]))
    model.train()
    x = _input(meta)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss_cfg = config.model.arch.head.loss
    nc, reg_max = TRAIN_NUM_CLASSES, TRAIN_REG_MAX

    @jax.jit
    def step(params, rest, x, gt_boxes, gt_labels, gt_mask):
        def total_loss(params, detach):
            m = nnx.merge(graphdef, params, rest, copy=True)
            head_out, aux_out = m.forward_train(x, detach_aux=detach)
            total, terms = nanodet_plus_loss(
                head_out, aux_out, gt_boxes, gt_labels, gt_mask, priors, loss_cfg, nc, reg_max
            )
            targets = assign_from_aux(aux_out, gt_boxes, gt_labels, gt_mask, priors, nc, reg_max)
            return total, (terms, targets)

        out = {}
        for phase, detach in (("joint", False), ("detached", True)):
            (total, (terms, targets)), grads = jax.value_and_grad(total_loss, has_aux=True)(
                params, detach
            )
            named = model_variables(nnx.merge(graphdef, grads, rest, copy=True))
            # Every parameter's gradient (not only the recorded ones): the detach test
            # checks the whole network.
            grads = {k: v[...] for k, v in named.items() if isinstance(v, nnx.Param)}
            out[phase] = ({**terms, "total": total}, targets, grads)
        return out

    with jax.default_matmul_precision(PRECISION):
        return jax.device_get(step(params, rest, x, *ground_truth(arrays)))


def rel_to_max(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


def check_targets(ours, arrays: dict, score_atol: float = 1e-6) -> None:
    """The assignment per prior: gt index and label identical, targets to tolerance."""
    np.testing.assert_array_equal(np.asarray(ours.assigned_gt), arrays["assigned_gt"])
    np.testing.assert_array_equal(np.asarray(ours.labels), arrays["labels"])
    np.testing.assert_array_equal(np.asarray(ours.pos_mask), arrays["assigned_gt"] >= 0)
    np.testing.assert_allclose(ours.label_scores, arrays["label_scores"], rtol=0, atol=score_atol)
    np.testing.assert_allclose(ours.bbox_targets, arrays["bbox_targets"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours.dist_targets, arrays["dist_targets"], rtol=0, atol=1e-5)


def train_step_report(golden, outputs, phase: str) -> list[Row]:
    """One row per loss term and recorded gradient of ``phase``, plus the assignment."""
    meta, arrays, _, _ = golden
    assert meta["phases"][phase]["detach"] == (phase == "detached")
    losses, targets, grads = outputs[phase]
    rows: list[Row] = []
    # Our aux output is ~1e-5 (relative) away from the reference's (float32 rounding of
    # the forward pass), and the IoU targets inherit that; on identical inputs they
    # agree to 1e-6 (tests/losses/test_assigner_losses.py).
    try:
        check_targets(targets, arrays, score_atol=1e-5)
        rows.append(("assignment (identical gts/labels, targets 1e-5)", 0.0, 0.0, True))
    except AssertionError as e:
        rows.append((f"assignment: {str(e).strip().splitlines()[0]}", np.inf, 0.0, False))
    for k, v in losses.items():
        rows.append((f"loss/{k}", rel_to_max(v, arrays[f"{phase}/loss/{k}"]), LOSS_REL, True))
    noise = meta["float32_noise"][phase]
    for k in meta["grad_params"]:
        tol = max(GRAD_REL, NOISE_FACTOR * noise[f"grad/{k}"])
        rel = rel_to_max(to_torch_layout(np.asarray(grads[k])), arrays[f"{phase}/grad/{k}"])
        rows.append((f"grad/{k}", rel, tol, True))
    return rows
