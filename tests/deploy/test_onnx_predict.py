"""tools/onnx_predict.py (NumPy + onnxruntime, no JAX) gives Predictor's detections."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnx", reason="needs onnx (pip install 'nanodet-jax[onnx]')")
pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'nanodet-jax[onnx]')")

import cv2  # noqa: E402

from nanodet_jax.cli import export as export_cli  # noqa: E402
from tests.conftest import REPO, config_path  # noqa: E402

SCRIPT = os.path.join(REPO, "tools", "onnx_predict.py")


def load_script():
    spec = importlib.util.spec_from_file_location("onnx_predict", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_imports_no_jax():
    code = "import sys; sys.path.insert(0, 'tools'); import onnx_predict; "
    code += "assert 'jax' not in sys.modules and 'nanodet_jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


@pytest.mark.parametrize("keep_ratio", [False, True])
def test_preprocess_is_predictors(keep_ratio):
    """The script's input and matrix equal Predictor's (warp, padding, normalisation);
    the real-weights test below covers keep_ratio=False only (NanoDet-Plus's configs)."""
    from nanodet_jax.data import transforms

    img = np.random.default_rng(0).integers(0, 256, (75, 130, 3), np.uint8)
    mean, std = [103.53, 116.28, 123.675], [57.375, 57.12, 58.395]
    meta = {"input_wh": [100, 90], "canvas_hw": [96, 128], "keep_ratio": keep_ratio,
            "mean": mean, "std": std}  # fmt: skip
    x, matrix = load_script().preprocess(img, meta)
    warped, want_matrix, _ = transforms.resize_for_inference(img, (100, 90), keep_ratio)
    canvas, valid = transforms.place_on_canvas(warped, (96, 128))
    want = transforms.normalize(canvas[None], mean, std, np.array([valid]))[0]
    np.testing.assert_array_equal(matrix, want_matrix)
    np.testing.assert_allclose(x.transpose(1, 2, 0), np.asarray(want), rtol=0, atol=1e-6)


def test_real_weights_match_predictor(shared_data, tmp_path, capsys):
    from nanodet_jax.cli.predict import load_predictor

    cfg = config_path("nanodet_plus_m.py")  # NanoDet-Plus-m 320
    weights = os.path.join(shared_data, "weights", "nanodet-plus-m_320.pth")
    path = str(tmp_path / "m320.onnx")
    # A dynamic batch axis: the script then runs all the photos in one batch.
    argv = ["--config", cfg, "--torch-weights", weights, "--out", path, "--dynamic-batch"]
    export_cli.main(argv)
    assert "m320.json" in capsys.readouterr().out
    script = load_script()
    meta = script.load_meta(path)
    assert meta["canvas_hw"] == [320, 320] and meta["class_names"][0] == "person"

    image_dir = os.path.join(shared_data, "images")
    names = sorted(os.listdir(image_dir))
    images = [cv2.imread(os.path.join(image_dir, n)) for n in names]
    sess = script.session(path)
    theirs = script.detect(sess, images, meta)
    # A file without a batch axis is run one image at a time: the same detections.
    for a, b in zip(script.detect(sess, images[:2], {**meta, "dynamic_batch": False}), theirs):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-4)
    ours = load_predictor(cfg, torch_weights=weights)(images)

    box_diff = score_diff = 0.0
    for name, (boxes, scores, labels), det in zip(names, theirs, ours):
        assert len(labels) == len(det), name
        np.testing.assert_array_equal(labels, det.labels, err_msg=name)
        if len(det):
            box_diff = max(box_diff, float(np.abs(boxes - det.boxes).max()))
            score_diff = max(score_diff, float(np.abs(scores - det.scores).max()))
    total = sum(len(d) for d in ours)
    print(f"{total} detections on {len(names)} photos: max |box diff| {box_diff:.2e} px, "
          f"max |score diff| {score_diff:.2e}")  # fmt: skip
    assert total >= 5 * len(names)  # threshold 0.05: every photo has many
    assert box_diff <= 1e-3
    assert score_diff <= 1e-4

    # The command line writes what nanodet-predict writes.
    out_dir = tmp_path / "preds"
    script.main([path, os.path.join(image_dir, "bus.jpg"), "--out-dir", str(out_dir)])
    [record] = json.loads((out_dir / "predictions.json").read_text())
    assert len(record["detections"]) == len(ours[names.index("bus.jpg")])
    assert cv2.imread(str(out_dir / "bus.jpg")).shape == images[names.index("bus.jpg")].shape


@pytest.mark.needs_torch
def test_legacy_nanodet_decode_matches_model(tmp_path, capsys):
    """Legacy NanoDet-m (ShuffleNetV2 + PAN + NanoDetHead; priors at cell centres, not
    corners) with random weights, exported through the CLI: the script's decode of the
    file's output is OneStageDetector.decode's (the NMS after it is NanoDet-Plus's, checked
    end to end above; random weights score too many boxes within float noise of each
    other for the kept set to be compared)."""
    import jax
    import jax.numpy as jnp
    import torch

    from nanodet_jax.config.loading import load_config
    from nanodet_jax.models import build_model
    from nanodet_jax.testing import random_state_dict
    from nanodet_jax.weights.pytorch import load_torch_weights, model_variables, to_torch_layout

    cfg = config_path(os.path.join("legacy", "nanodet_m.py"))
    model = build_model(load_config(cfg), with_aux=False)
    variables = model_variables(model).items()
    sd = random_state_dict({k: to_torch_layout(np.asarray(v[...])).shape for k, v in variables})
    weights = str(tmp_path / "legacy_m.pth")
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, weights)
    path = str(tmp_path / "legacy_m.onnx")
    export_cli.main(["--config", cfg, "--torch-weights", weights, "--out", path])
    assert "legacy_m.json" in capsys.readouterr().out
    script = load_script()
    meta = script.load_meta(path)
    assert meta["prior_offset"] == 0.5 and meta["strides"] == [8, 16, 32]

    img = np.random.default_rng(4).integers(0, 256, (240, 320, 3), np.uint8)
    x, _ = script.preprocess(img, meta)
    got = script.session(path).run(None, {"data": x[None]})[0][0]
    load_torch_weights(model, sd)
    model.eval()
    raw = model(jnp.asarray(x.transpose(1, 2, 0)[None]))
    # The file's output is the model's (sigmoid scores, raw DFL logits), as exported ...
    c = model.num_classes
    output = np.concatenate(
        [np.asarray(jax.nn.sigmoid(raw[0, :, :c])), np.asarray(raw[0, :, c:])], 1
    )
    assert np.abs(got - output).max() <= 1e-4 * np.abs(output).max()
    # ... and the script decodes it as the model does (the same output in both: these
    # random weights' logits, ~300, make ONNX and JAX scores differ by up to 1e-4).
    boxes, scores = script.decode(output, meta)
    want_boxes, want_scores = (
        np.asarray(a[0]) for a in model.decode(raw, tuple(meta["canvas_hw"]))
    )
    assert boxes.shape == want_boxes.shape == (2100, 4)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-6)
    np.testing.assert_allclose(boxes, want_boxes, rtol=0, atol=1e-4)
