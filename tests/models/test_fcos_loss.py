"""FCOS's training objective against torchvision's ``FCOS.compute_loss``, on the fixture
of ``tools/make_golden_fcos_loss.py`` (the small FCOS of ``tools/make_golden_fcos.py`` in
train mode, 3 x 64 x 96: several boxes incl. two far larger than the image, no boxes, a
crowded image with an exact and a float32 area tie), without torch:

* the matched gt of every anchor (torchvision's ``matched_idxs``), exactly;
* the three loss terms on torchvision's own head outputs, and end to end from the
  images in one jitted step, with the gradient of the total for every trainable
  parameter;
* a batch without boxes, and the frozen layers (no gradient: they are buffers).

Tolerances, relative to max|ref|: terms ``max(1e-5, 10 * noise)``, where noise is
torchvision's float32 against its float64 self (recorded, on the same matching).
Gradients as NanoDet-Plus's (tests/training/test_grad_precision.py): ``max|g - g64| /
max|g64|`` of ours in float32 at most ``max(3 x torchvision float32's, GRAD_FLOOR)``
(``tools/grad_precision.TORCH_FACTOR``), g64
torchvision's float64 gradient (the golden samples every tensor, tools/grad_precision.py).
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

from nanodet_jax.assigners.fcos import assign
from nanodet_jax.models import build_model
from nanodet_jax.models.detectors.fcos import anchors, fcos_loss
from nanodet_jax.testing import array_digest, normal_input, random_state_dict
from nanodet_jax.weights.pytorch import load_torch_weights, model_variables, to_torch_layout
from tests.conftest import REPO
from tests.models.test_fcos import fixture_arch
from tools.grad_precision import sampled_rows

GOLDEN = os.path.join(REPO, "tests", "data", "golden_fcos_loss.npz")
MODEL_GOLDEN = os.path.join(REPO, "tests", "data", "golden_fcos.npz")
TERMS = ("classification", "bbox_regression", "bbox_ctrness")
HEAD_KEYS = ("cls_logits", "bbox_regression", "bbox_ctrness")
HW = (64, 96)
SIZES = (8.0, 16.0, 32.0, 64.0, 128.0)
GRAD_FLOOR = 1e-4


def _load(path: str) -> tuple[dict, dict]:
    if not os.path.isfile(path):
        pytest.fail(f"{path} is absent: run its tools/make_golden_fcos*.py", pytrace=False)
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    return json.loads(str(arrays.pop("meta"))), arrays


@pytest.fixture(scope="module")
def golden():
    meta, arrays = _load(GOLDEN)
    targets = {k: jnp.asarray(arrays[k]) for k in ("gt_boxes", "gt_labels", "gt_mask")}
    return meta, arrays, targets


def _rel(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - ref).max() / max(np.abs(ref).max(), 1e-12))


def _matched(targets) -> np.ndarray:
    points, sizes, ranges = anchors(HW, SIZES)
    return np.asarray(assign(points, sizes, ranges, targets["gt_boxes"], targets["gt_mask"]))


def test_matching(golden):
    meta, arrays, targets = golden
    ours = _matched(targets)
    np.testing.assert_array_equal(ours, arrays["matched"])
    assert [int((m >= 0).sum()) for m in ours] == meta["positives"]
    assert not np.any(ours[1] >= 0)  # the image without boxes
    # Image 0 reaches P4, P6 and P7 (the last level's open upper bound); P3 has 96 points.
    levels = np.repeat(np.arange(5), [96, 24, 6, 2, 1])
    assert set(levels[ours[0] >= 0]) == {0, 1, 3, 4}
    # Image 2: the exact tie (gts 0, 1) and the float32 tie (gts 2, 3) go to the lower index.
    assert (ours[2] == 0).any() and not (ours[2] == 1).any()
    assert (ours[2] == 2).any()


def test_float32_area_tie_takes_the_lower_index():
    points, sizes, ranges = anchors(HW, SIZES)
    small = [30.0, 14.0, 70.0, 39.0]  # area 1000
    large = [10.0, 20.0, 87.0, 33.0]  # area 1001: 1e8 - area rounds to the same float32
    boxes = jnp.asarray([[large, small], [small, large]])
    out = np.asarray(assign(points, sizes, ranges, boxes, jnp.ones((2, 2), bool)))
    # The anchors each box matches alone; where both do, the first listed wins, whichever
    # is the smaller (an exact argmin of the areas would give the 1000 box every time).
    alone = np.asarray(assign(points, sizes, ranges, boxes[0, :, None], jnp.ones((2, 1), bool)))
    both = (alone[0] == 0) & (alone[1] == 0)
    assert both.sum() >= 3
    assert np.all(out[0][both] == 0) and np.all(out[1][both] == 0)


def test_loss_on_reference_outputs(golden):
    meta, arrays, targets = golden
    raw = {k: jnp.asarray(arrays[f"head/{k}"]) for k in HEAD_KEYS}
    total, terms = jax.jit(lambda r, t: fcos_loss(r, t, HW, SIZES))(raw, targets)
    for k in TERMS:
        rel = _rel(terms[k], arrays[f"loss/{k}"])
        assert rel <= max(1e-5, 10 * meta["noise"][f"loss/{k}"]), (k, rel)
    assert _rel(total, sum(arrays[f"loss/{k}"] for k in TERMS)) <= 1e-5


def test_batch_without_boxes(golden):
    _, arrays, targets = golden
    raw = {k: jnp.asarray(arrays[f"head/{k}"]) for k in HEAD_KEYS}
    empty = {k: jnp.zeros_like(v) for k, v in targets.items()}

    def loss(r):
        return fcos_loss(r, empty, HW, SIZES)

    (total, terms), grads = jax.value_and_grad(loss, has_aux=True)(raw)
    assert float(terms["bbox_regression"]) == 0.0 and float(terms["bbox_ctrness"]) == 0.0
    assert np.isfinite(float(total)) and float(terms["classification"]) > 0
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads.values())
    assert not np.any(np.asarray(grads["bbox_regression"]))


def test_label_map_routes_dataset_labels_to_logits(golden):
    """``label_map[label]`` is the logit a label trains (the COCO config: category ids)."""
    _, arrays, targets = golden
    raw = {k: jnp.asarray(arrays[f"head/{k}"]) for k in HEAD_KEYS}
    table = np.arange(20)[::-1]
    mapped = dict(targets, gt_labels=jnp.asarray(table)[targets["gt_labels"]])
    _, via_map = fcos_loss(raw, targets, HW, SIZES, label_map=tuple(table))
    _, direct = fcos_loss(raw, mapped, HW, SIZES)
    _, unmapped = fcos_loss(raw, targets, HW, SIZES)
    assert float(via_map["classification"]) == float(direct["classification"])
    assert float(via_map["classification"]) != float(unmapped["classification"])


def test_label_map_sets_the_dataset_class_count(golden):
    from types import SimpleNamespace

    from nanodet_jax.training.loop import check_classes

    arch = fixture_arch(_load(MODEL_GOLDEN)[0]) | {"label_map": [3, 5, 7]}
    model = build_model(ml_collections.ConfigDict({"arch": arch}))
    assert model.num_classes == 20 and model.num_label_classes == 3
    check_classes(model, SimpleNamespace(class_names=["a", "b", "c"], ann_file="x.json"))
    with pytest.raises(SystemExit, match="trains on 3"):
        check_classes(model, SimpleNamespace(class_names=list("abcdefghij" * 2), ann_file="x"))


def _model():
    meta, _ = _load(MODEL_GOLDEN)
    model = build_model(ml_collections.ConfigDict({"arch": fixture_arch(meta)}))
    shapes = {
        k: to_torch_layout(np.asarray(v[...])).shape for k, v in model_variables(model).items()
    }
    weights = random_state_dict(shapes, meta["weight_seed"])
    weights["head.classification_head.cls_logits.bias"] -= np.float32(meta["cls_bias_shift"])
    assert array_digest(weights) == meta["weights_sha256"], "state_dict differs from torchvision's"
    load_torch_weights(model, weights)
    return model


def test_training_step(golden):
    meta, arrays, targets = golden
    x = normal_input(meta["input"]["seed"], meta["input"]["shape"])
    assert array_digest({"input": x}) == meta["input_sha256"], "input RNG stream changed"
    model = _model()
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def step(params, rest, x, targets):
        def total(params):
            return nnx.merge(graphdef, params, rest, copy=True).loss(x, targets, "train")

        (loss, terms), grads = jax.value_and_grad(total, has_aux=True)(params)
        named = model_variables(nnx.merge(graphdef, grads, rest, copy=True))
        return loss, terms, {k: v[...] for k, v in named.items()}

    loss, terms, grads = jax.device_get(
        step(params, rest, jnp.asarray(x.transpose(0, 2, 3, 1)), targets)
    )
    for k in TERMS:
        rel = _rel(terms[k], arrays[f"loss/{k}"])
        assert rel <= max(1e-5, 10 * meta["noise"][f"loss/{k}"]), (k, rel)
    ours = {k: to_torch_layout(np.asarray(v)) for k, v in grads.items()}
    rows, zero = sampled_rows(ours, arrays, "grad64", GRAD_FLOOR)
    misses = [f"{k}: ours {d:.2e}, torchvision float32 {t:.2e}" for r, d, t, k in rows if r > 1]
    assert zero == 0 and not misses, (len(misses), misses[:10])
    # trainable_backbone_layers=3 with FrozenBN: conv1, layer1 and every norm of the body
    # are buffers, so the trainer (which optimises nnx.Param only) never updates them.
    trainable = {k for k, v in model_variables(model).items() if isinstance(v, nnx.Param)}
    body = {k for k in trainable if k.startswith("backbone.body.")}
    assert "backbone.body.layer2.0.conv1.weight" in body
    assert trainable == set(arrays["grad64/names"])  # the golden's: torchvision's trainable
    assert not any(k.startswith(("backbone.body.conv1", "backbone.body.layer1.")) for k in body)
    assert not any(".bn" in k or "downsample.1" in k for k in body)
