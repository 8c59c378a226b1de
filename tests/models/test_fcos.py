"""torchvision's FCOS against torchvision, on the fixture of ``tools/make_golden_fcos.py``
(a ResNet-18 body, 64-channel FPN with P6/P7, 20-class head, random weights with every
FrozenBatchNorm statistic randomised), without torch except where marked:

* C3-C5, P3-P7 and the head outputs at 64x96 and 128x128, relative to max|ref| within
  ``max(1e-5, 10 * noise)`` (noise: torchvision's float32 against its float64 self);
* ``decode`` + the shared NMS against ``FCOS.postprocess_detections``, on torchvision's
  own head outputs and end to end from the images;
* the ResNet-50 model of ``configs/fcos_r50_fpn.py``: its variables are the key names and
  shapes of torchvision's state_dict one to one (pretrained layout: FrozenBatchNorm2d;
  ``norm_layer="BN"``: ``fcos_resnet50_fpn(weights=None)``), and its trainable
  parameters are those torchvision leaves ``requires_grad``;
* export -> import of our weights is exact, and torchvision loads the export strictly.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from nanodet_jax.config.loading import load_config
from nanodet_jax.evaluation.postprocess import batched_multiclass_nms
from nanodet_jax.models import build_model
from nanodet_jax.models.detectors.fcos import level_grids
from nanodet_jax.testing import array_digest, normal_input, random_state_dict
from nanodet_jax.weights.pytorch import load_torch_weights, model_variables, to_torch_layout
from tests.conftest import REPO, config_path, skip_unless_ci

GOLDEN = os.path.join(REPO, "tests", "data", "golden_fcos.npz")
HEAD_KEYS = ("cls_logits", "bbox_regression", "bbox_ctrness")
NMS = {"score_thr": 0.2, "iou_thr": 0.6, "max_num": 100, "nms_pre": 5000}


@pytest.fixture(scope="module")
def golden():
    if not os.path.isfile(GOLDEN):
        pytest.fail("tests/data/golden_fcos.npz is absent: run tools/make_golden_fcos.py")
    with np.load(GOLDEN) as data:
        arrays = {k: data[k] for k in data.files}
    return json.loads(str(arrays.pop("meta"))), arrays


def fixture_arch(meta: dict) -> dict:
    """The golden's small torchvision FCOS (ResNet-18 body) as our arch config."""
    width = meta["fpn_channels"]
    return {
        "name": "FCOS",
        "backbone": {"name": "ResNet", "depth": 18, "out_stages": [2, 3, 4]},
        "fpn": {"name": "FeaturePyramidNetwork", "in_channels": [128, 256, 512]}
        | {"out_channels": width},
        "head": {"name": "FCOSHead", "in_channels": width, "num_classes": meta["num_classes"]},
    }


def _torch_shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: to_torch_layout(np.asarray(v[...])).shape for k, v in model_variables(model).items()}


@pytest.fixture(scope="module")
def small(golden):
    meta, _ = golden
    model = build_model(ml_collections.ConfigDict({"arch": fixture_arch(meta)}))
    weights = random_state_dict(_torch_shapes(model), meta["weight_seed"])
    weights["head.classification_head.cls_logits.bias"] -= np.float32(meta["cls_bias_shift"])
    # Same digest: the same keys, shapes and values as torchvision's state_dict.
    assert array_digest(weights) == meta["weights_sha256"], "state_dict differs from torchvision's"
    load_torch_weights(model, weights)
    return model


def _input(meta: dict, spec: dict, name: str) -> jax.Array:
    x = normal_input(spec["seed"], spec["shape"])
    assert array_digest({"input": x}) == meta["inputs_sha256"][name], "input RNG stream changed"
    return jnp.asarray(x.transpose(0, 2, 3, 1))


def _rel(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - ref).max() / max(np.abs(ref).max(), 1e-12))


@pytest.mark.parametrize("size", ["64x96", "128x128"])
def test_module_outputs(golden, small, size):
    meta, arrays = golden
    x = _input(meta, meta["module_inputs"][size], size)
    graphdef, state = nnx.split(small)

    @jax.jit
    def run(state, x):
        model = nnx.merge(graphdef, state)
        body, pyramid = model.features(x)
        head = model(x)
        # The pipeline's BGR images, reversed by the model (one compile for both).
        model.input_channel_order = "BGR"
        return body, pyramid, head, model(x[..., ::-1])

    body, pyramid, head, from_bgr = jax.device_get(run(state, x))
    for k in HEAD_KEYS:
        np.testing.assert_array_equal(from_bgr[k], head[k])
    ours = {f"body/{i}": v.transpose(0, 3, 1, 2) for i, v in enumerate(body)}
    ours.update({f"fpn/{i}": v.transpose(0, 3, 1, 2) for i, v in enumerate(pyramid)})
    ours.update({f"head/{k}": head[k] for k in HEAD_KEYS})
    assert len(ours) == 3 + 5 + 3
    for key, value in ours.items():
        ref = arrays[f"{size}/{key}"]
        assert value.shape == ref.shape, key
        tol = max(1e-5, 10 * meta["noise"][f"{size}/{key}"])
        assert _rel(value, ref) <= tol, (size, key, _rel(value, ref), tol)


@functools.cache
def _postprocess(model, hw):
    # decode reads only the model's static settings: one compiled program for both tests.
    return jax.jit(lambda raw: batched_multiclass_nms(*model.decode(raw, hw), **NMS))


