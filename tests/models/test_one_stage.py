"""NanoDet's legacy OneStageDetector (GFLHead, NanoDetHead) against the reference, on the
fixture of ``tools/make_golden_legacy.py`` (ShuffleNetV2 0.5x + GhostPAN, 5 classes,
random weights with every norm affine and running statistic randomised, 3 x 64 x 64 with
an image without gts and a crowded one), without torch:

* eval output and GFLHead.get_bboxes' decoded boxes;
* one training step: the train-mode output, the ATSS gt and label of every cell, each
  loss term (on the reference's own output and end to end) and the gradient of the total
  loss for every parameter.

Tolerances, relative to max|ref|: outputs and loss terms ``max(1e-5, 10 * noise)``, where
noise is the float32 reference's distance from its float64 self (recorded). Gradients as
NanoDet-Plus's (tests/training/test_grad_precision.py): ``max|g - g64| / max|g64|`` of
ours in float32 at most ``max(2 x PyTorch float32's, GRAD_FLOOR)``, g64 NanoDet's float64
gradient (the golden samples every tensor, ``tools/grad_precision.py``).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from nanodet_jax.assigners.atss import assign, grid_cells
from nanodet_jax.models import build_model
from nanodet_jax.models.detectors.one_stage import one_stage_loss
from nanodet_jax.testing import array_digest, normal_input, random_state_dict
from nanodet_jax.weights.pytorch import load_torch_weights, model_variables, to_torch_layout
from tests.conftest import REPO
from tools.grad_precision import sampled_rows

GOLDEN = os.path.join(REPO, "tests", "data", "golden_legacy.npz")
VARIANTS = ("gfl", "nanodet_dw", "nanodet_conv")
GRAD_VARIANTS = ("gfl", "nanodet_dw")  # the fixture's gradients (each ~100 s to compile)
TERMS = ("loss_qfl", "loss_bbox", "loss_dfl")
GRAD_FLOOR = 1e-4


@pytest.fixture(scope="module")
def golden():
    if not os.path.isfile(GOLDEN):
        pytest.fail(
            "tests/data/golden_legacy.npz is absent: run tools/make_golden_legacy.py",
            pytrace=False,
        )
    with np.load(GOLDEN) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays.pop("meta")))
    x = normal_input(meta["input_seed"], meta["input_shape_nchw"])
    assert array_digest({"input": x}) == meta["input_sha256"], "input RNG stream changed"
    return meta, arrays, jnp.asarray(x.transpose(0, 2, 3, 1))


def _rel(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - ref).max() / max(np.abs(ref).max(), 1e-12))


def _torch_shape(value) -> tuple[int, ...]:
    s = tuple(value.shape)
    return (s[3], s[2], s[0], s[1]) if len(s) == 4 else s


def _build(spec: dict):
    model = build_model(ml_collections.ConfigDict({"arch": spec["arch"]}))
    shapes = {k: _torch_shape(v[...]) for k, v in model_variables(model).items()}
    weights = random_state_dict(shapes, spec["weight_seed"])
    # Same digest == same keys, shapes and values as the reference's state_dict.
    assert array_digest(weights) == spec["weights_sha256"], "state_dict differs from NanoDet's"
    load_torch_weights(model, weights)
    return model


def _targets(arrays):
    return {k: jnp.asarray(arrays[k]) for k in ("gt_boxes", "gt_labels", "gt_mask")}


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request, golden):
    """(name, meta, recorded arrays, eval output, model) of one variant."""
    meta, arrays, x = golden
    name = request.param
    spec = meta["variants"][name]
    model = _build(spec)
    model.eval()
    evaluated = jax.device_get(jax.jit(lambda m, v: m(v))(model, x))
    return name, spec, arrays, evaluated, model


@pytest.fixture(scope="module", params=GRAD_VARIANTS)
def train_step(request, golden):
    """(name, meta, arrays, (loss terms, train-mode output, named gradients))."""
    meta, arrays, x = golden
    name = request.param
    spec = meta["variants"][name]
    model = _build(spec)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def step(params, rest, x, targets):
        def total(params):
            m = nnx.merge(graphdef, params, rest, copy=True)
            loss, terms = m.loss(x, targets, "train")
            # The same forward again (XLA computes it once): the train-mode output.
            return loss, (terms, m(x))

        (loss, (terms, raw)), grads = jax.value_and_grad(total, has_aux=True)(params)
        named = model_variables(nnx.merge(graphdef, grads, rest, copy=True))
        return {**terms, "total": loss}, raw, {k: v[...] for k, v in named.items()}

    return name, spec, arrays, jax.device_get(step(params, rest, x, _targets(arrays)))


def _tol(spec, key: str, floor: float) -> float:
    return max(floor, 10 * spec["noise"][key])


def test_eval_output_and_decode(variant):
    name, spec, arrays, evaluated, model = variant
    rel = _rel(evaluated, arrays[f"{name}/eval"])
    assert rel <= _tol(spec, "eval", 1e-5), (name, rel)
    boxes, scores = model.decode(jnp.asarray(arrays[f"{name}/eval"]), (64, 64))
    assert _rel(boxes, arrays[f"{name}/decoded_boxes"]) <= 1e-6
    np.testing.assert_allclose(scores, jax.nn.sigmoid(arrays[f"{name}/eval"][..., :5]), rtol=1e-6)


def test_training_step(train_step):
    name, spec, arrays, (losses, raw, grads) = train_step
    prefix = f"{name}/train"
    assert _rel(raw, arrays[f"{prefix}/out"]) <= _tol(spec, "train/out", 1e-5)
    for term in (*TERMS, "total"):
        rel = _rel(losses[term], arrays[f"{prefix}/loss/{term}"])
        assert rel <= _tol(spec, f"loss/{term}", 1e-5), (name, term, rel)
    ours = {k: to_torch_layout(np.asarray(v)) for k, v in grads.items()}
    rows, _ = sampled_rows(ours, arrays, f"{prefix}/grad64", GRAD_FLOOR)
    misses = [f"{k}: ours {d:.2e}, PyTorch float32 {t:.2e}" for r, d, t, k in rows if r > 1]
    # Left out: float64 gradients of 0 (BN biases before a BN, NanoDetHead's unused gfl_reg).
    assert len(rows) > 0.8 * len(arrays[f"{prefix}/grad64/names"])
    assert not misses, (name, len(misses), misses[:10])


def test_assignment_and_loss_on_reference_output(variant):
    """The objective alone: our ATSS and losses on the reference's own train output."""
    name, spec, arrays, _, model = variant
    cells, counts = grid_cells((64, 64), model.strides, model.head.octave_base_scale)
    t = _targets(arrays)
    out = assign(cells, counts, t["gt_boxes"], t["gt_labels"], t["gt_mask"], 5, 9)
    np.testing.assert_array_equal(np.asarray(out.assigned_gt), arrays[f"{name}/train/assigned_gt"])
    np.testing.assert_array_equal(np.asarray(out.labels), arrays[f"{name}/train/labels"])
    assert not np.any(np.asarray(out.pos_mask)[1])  # the image without gts
    total, terms = one_stage_loss(
        jnp.asarray(arrays[f"{name}/train/out"]), t, (64, 64), model.strides,
        model.head.octave_base_scale, model.loss_cfg, 5, model.reg_max,
    )  # fmt: skip
    for term in TERMS:
        assert _rel(terms[term], arrays[f"{name}/train/loss/{term}"]) <= 1e-5, term


def test_batch_without_positives_gives_zero_loss(golden):
    meta, arrays, _ = golden
    raw = jnp.asarray(arrays["gfl/train/out"])
    empty = {k: jnp.zeros_like(v) for k, v in _targets(arrays).items()}
    spec = meta["variants"]["gfl"]
    loss_cfg = spec["arch"]["head"]["loss"]

    def loss(r):
        return one_stage_loss(r, empty, (64, 64), (8, 16, 32), 4.0, loss_cfg, 5, 7)[0]

    value, grad = jax.value_and_grad(loss)(raw)
    assert float(value) == 0.0  # NanoDet returns constant zeros without positives
    assert np.all(np.asarray(grad) == 0)
