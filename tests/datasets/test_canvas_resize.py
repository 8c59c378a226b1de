"""torchvision's min / max size resize onto canvases (``nanodet_jax/data/canvas_resize.py``):
parity with ``GeneralizedRCNNTransform`` (bit for bit when upscaling) on crops of a real
photo (golden of ``tools/check_canvas_resize.py``), the canvas choice and its config
errors, and the training loader's grouping of images by canvas."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest

from nanodet_jax.config.loading import load_config
from nanodet_jax.data import canvas_resize, transforms
from nanodet_jax.data.coco import ImageRecord
from nanodet_jax.data.pipeline import TrainLoader
from tests.conftest import REPO, config_path

GOLDEN = os.path.join(REPO, "tests", "data", "golden_canvas_resize.npz")


def spec(min_size: int, max_size: int, **extra) -> canvas_resize.CanvasResize:
    cfg = {"min_size": min_size, "max_size": max_size, **extra}
    return canvas_resize.from_config({"resize": cfg}, "data.val")


def test_resize_and_padding_equal_torchvision():
    with np.load(GOLDEN) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays.pop("meta")))
    assert [c["name"] for c in meta["cases"]] == ["down", "up", "max"]
    for case in meta["cases"]:
        img, want = arrays[f"{case['name']}_input"], arrays[f"{case['name']}_torchvision"]
        rule = spec(case["min_size"], case["max_size"])
        h, w = img.shape[:2]
        ow, oh = rule.output_wh(w, h)
        assert [oh, ow] == case["image_size"], case
        # torchvision's batch of one image: padded to a multiple of 32, zeros beyond.
        canvas, valid = transforms.place_on_canvas(rule.resize(img), want.shape[:2])
        assert valid == (oh, ow)
        # Upscaling is PyTorch's arithmetic exactly; downscaling sums in another order
        # (canvas_resize.CanvasResize.resize): 2 float32 ulps at 255.
        atol = 3.1e-5 if case["name"] == "down" else 0.0
        np.testing.assert_allclose(canvas, want, rtol=0, atol=atol, err_msg=case["name"])


def test_canvas_choice_and_the_config_default():
    rule = spec(800, 1333)
    config = load_config(config_path("fcos_r50_fpn.py"))
    for split in ("train", "val"):
        from_file = canvas_resize.from_config(config.data[split], f"data.{split}")
        assert from_file.canvases == rule.canvases, split  # the config lists the default
    # COCO's common sizes fill their canvases; a 5:1 panorama is bounded by max_size.
    cases = {(640, 480): (1088, 800), (480, 640): (800, 1088), (640, 427): (1216, 800),
             (427, 640): (800, 1216), (500, 500): (800, 800), (1000, 200): (1344, 800),
             (200, 1000): (800, 1344)}  # fmt: skip
    for (w, h), canvas in cases.items():
        assert rule.canvas_for(w, h) == canvas, (w, h)
    assert rule.output_wh(640, 427) == (1199, 800) and rule.output_wh(1000, 200) == (1333, 266)
    np.testing.assert_array_equal(rule.matrix(640, 427), np.diag([1199 / 640, 800 / 427, 1]))


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"canvases": [[1344, 800]]}, "data.val.resize.canvases: none of [[1344, 800]] holds "
         "a 800x1333 resize (max_size=1333, min_size=800); add [800, 1344]"),
        ({"canvases": [[1344, 800], [800, 1340]]}, "[800, 1340] is not a positive multiple "
         "of size_divisible=32"),
        ({"canvas": [[1344, 800]]}, "data.val.resize: unknown field(s) ['canvas']"),
        ({"canvases": [1344, 800]}, "data.val.resize.canvases must be a list of [w, h] pairs"),
    ],
)  # fmt: skip
def test_config_mistakes_name_the_field(extra, message):
    with pytest.raises(ValueError) as info:
        spec(800, 1333, **extra)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[ImageRecord]:
    """Nine images of three shapes (landscape, portrait, square), each with one box."""
    folder = tmp_path_factory.mktemp("sizes")
    rng = np.random.default_rng(0)
    out = []
    for i, (w, h) in enumerate([(60, 40), (40, 60), (50, 50)] * 3):
        path = str(folder / f"{i}.png")
        cv2.imwrite(path, rng.integers(0, 256, (h, w, 3), np.uint8))
        box = np.array([[5, 6, w - 7, h - 3]], np.float32)
        out.append(ImageRecord(i + 1, path, w, h, box, np.array([i % 3], np.int32),
                               np.zeros((0, 4), np.float32)))  # fmt: skip
    return out


def test_training_batches_share_a_canvas(records):
    rule = canvas_resize.from_config({"resize": {"min_size": 64, "max_size": 96}}, "data.train")
    assert rule.canvases == ((64, 64), (64, 96), (96, 64))
    flips = []
    for flip in (0.0, 1.0):
        pipeline = {"flip": flip, "normalize": [[0, 0, 0], [1, 1, 1]]}
        ld = TrainLoader(records, input_size=(96, 96), pipeline=pipeline, global_batch_size=2,
                         seed=1, resize=rule)  # fmt: skip
        assert ld.steps_per_epoch == 3  # 3 images per canvas: one batch of 2 each
        plan = ld.batch_plan(0)
        for step in range(3):
            batch = ld.batch(0, step)
            canvases = {rule.canvas_for(records[i].width, records[i].height) for i in plan[step]}
            assert len(canvases) == 1, plan[step]
            (cw, ch) = canvases.pop()
            assert batch["images"].shape == (2, ch, cw, 3) and batch["images"].dtype == np.float32
            for row, i in enumerate(plan[step]):
                r = records[i]
                img = cv2.imread(r.path)
                ow, oh = rule.output_wh(r.width, r.height)
                resized = rule.resize(img)[:, ::-1] if flip else rule.resize(img)
                np.testing.assert_array_equal(batch["images"][row, :oh, :ow], resized)
                assert (
                    not batch["images"][row, oh:].any() and not batch["images"][row, :, ow:].any()
                )
                assert tuple(batch["valid_hw"][row]) == (oh, ow)
                box = r.boxes[0] * np.array([ow / r.width, oh / r.height] * 2)
                if flip:
                    box = np.array([ow - box[2], box[1], ow - box[0], box[3]])
                np.testing.assert_allclose(batch["gt_boxes"][row, 0], box, rtol=1e-6)
        flips.append(plan)
    # The plan is a function of (seed, epoch) alone; another epoch, another order.
    np.testing.assert_array_equal(flips[0], flips[1])
    assert not np.array_equal(ld.batch_plan(0), ld.batch_plan(1))


def test_no_full_batch_on_any_canvas_is_one_clear_error(records):
    rule = canvas_resize.from_config({"resize": {"min_size": 64, "max_size": 96}}, "data.train")
    with pytest.raises(ValueError) as info:
        TrainLoader(records, input_size=(96, 96), pipeline={}, global_batch_size=4, resize=rule)
    assert "no canvas of data.train.resize.canvases gets a full batch of 4" in str(info.value)
