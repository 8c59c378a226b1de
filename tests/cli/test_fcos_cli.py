"""The FCOS configs through the command lines (``main(argv)``, in process): eval, predict
and convert with ``configs/fcos_quickstart.py`` (NanoDet's resize, 3 dataset classes as
logits) and ``configs/fcos_r50_fpn.py`` (torchvision's resize onto a canvas, 91
category-id logits, ``label_map``) on tiny inputs. Weights: each model's own init."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nanodet_jax.cli import convert as convert_cli
from nanodet_jax.cli import eval as eval_cli
from nanodet_jax.cli import predict
from nanodet_jax.config.defaults import COCO_CLASSES
from nanodet_jax.config.loading import load_config
from nanodet_jax.data.synthetic import CLASSES
from nanodet_jax.models import build_model
from nanodet_jax.weights import checkpoint
from nanodet_jax.weights.pytorch import model_variables, torch_state_dict
from tests.conftest import config_path
from tests.evaluation.test_fcos_labels import write_coco

QUICKSTART = config_path("fcos_quickstart.py")
R50 = config_path("fcos_r50_fpn.py")
# One canvas for every image (both orientations of a 64 / 128 resize): one program.
R50_TINY = [
    "--config.data.val.resize.min_size=64",
    "--config.data.val.resize.max_size=128",
    "--config.data.val.resize.canvases=[[128, 128]]",
    "--config.test.batch_size=1",
    # An init's scores are all ~sqrt(0.01 * 0.5) = 0.07: below 0.2 nothing would be
    # detected, and a detection of an unmapped logit could not show.
    "--config.model.arch.score_thresh=0.05",
    "--config.test.score_thr=0.05",
]


def data_args(split_dir: Path, ann: Path) -> list[str]:
    return [f"--config.data.val.img_dir={split_dir}", f"--config.data.val.ann_file={ann}"]


def save_init(config_file: str, overrides: list[str], path: Path) -> Path:
    config = load_config(config_file, overrides)
    # Seed 7: not the seed the entry points build with, so a weight left unloaded shows.
    checkpoint.save_weights(path, build_model(config, with_aux=False, seed=7), config)
    return path


def assert_same_weights(a: Path, b: Path, config_file: str, overrides: list[str]) -> None:
    config = load_config(config_file, overrides)
    models = [build_model(config, with_aux=False, seed=s) for s in (1, 2)]
    for model, path in zip(models, (a, b)):
        checkpoint.restore_weights(path, model)
    va, vb = (model_variables(m) for m in models)
    assert list(va) == list(vb)
    for k in va:
        np.testing.assert_array_equal(np.asarray(va[k][...]), np.asarray(vb[k][...]), err_msg=k)


def test_fcos_quickstart_eval_and_predict(shapes, tmp_path):
    # Batches of one in eval as in predict: one program (the second run loads it from
    # the session's compilation cache).
    small = ["--config.data.val.input_size=[64, 64]", "--config.test.batch_size=1"]
    ckpt = save_init(QUICKSTART, small, tmp_path / "ckpt")
    val = data_args(shapes / "val", shapes / "annotations" / "instances_val.json")
    out = tmp_path / "eval"
    eval_cli.main(
        ["--config", QUICKSTART, *small, *val, "--checkpoint", str(ckpt), "--out-dir", str(out)]
        + ["--no-progress"]
    )
    dets = json.loads((out / "detections.json").read_text())
    assert dets and {d["category_id"] for d in dets} <= {1, 2, 3}
    pred = tmp_path / "pred"
    predict.main(
        [str(shapes / "val"), "--config", QUICKSTART, *small, "--checkpoint", str(ckpt)]
        + ["--out-dir", str(pred), "--score-thr", "0.05"]
    )
    records = json.loads((pred / "predictions.json").read_text())
    assert len(records) == 4
    names = {d["class_name"] for r in records for d in r["detections"]}
    assert names and names <= set(CLASSES)


@pytest.mark.needs_torch
def test_fcos_quickstart_convert_both_ways(tmp_path):
    ckpt = save_init(QUICKSTART, [], tmp_path / "ckpt")
    pth = tmp_path / "w.pth"
    convert_cli.main(
        ["--config", QUICKSTART, "--checkpoint", str(ckpt), "--export-torch", str(pth)]
    )
    convert_cli.main(
        ["--config", QUICKSTART, "--torch-weights", str(pth), "--out", str(tmp_path / "back")]
    )
    assert_same_weights(ckpt, tmp_path / "back", QUICKSTART, [])


@pytest.mark.needs_torch
def test_fcos_r50_convert_eval_predict_on_a_tiny_input(tmp_path):
    """torchvision's state_dict layout -> our checkpoint -> eval and predict on two tiny
    images with COCO's 80 categories -> the state_dict again, unchanged."""
    import torch

    config = load_config(R50, R50_TINY)
    sd = torch_state_dict(build_model(config, with_aux=False, seed=7))
    # An init scores every class alike (~0.07); make "__background__" (0) and an "N/A"
    # slot (12) the strongest logits and the toothbrush (90) next: with the labels mapped
    # only toothbrushes score above 0.5, unmapped the first two would come out on top.
    bias = sd["head.classification_head.cls_logits.bias"]
    bias[[0, 12]], bias[90] = 5.0, 3.0
    assert (
        "backbone.body.bn1.running_var" in sd and "head.classification_head.cls_logits.bias" in sd
    )
    torch.save(sd, tmp_path / "fcos.pth")
    ckpt = tmp_path / "ckpt"
    convert_cli.main(
        ["--config", R50, "--torch-weights", str(tmp_path / "fcos.pth"), "--out", str(ckpt)]
    )
    convert_cli.main(
        ["--config", R50, "--checkpoint", str(ckpt), "--export-torch", str(tmp_path / "back.pth")]
    )
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)

    data = tmp_path / "coco"
    data.mkdir()
    ann = write_coco(data, config.model.arch.label_map)
    out = tmp_path / "eval"
    metrics = eval_cli.main(
        ["--config", R50, *R50_TINY, *data_args(data, Path(ann)), "--checkpoint", str(ckpt)]
        + ["--out-dir", str(out), "--no-progress"]
    )
    assert 0.0 <= metrics["stats"]["AP"] <= 1.0
    dets = json.loads((out / "detections.json").read_text())
    assert len(dets) > 20
    strong = [d["category_id"] for d in dets if d["score"] > 0.5]
    assert strong and set(strong) == {90}, sorted(set(strong))
    # Category ids only: the "__background__" / "N/A" logits never become detections.
    assert {d["category_id"] for d in dets} <= set(config.model.arch.label_map)
    predict.main([str(data), "--config", R50, *R50_TINY, "--checkpoint", str(ckpt),
                  "--out-dir", str(tmp_path / "pred"), "--score-thr", "0.0"])  # fmt: skip
    records = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert [Path(r["file"]).name for r in records] == ["a.png", "b.png"]
    for r in records:
        assert {d["class_name"] for d in r["detections"]} <= set(COCO_CLASSES)
        # Boxes in the original pixels: within the image (100x60 or 60x100).
        wh = (100, 60) if r["file"].endswith("a.png") else (60, 100)
        boxes = np.array([d["box_xyxy"] for d in r["detections"]]).reshape(-1, 4)
        assert len(boxes) > 10
        strong = {d["class_name"] for d in r["detections"] if d["score"] > 0.5}
        assert strong == {"toothbrush"}, strong
        assert np.all(boxes >= 0) and np.all(boxes <= np.array(wh * 2) + 1e-3)


def test_r50_eval_class_count_and_canvas_mistakes_are_one_line(shapes, tmp_path):
    val = data_args(shapes / "val", shapes / "annotations" / "instances_val.json")
    with pytest.raises(SystemExit) as info:  # a 3-category json for the 80-label model
        eval_cli.main(["--config", R50, *R50_TINY, *val, "--torch-weights", "x.pth"])
    message = str(info.value)
    assert "has 3 categories but the model predicts 80 classes" in message, message
    assert "model.arch.label_map" in message and "\n" not in message
    args = ["--config", R50, *R50_TINY, "--config.data.val.resize.canvases=[[128, 64]]", *val,
            "--torch-weights", "x.pth"]  # fmt: skip
    for entry, inputs in ((eval_cli.main, []), (predict.main, ["x.png"])):
        with pytest.raises(SystemExit) as info:
            entry([*inputs, *args])
        message = str(info.value)
        assert message.startswith("error: data.val.resize.canvases: none of [[128, 64]]")
        assert "add [64, 128]" in message and "\n" not in message
