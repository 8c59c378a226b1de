"""The detector protocol: an architecture defined in this file, registered from here, is
trained, evaluated, converted and exported by the package's generic machinery — nothing
in ``nanodet_jax`` names it."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanodet_jax.box_ops import center_priors, distance2bbox
from nanodet_jax.config.loading import load_config
from nanodet_jax.data.synthetic import CLASSES
from nanodet_jax.models import DETECTORS, build_model
from nanodet_jax.models.detectors.base import Detector
from nanodet_jax.models.layers import Conv2d, ConvModule
from nanodet_jax.registry import UnknownNameError
from nanodet_jax.training.loop import train_and_evaluate
from nanodet_jax.weights import checkpoint
from nanodet_jax.weights.pytorch import load_torch_weights, torch_state_dict
from tests.conftest import config_path

STRIDE = 16


class ToyDetector(Detector):
    """One level at stride 16: four stride-2 convs, then per cell ``num_classes``
    logits and 4 log-distances. Positives are the cells whose centre lies in a box."""

    CLASS_DEPENDENT = ("cls.",)
    NUM_CLASSES_FIELDS = ("model.arch.num_classes",)

    def __init__(self, num_classes: int, channels: int = 8, *, rngs: nnx.Rngs):
        self.num_classes = num_classes
        norm = {"type": "BN"}
        self.stem = nnx.List([
            ConvModule(3 if i == 0 else channels, channels, 3, 2, 1, norm_cfg=norm, rngs=rngs)
            for i in range(4)
        ])  # fmt: skip
        self.cls = Conv2d(channels, num_classes, 1, bias_init=-2.0, rngs=rngs)
        self.reg = Conv2d(channels, 4, 1, bias_init=0.0, rngs=rngs)

    def _features(self, images: jax.Array) -> jax.Array:
        x = images
        for layer in self.stem:
            x = layer(x)
        return x

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self._features(images)
        out = jnp.concatenate([self.cls(x), self.reg(x)], axis=-1)
        return out.reshape(out.shape[0], -1, out.shape[-1]).astype(jnp.float32)

    def decode(self, raw, input_hw):
        priors = jnp.asarray(center_priors(input_hw, (STRIDE,)))
        centres = priors[:, :2] + STRIDE / 2
        boxes = distance2bbox(centres, jnp.exp(raw[..., self.num_classes :]) * STRIDE, input_hw)
        return boxes, jax.nn.sigmoid(raw[..., : self.num_classes])

    def loss(self, images, targets, phase):
        raw = self(images)
        priors = jnp.asarray(center_priors(images.shape[1:3], (STRIDE,)))
        cx, cy = (
            (priors[:, 0] + STRIDE / 2)[None, :, None],
            (priors[:, 1] + STRIDE / 2)[None, :, None],
        )
        b = targets["gt_boxes"][:, None]  # [B, 1, M, 4]
        inside = (cx > b[..., 0]) & (cx < b[..., 2]) & (cy > b[..., 1]) & (cy < b[..., 3])
        inside &= targets["gt_mask"][:, None, :]
        pos = jnp.any(inside, -1)
        gt = jnp.argmax(inside, -1)  # [B, P]
        labels = jnp.take_along_axis(targets["gt_labels"], gt, 1)
        onehot = jax.nn.one_hot(jnp.where(pos, labels, -1), self.num_classes)
        logits = raw[..., : self.num_classes]
        cls = jnp.mean(optax_bce(logits, onehot))
        boxes, _ = self.decode(raw, images.shape[1:3])
        target_boxes = jnp.take_along_axis(targets["gt_boxes"], gt[..., None], 1)
        l1 = jnp.abs(boxes - target_boxes).sum(-1) / STRIDE
        box = jnp.sum(jnp.where(pos, l1, 0.0)) / jnp.maximum(jnp.sum(pos), 1)
        return cls + box, {"loss_cls": cls, "loss_box": box}

    def onnx_graph(self, graph, image):
        from nanodet_jax.deploy import onnx_graph

        x = image
        for layer in self.stem:
            x = graph.emit(x, layer)
        cls, reg = onnx_graph.conv(graph, x, self.cls), onnx_graph.conv(graph, x, self.reg)
        joined = onnx_graph.concat(graph, [onnx_graph.Value(graph.op("Sigmoid", [cls.name]),
                                                            cls.shape), reg])  # fmt: skip
        c, h, w = joined.shape
        flat = graph.op("Reshape", [joined.name, graph.const(np.array([1, c, h * w], np.int64))])
        return onnx_graph.Value(graph.op("Transpose", [flat], perm=[0, 2, 1]), (h * w, c))


def optax_bce(logits, targets):
    return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


@pytest.fixture
def toy_registered():
    with DETECTORS.registered("ToyDetector", ToyDetector):
        yield


def toy_config(shapes):
    config = load_config(config_path("quickstart.py"), [
        f"--config.data.train.img_dir={shapes}/train",
        f"--config.data.train.ann_file={shapes}/annotations/instances_train.json",
        f"--config.data.val.img_dir={shapes}/val",
        f"--config.data.val.ann_file={shapes}/annotations/instances_val.json",
        "--config.data.train.input_size=[64, 64]", "--config.data.val.input_size=[64, 64]",
        "--config.data.train.max_boxes_buckets=[16]",
        "--config.device.batch_size_per_device=4", "--config.device.workers=1",
        "--config.schedule.total_epochs=1", "--config.log.interval=1",
    ])  # fmt: skip
    config.class_names = list(CLASSES)
    config.model.arch = {"name": "ToyDetector", "num_classes": len(CLASSES), "channels": 8}
    config.data.synthetic = None
    return config


def test_unknown_architecture_lists_the_registered_ones():
    config = load_config(config_path("nanodet_plus_m.py"))
    config.model.arch.name = "NanoDetPluss"
    with pytest.raises(UnknownNameError, match=r"model.arch name 'NanoDetPluss'; available: .*"
                       r"NanoDetPlus"):  # fmt: skip
        build_model(config)


def test_toy_detector_trains_evaluates_converts_and_exports(shapes, tmp_path, toy_registered):
    config = toy_config(shapes)
    summary = train_and_evaluate(config, str(tmp_path / "run"), max_steps=2, progress_bar=False)
    assert summary["final_step"] == 2
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert all(np.isfinite(r["loss_cls"]) and np.isfinite(r["loss_box"]) for r in train)
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals and 0.0 <= evals[-1]["AP"] <= 1.0  # the generic COCO evaluation ran

    # The best checkpoint restores into a fresh toy model; PyTorch-format round trip.
    model = build_model(config)
    checkpoint.restore_weights(str(tmp_path / "run" / "best"), model)
    fresh = build_model(config, seed=1)
    report = load_torch_weights(fresh, {k: v.numpy() for k, v in torch_state_dict(model).items()})
    assert len(report.loaded) == len(torch_state_dict(model))
    x = jax.random.normal(jax.random.key(0), (1, 64, 64, 3))
    np.testing.assert_allclose(np.asarray(fresh(x)), np.asarray(model(x)), rtol=0, atol=1e-6)

    # ONNX: the generic exporter writes the toy's graph; onnxruntime agrees with JAX.
    pytest.importorskip("onnxruntime")
    from nanodet_jax.deploy.onnx_export import export_onnx, onnxruntime_session

    path = str(tmp_path / "toy.onnx")
    export_onnx(model, config, path)
    got = onnxruntime_session(path).run(None, {"data": np.asarray(x).transpose(0, 3, 1, 2)})[0]
    raw = np.asarray(model(x))
    want = np.concatenate([1 / (1 + np.exp(-raw[..., :3])), raw[..., 3:]], axis=-1)
    assert got.shape == want.shape == (1, 16, 7)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert os.path.getsize(path) > 0


def test_fine_tuning_message_names_the_detectors_class_fields(shapes, toy_registered):
    from nanodet_jax.data.datasets import build_dataset
    from nanodet_jax.training.loop import check_classes

    config = toy_config(shapes)
    config.model.arch.num_classes = 5
    dataset = build_dataset(config.data.train, config.class_names, role="train")
    with pytest.raises(SystemExit, match=r"--config.model.arch.num_classes=3 and"):
        check_classes(build_model(config), dataset)
