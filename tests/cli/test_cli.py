"""The README's command lines through their public entry points, run in process with
``main(argv)``: predict on a folder, convert both ways (``--wrap``, ``--no-ema`` on a
Lightning .ckpt), export_onnx from a checkpoint, tfds_export of two splits, boxes back in
original pixels with ``keep_ratio=True`` (predict and eval), eval's ``nms_pre`` report.

Every model here is the small one with random weights at a 128x96 input."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import jax.numpy as jnp
import numpy as np
import pytest

from nanodet_jax.cli import convert as convert_cli
from nanodet_jax.cli import eval as eval_cli
from nanodet_jax.cli import export as export_cli
from nanodet_jax.cli import predict
from nanodet_jax.config.loading import load_config
from nanodet_jax.data.datasets import build_dataset
from nanodet_jax.evaluation.predictor import Detections, Predictor, PreparedImage
from nanodet_jax.models import build_model
from nanodet_jax.models.detectors.nanodet_plus import NanoDetPlus
from nanodet_jax.testing import SMALL_MODEL_OVERRIDES
from nanodet_jax.weights import checkpoint
from nanodet_jax.weights import pytorch as convert
from tests.conftest import config_path
from tests.weights.test_convert import random_weights

CONFIG = config_path("nanodet_plus_m.py")
INPUT_WH = (128, 96)  # a non-square network input: canvas 96x128, 256 priors
SMALL = (*SMALL_MODEL_OVERRIDES, f"--config.data.val.input_size={list(INPUT_WH)}")
KEEP_RATIO = (*SMALL, "--config.data.val.keep_ratio=true")
CLASS_NAMES = ["a", "b", "c", "d", "e"]
SHIFT = 1000.0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """An orbax checkpoint of the small model (aux branch included) with random weights."""
    config = load_config(CONFIG, SMALL)
    model = build_model(config, seed=0)
    convert.load_torch_weights(model, random_weights(model, seed=11))
    # As in test_export_onnx: bring the logits from ~600 to a real model's range (ONNX then
    # agrees to 1e-4 in float32); a low class bias, as a trained model's, keeps 15-45
    # detections per image rather than max_per_img near-ties.
    for gfl in model.head.gfl_cls:
        gfl.weight[...] = gfl.weight[...] * 0.02
        bias = np.array(gfl.bias[...]) * 0.02
        bias[: model.num_classes] -= 7.0
        gfl.bias[...] = jnp.asarray(bias)
    path = tmp_path_factory.mktemp("ckpt") / "small"
    checkpoint.save_weights(path, model, config)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A folder of three non-square images (png, jpg, bmp) and a file that is no image.

    ``wide.png`` (256x96) is ``small`` (128x48) upsampled 2x by pixel repetition: its
    keep_ratio letterbox (ratio 0.5, no offset) is ``small`` on a zero canvas, exactly.
    The others scale by 57/90 and 55/75, centred with 0.67 and 0.33 px offsets."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(4)
    small = rng.integers(0, 256, (48, 128, 3), np.uint8)
    cv2.imwrite(str(folder / "wide.png"), small.repeat(2, 0).repeat(2, 1))
    cv2.imwrite(str(folder / "flat.jpg"), rng.integers(0, 256, (90, 200, 3), np.uint8))
    cv2.imwrite(str(folder / "tall.bmp"), rng.integers(0, 256, (130, 75, 3), np.uint8))
    np.save(folder / "small.npy", small)  # not an image extension: ignored by predict
    (folder / "notes.txt").write_text("not an image")
    return folder


IMAGE_NAMES = ["flat.jpg", "tall.bmp", "wide.png"]  # predict's order: sorted


def canvas_detections(predictor: Predictor, img: np.ndarray) -> Detections:
    """Detections in network-canvas pixels, unclipped: the prepared canvas run through the
    same program with a pure shift by 1000 px as its "resize" (so no box reaches a border)."""
    prepared = predictor.prepare(img)
    shift = np.eye(3)
    shift[:2, 2] = -SHIFT
    unclipped = PreparedImage(prepared.canvas, shift, prepared.valid_hw, (10 * SHIFT, 10 * SHIFT))
    [det] = predictor.run_prepared([unclipped])
    return Detections(det.boxes - SHIFT, det.scores, det.labels)


def to_original(boxes: np.ndarray, orig_wh: Sequence[int], input_wh: Sequence[int],
                keep_ratio: bool) -> np.ndarray:  # fmt: skip
    """Canvas boxes -> original pixels by the documented val transform, written out by hand.

    keep_ratio (NanoDet's get_minimum_dst_shape, then get_resize_matrix): the image's size
    scaled by ``min(W/w, H/h)`` and truncated to whole pixels, ``dw' x dh'``, is its
    extent on the canvas; it is scaled by ``r = min(dw'/w, dh'/h)`` to fit that extent,
    centred in it (a sub-pixel to one-pixel shift), and padded bottom/right to the canvas.
    Otherwise x and y scale by ``W/w`` and ``H/h``."""
    (w, h), (dw, dh) = orig_wh, input_wh
    if keep_ratio:
        fit = min(dw / w, dh / h)
        dw, dh = int(fit * w), int(fit * h)
        sx = sy = r = min(dw / w, dh / h)
        tx, ty = (dw - r * w) / 2, (dh - r * h) / 2
    else:
        sx, sy, tx, ty = dw / w, dh / h, 0.0, 0.0
    out = (np.asarray(boxes, np.float64) - [tx, ty, tx, ty]) / [sx, sy, sx, sy]
    return np.clip(out, 0, [w, h, w, h])


@pytest.fixture(scope="module")
def keep_ratio_predictor(ckpt) -> Predictor:
    return predict.load_predictor(CONFIG, checkpoint_dir=str(ckpt), overrides=KEEP_RATIO)


def read(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
    img = cv2.imread(str(path))
    return img, (img.shape[1], img.shape[0])


def assert_mapping_is_tested(boxes: np.ndarray, wh: tuple[int, int]) -> None:
    """Enough box edges away from the image border, where clipping would hide a bad map."""
    w, h = wh
    inside = (boxes > 1) & (boxes < np.array([w, h, w, h]) - 1)
    assert inside[:, [0, 2]].sum() >= 5 and inside[:, [1, 3]].sum() >= 5, boxes


@pytest.fixture(scope="module")
def expected(keep_ratio_predictor, images) -> dict[str, Detections]:
    """Per image: keep_ratio detections mapped to original pixels by :func:`to_original`."""
    out = {}
    for name in IMAGE_NAMES:
        img, wh = read(images / name)
        det = canvas_detections(keep_ratio_predictor, img)
        boxes = to_original(det.boxes, wh, INPUT_WH, True)
        assert_mapping_is_tested(boxes, wh)
        out[name] = Detections(boxes, det.scores, det.labels)
    return out


def test_keep_ratio_letterbox_and_boxes_back(keep_ratio_predictor, images, expected):
    predictor = keep_ratio_predictor
    prepared = predictor.prepare(read(images / "wide.png")[0])
    letterbox = np.zeros((96, 128, 3), np.uint8)
    letterbox[:48] = np.load(images / "small.npy")
    np.testing.assert_array_equal(prepared.canvas, letterbox)
    assert prepared.valid_hw == (48, 128)
    # A non-integer scale: 200x90 -> 128x57.6, the image is int(57.6) = 57 rows high.
    assert predictor.prepare(read(images / "flat.jpg")[0]).valid_hw == (57, 128)
    for name in IMAGE_NAMES:
        [det] = predictor([read(images / name)[0]])
        want = expected[name]
        np.testing.assert_array_equal(det.labels, want.labels, err_msg=name)
        np.testing.assert_array_equal(det.scores, want.scores, err_msg=name)
        np.testing.assert_allclose(det.boxes, want.boxes, rtol=0, atol=1e-3, err_msg=name)


def test_keep_ratio_false_scales_each_axis(ckpt, images):
    predictor = predict.load_predictor(CONFIG, checkpoint_dir=str(ckpt), overrides=SMALL)
    img, wh = read(images / "tall.bmp")
    want = to_original(canvas_detections(predictor, img).boxes, wh, INPUT_WH, False)
    assert_mapping_is_tested(want, wh)
    [det] = predictor([img])
    np.testing.assert_allclose(det.boxes, want, rtol=0, atol=1e-3)


def test_predict_folder_writes_drawn_images_and_json(ckpt, images, expected, tmp_path, capsys):
    out = tmp_path / "preds"
    predict.main(["--config", CONFIG, *KEEP_RATIO, "--checkpoint", str(ckpt),
                  "--out-dir", str(out), "--score-thr", "0.3", str(images)])  # fmt: skip
    assert f"wrote 3 drawn images and predictions.json to {out}" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == sorted([*IMAGE_NAMES, "predictions.json", "skipped.json"])
    records = json.loads((out / "predictions.json").read_text())
    assert [r["file"] for r in records] == [str(images / n) for n in IMAGE_NAMES]
    for name, record in zip(IMAGE_NAMES, records):
        original = cv2.imread(str(images / name))
        drawn = cv2.imread(str(out / name))
        assert drawn.shape == original.shape, name
        want, got = expected[name], record["detections"]
        assert len(got) == len(want), name
        if name != "flat.jpg":  # lossless formats: drawn boxes are visible pixel changes
            assert (drawn != original).any() == bool((want.scores > 0.3).any()), name
        np.testing.assert_allclose([d["box_xyxy"] for d in got], want.boxes, rtol=0,
                                   atol=0.0051, err_msg=name)  # fmt: skip
        np.testing.assert_allclose([d["score"] for d in got], want.scores, atol=5.1e-5)
        assert [d["class_id"] for d in got] == want.labels.tolist(), name
        assert [d["class_name"] for d in got] == [CLASS_NAMES[i] for i in want.labels], name


def write_coco(images: Path, path: Path) -> Path:
    """A COCO json for the test images with the small model's 5 classes (one box each)."""
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(CLASS_NAMES)]
    coco = {"images": [], "annotations": [], "categories": categories}
    for i, name in enumerate(IMAGE_NAMES):
        h, w = cv2.imread(str(images / name)).shape[:2]
        coco["images"].append({"id": i + 1, "file_name": name, "width": w, "height": h})
        box = {"bbox": [5, 5, 40, 30], "area": 1200.0, "iscrowd": 0}
        coco["annotations"].append({"id": i + 1, "image_id": i + 1, "category_id": i + 1, **box})
    path.write_text(json.dumps(coco))
    return path