def _detections(model, raw, hw):
    dets = jax.device_get(_postprocess(model, tuple(int(v) for v in hw))(raw))
    assert not dets.truncated.any()
    return dets


def _assert_detections(dets, arrays, box_atol: float, score_tol: float):
    for i in range(dets.boxes.shape[0]):
        n = int(dets.num_dets[i])
        labels = arrays[f"det/{i}/labels"]
        assert n == len(labels), (i, n, len(labels))
        np.testing.assert_array_equal(dets.labels[i, :n], labels)
        np.testing.assert_allclose(dets.scores[i, :n], arrays[f"det/{i}/scores"], atol=score_tol)
        np.testing.assert_allclose(dets.boxes[i, :n], arrays[f"det/{i}/boxes"], atol=box_atol)


def test_postprocess_on_torchvision_outputs(golden, small):
    """Our decode (per-level top-k, points, BoxLinearCoder, clipping) and NMS on
    torchvision's head outputs give its detections; the fixture has more than
    ``topk_candidates`` pairs above the threshold on P3 of both images."""
    meta, arrays = golden
    assert min(per_image[0] for per_image in meta["above_threshold_per_level"]) > 1000
    raw = {k: jnp.asarray(arrays[f"det/head/{k}"]) for k in HEAD_KEYS}
    hw = tuple(meta["det_input"]["shape"][2:])
    # The cap itself: what decode leaves to the NMS, per level (the 100 kept detections
    # alone would not show it, the pairs it removes are P3's weakest).
    _, scores = jax.jit(lambda r: small.decode(r, hw))(raw)
    ends = np.cumsum([h * w for h, w in level_grids(hw, 5)])
    for per_image, above in zip(np.asarray(scores), meta["above_threshold_per_level"]):
        kept = [int((level > 0).sum()) for level in np.split(per_image, ends[:-1])]
        assert kept == [min(a, small.topk_candidates) for a in above]
    dets = _detections(small, raw, hw)
    # Same inputs, the same float32 operations: boxes exact, scores to sigmoid rounding.
    _assert_detections(dets, arrays, box_atol=0.0, score_tol=1e-6)


def test_detections_end_to_end(golden, small):
    meta, arrays = golden
    x = _input(meta, meta["det_input"], "det")
    graphdef, state = nnx.split(small)
    raw = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))(state, x)
    dets = _detections(small, raw, x.shape[1:3])
    scale = max(float(np.abs(arrays[f"det/{i}/boxes"]).max()) for i in range(2))
    _assert_detections(dets, arrays, box_atol=1e-5 * scale, score_tol=1e-5)


def test_training_has_the_single_phase_train(small):
    # The objective itself: tests/models/test_fcos_loss.py.
    assert small.phase(0) == small.phase(25) == "train"
    with pytest.raises(ValueError, match="single phase 'train'"):
        small.loss(jnp.zeros((1, 64, 64, 3)), {}, "joint")


@pytest.fixture(scope="module")
def resnet50_config():
    return load_config(config_path("fcos_r50_fpn.py"))


@pytest.mark.parametrize("norm", ["frozen_bn", "bn"])
def test_resnet50_variables_are_torchvision_state_dict(golden, resnet50_config, norm):
    meta, _ = golden
    layout = meta["resnet50_layouts"][norm]
    overrides = {"frozen_bn": [], "bn": ["--config.model.arch.norm_layer=BN"]}[norm]
    config = load_config(config_path("fcos_r50_fpn.py"), overrides)
    if norm == "bn":  # fcos_resnet50_fpn(weights=None) trains every layer
        with config.unlocked():
            config.model.arch.trainable_backbone_layers = 5
    model = build_model(config)
    ours = [[k, list(s)] for k, s in _torch_shapes(model).items()]
    assert len(layout) > 250
    assert ours == layout  # names, shapes and order
    if norm == "frozen_bn":
        params = nnx.state(model, nnx.Param)
        trainable = [".".join(str(p) for p in path) for path, _ in nnx.to_flat_state(params)]
        assert sorted(trainable) == sorted(meta["resnet50_layouts"]["frozen_bn_trainable"])


def test_export_import_round_trip_is_exact(golden, small):
    meta, _ = golden
    exported = {k: to_torch_layout(np.asarray(v[...])) for k, v in model_variables(small).items()}
    other = build_model(ml_collections.ConfigDict({"arch": fixture_arch(meta)}), seed=1)
    load_torch_weights(other, exported)
    got = {k: np.asarray(v[...]) for k, v in model_variables(other).items()}
    for k, v in model_variables(small).items():
        np.testing.assert_array_equal(got[k], np.asarray(v[...]), err_msg=k)


@pytest.mark.needs_torch
def test_torchvision_loads_export_strictly(resnet50_config):
    """Our ResNet-50 export (FrozenBatchNorm layout, no num_batches_tracked) loads with
    ``strict=True`` into ``fcos_resnet50_fpn(weights=None, weights_backbone=None)``."""
    from nanodet_jax.weights.pytorch import torch_state_dict
    from tools import torchvision_cpu

    try:
        tv = torchvision_cpu.import_torchvision()
    except ImportError as e:
        skip_unless_ci(str(e), "the torchvision strict-loading test would be skipped")
    model = build_model(resnet50_config)
    shapes = _torch_shapes(model)
    load_torch_weights(model, random_state_dict(shapes, seed=5))
    sd = torch_state_dict(model)
    reference = tv.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None)
    result = reference.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    loaded = reference.state_dict()
    for k, v in sd.items():
        np.testing.assert_array_equal(loaded[k].numpy(), v.numpy(), err_msg=k)