def run_eval(ckpt: Path, images: Path, tmp: Path, *extra: str) -> tuple[list[dict], str]:
    """``eval.py`` in batches of 2 (3 images: the last batch is padded); (detections, log)."""
    ann = write_coco(images, tmp / "ann.json")
    handler = _ListHandler()
    logging.getLogger("nanodet_jax").addHandler(handler)
    try:
        eval_cli.main([
            "--config", CONFIG, *KEEP_RATIO, "--checkpoint", str(ckpt),
            f"--config.data.val.ann_file={ann}", f"--config.data.val.img_dir={images}",
            "--batch-size", "2", "--no-progress", "--out-dir", str(tmp), *extra,
        ])  # fmt: skip
    finally:
        logging.getLogger("nanodet_jax").removeHandler(handler)
    return json.loads((tmp / "detections.json").read_text()), "\n".join(handler.lines)


class _ListHandler(logging.Handler):
    """Collects our log lines (eval's setup_logging replaces the root handlers caplog uses)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_eval_keep_ratio_detections_in_original_pixels(ckpt, images, expected, tmp_path):
    dets, log = run_eval(ckpt, images, tmp_path)
    assert "nms_pre" not in log, log
    for image_id, name in enumerate(IMAGE_NAMES, 1):
        got = [d for d in dets if d["image_id"] == image_id]
        want = expected[name]
        assert len(got) == len(want), name
        xywh = np.array([d["bbox"] for d in got])
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        np.testing.assert_allclose(boxes, want.boxes, rtol=0, atol=1e-3, err_msg=name)
        assert [d["category_id"] for d in got] == (want.labels + 1).tolist(), name


def test_eval_reports_nms_pre_truncation(ckpt, images, tmp_path):
    dets, log = run_eval(ckpt, images, tmp_path, "--config.test.nms_pre=5")
    # Every image has more than 5 candidates and keeps at most 5 (< max_per_img = 100).
    assert "3 image(s) had more than test.nms_pre=5 candidates" in log, log
    assert 0 < len(dets) <= 15


def tensors(state_dict: dict[str, np.ndarray], prefix: str = "") -> dict:
    import torch

    return {prefix + k: torch.from_numpy(v) for k, v in state_dict.items()}


def assert_pth_equals(path: Path, want: dict[str, np.ndarray], wrapped: bool = False) -> None:
    """``path`` holds exactly ``want``: NanoDet's keys in NanoDet's order, the same values."""
    import torch

    got = torch.load(path, weights_only=True)
    if wrapped:  # NanoDet's nanodet_model_best.pth layout, what its load_model_weight reads
        assert list(got) == ["state_dict"]
        got = got["state_dict"]
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].dtype == torch.from_numpy(v).dtype, k
        np.testing.assert_array_equal(got[k].numpy(), v, err_msg=k)


@pytest.mark.needs_torch
def test_convert_inference_pth_to_checkpoint_and_back(small_config, tmp_path):
    import torch

    # As NanoDet's published weights: an inference state_dict, no aux branch.
    sd = random_weights(build_model(small_config, with_aux=False), seed=3)
    assert not any(k.startswith(NanoDetPlus.TRAINING_ONLY) for k in sd)
    pth = tmp_path / "w.pth"
    torch.save(tensors(sd), pth)
    base = ["--config", CONFIG, *SMALL_MODEL_OVERRIDES]
    convert_cli.main([*base, "--torch-weights", str(pth), "--out", str(tmp_path / "ckpt")])
    back = tmp_path / "back.pth"
    convert_cli.main([*base, "--checkpoint", str(tmp_path / "ckpt"), "--export-torch", str(back)])
    assert_pth_equals(back, sd)


@pytest.mark.needs_torch
def test_convert_lightning_ckpt_ema_and_no_ema(small_config, tmp_path):
    import torch

    model = build_model(small_config, seed=0)  # a training checkpoint: aux branch included
    raw, ema = random_weights(model, seed=5), random_weights(model, seed=6)
    lightning = {
        "epoch": 7,
        "global_step": 700,
        "pytorch-lightning_version": "1.9.0",
        "state_dict": {**tensors(raw, "model."), **tensors(ema, "avg_model.")},
    }
    torch.save(lightning, tmp_path / "last.ckpt")
    base = ["--config", CONFIG, *SMALL_MODEL_OVERRIDES, "--torch-weights"]
    ckpt = str(tmp_path / "last.ckpt")
    convert_cli.main([*base, ckpt, "--export-torch", str(tmp_path / "ema.pth"), "--wrap"])
    convert_cli.main([*base, ckpt, "--no-ema", "--export-torch", str(tmp_path / "raw.pth")])
    assert_pth_equals(tmp_path / "ema.pth", ema, wrapped=True)
    assert_pth_equals(tmp_path / "raw.pth", raw)


def test_export_onnx_from_checkpoint_matches_jax(ckpt, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'nanodet-jax[onnx]')")
    import jax
    import onnx

    from tests.deploy.test_export_onnx import TOL, check_contract, run_onnx, sigmoid_classes

    path = tmp_path / "small.onnx"
    export_cli.main(["--config", CONFIG, *SMALL, "--checkpoint", str(ckpt), "--out", str(path)])
    assert "data [1, 3, 96, 128] -> output [1, 256, 37]" in capsys.readouterr().out
    check_contract(onnx.load(str(path)), (96, 128), 256, 37)
    config = load_config(CONFIG, SMALL)
    model = build_model(config, with_aux=False)
    checkpoint.restore_weights(ckpt, model)
    x = np.random.default_rng(0).normal(size=(1, 96, 128, 3)).astype(np.float32)
    ours = sigmoid_classes(jax.jit(model)(x), model.num_classes)
    theirs = run_onnx(str(path), x.transpose(0, 3, 1, 2))
    assert ours[..., : model.num_classes].max() > 0.5  # the checkpoint's weights: an init's
    # class scores are all sigmoid(-4.595) = 0.01
    assert np.abs(theirs - ours).max() <= TOL


@pytest.mark.skipif(
    not importlib.util.find_spec("tensorflow_datasets"),
    reason="needs tensorflow-datasets (the [tfds] extra)",
)
def test_tfds_export_two_splits(tmp_path, capsys):
    from nanodet_jax.data import synthetic, tfds_export
    from tests.datasets.test_datasets import TFDS_ATOL

    paths = synthetic.write_dataset(str(tmp_path), num_train=3, num_val=2, size=64, seed=4)
    out = tmp_path / "tfds"
    for split in ("train", "val", "train"):  # exporting train again replaces it
        tfds_export.main(["--ann", paths[split], "--img-dir", str(tmp_path / split),
                          "--out", str(out), "--split", split])  # fmt: skip
        assert f"split='{split}'" in capsys.readouterr().out
    classes = list(synthetic.CLASSES)
    for split, count in (("train", 3), ("val", 2)):
        coco = build_dataset({"ann_file": paths[split], "img_dir": str(tmp_path / split)}, None)
        tfds = build_dataset({"name": "TFDSDataset", "img_dir": str(out), "split": split}, classes)
        # No split given: the one natural for the role ("val" for evaluation).
        natural = build_dataset({"name": "TFDSDataset", "img_dir": str(out)}, classes, split)
        assert len(tfds) == len(natural) == count and tfds.class_names == classes, split
        assert [r.image_id for r in natural.records] == [r.image_id for r in coco.records]
        assert sum(len(r.boxes) for r in coco.records) > 0, split
        for a, b in zip(tfds.records, coco.records):
            assert a.image_id == b.image_id and (a.width, a.height) == (b.width, b.height)
            np.testing.assert_array_equal(a.labels, b.labels)
            np.testing.assert_allclose(a.boxes, b.boxes, rtol=0, atol=TFDS_ATOL)


@pytest.mark.parametrize("entry", ["train", "eval", "export", "convert", "check_dataset"])
def test_config_mistakes_end_with_one_line(tmp_path, entry, capsys):
    """A typo in an override or an unsupported NanoDet .yml part: ``error: ...`` naming it,
    exit status 2, no traceback (the entry points' ``cli.read_config`` and ``entry_point``)."""
    import importlib

    main = importlib.import_module(f"nanodet_jax.cli.{entry}").main
    yml = tmp_path / "legacy.yml"
    yml.write_text("model:\n  arch:\n    name: RetinaNet\n")
    cases = [
        ([CONFIG, "--config.model.arch.head.num_clases=3"], "no field 'num_clases'"),
        ([str(yml)], "model.arch.name: 'RetinaNet' is not supported yet"),
    ]
    weights = [] if entry in ("train", "check_dataset") else ["--torch-weights", "x.pth"]
    for config, expected in cases:
        with pytest.raises(SystemExit) as info:
            main(["--config", config[0], *config[1:], *weights])
        assert str(info.value).startswith("error: ") and expected in str(info.value)
        assert info.value.code == 2
        assert "\n" not in str(info.value)
