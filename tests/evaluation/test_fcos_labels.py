"""COCO evaluation of FCOS's category-id logits (``configs/fcos_r50_fpn.py``: 91 logits,
``label_map`` = the 80 COCO ids): a stand-in model whose raw outputs put high scores at
known logits and points goes through the Predictor (torchvision's resize onto a canvas),
the COCO json and COCOeval. Detections must come back as dataset labels, named and
scored against their categories, with boxes in original pixels; the "__background__" and
"N/A" logits must produce none. Two images, landscape and portrait, on two canvases
(two batches). No network: the program is the decode and the NMS."""

from __future__ import annotations

import json

import cv2
import jax.numpy as jnp
import numpy as np
import pytest

from nanodet_jax.config.defaults import COCO_CLASSES
from nanodet_jax.config.loading import load_config
from nanodet_jax.data.datasets import build_dataset
from nanodet_jax.evaluation import coco_eval
from nanodet_jax.evaluation.predictor import Predictor, config_label_names
from nanodet_jax.models.detectors.fcos import FCOS, level_points
from tests.conftest import config_path

# Image a.png 100x60 resizes (min_size 64 / max_size 128) to 106x64 on the 128x64
# canvas; b.png is its transpose (64x106 on 64x128), with the transposed objects.
WH = (100, 60)
SMALL = [
    "--config.data.val.resize.min_size=64",
    "--config.data.val.resize.max_size=128",
    "--config.data.val.resize.canvases=[[64, 64], [128, 64], [64, 128]]",
]
# (COCO category id = logit, original-pixel box, the canvas point (x, y) that predicts it)
OBJECTS = [(1, (10, 8, 40, 50), (24, 24)), (90, (60, 10, 90, 40), (72, 24))]
NOT_CLASSES = (0, 12)  # "__background__" and an "N/A" slot: high scores, no detection


class FixedFCOS(FCOS):
    """FCOS's decode on fixed raw outputs (no network): logit ``c`` scores ~1 at each
    object's point, whose regression reaches that object's box on the canvas."""

    def __init__(self, label_map):
        self.num_classes, self.label_map = 91, tuple(label_map)
        self.anchor_sizes, self.score_thresh, self.topk_candidates = (8, 16, 32, 64, 128), 0.2, 1000

    def __call__(self, images):
        hw = images.shape[1:3]
        levels = level_points(hw, self.anchor_sizes)
        n = sum(len(p) for p, _ in levels)
        cls, ctr, reg = np.full((n, 91), -10.0), np.full((n, 1), -10.0), np.zeros((n, 4))
        points = levels[0][0]  # level 0: stride 8, anchor size 8
        targets = [(c, box, p) for c, box, p in OBJECTS]
        targets += [(c, (2, 50, 12, 58), (16, 56)) for c in NOT_CLASSES]
        sx, sy = 106 / 100, 64 / 60  # the rule's scale of a.png
        if hw[0] > hw[1]:  # b.png's canvas: everything transposed
            sx, sy = sy, sx
            targets = [(c, transpose(box), p[::-1]) for c, box, p in targets]
        for category, box, (px, py) in targets:
            i = int(np.flatnonzero((points[:, 0] == px) & (points[:, 1] == py))[0])
            x1, y1, x2, y2 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
            cls[i, category], ctr[i] = 10.0, 10.0
            reg[i] = np.array([px - x1, py - y1, x2 - px, y2 - py]) / 8
        raw = {"cls_logits": cls, "bbox_regression": reg, "bbox_ctrness": ctr}
        b = images.shape[0]
        return {k: jnp.broadcast_to(jnp.asarray(v, jnp.float32), (b, *v.shape))
                for k, v in raw.items()}  # fmt: skip


def transpose(box):
    x1, y1, x2, y2 = box
    return (y1, x1, y2, x2)


def write_coco(folder, label_map) -> str:
    """a.png (100x60) and b.png (60x100), each with a person (id 1) and a toothbrush (id
    90), in a json with COCO's 80 categories; returns its path."""
    images, anns = [], []
    for image_id, (name, (w, h), flip) in enumerate([("a.png", WH, False),
                                                     ("b.png", WH[::-1], True)], 1):  # fmt: skip
        cv2.imwrite(str(folder / name), np.full((h, w, 3), 128, np.uint8))
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for c, box, _ in OBJECTS:
            x1, y1, x2, y2 = transpose(box) if flip else box
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": c,
                         "iscrowd": 0, "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "area": (x2 - x1) * (y2 - y1)})  # fmt: skip
    gt = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": i, "name": n} for i, n in zip(label_map, COCO_CLASSES)],
    }
    (folder / "gt.json").write_text(json.dumps(gt))
    return str(folder / "gt.json")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    folder = tmp_path_factory.mktemp("coco")
    config = load_config(config_path("fcos_r50_fpn.py"), SMALL)
    write_coco(folder, config.model.arch.label_map)
    config.data.val.ann_file, config.data.val.img_dir = str(folder / "gt.json"), str(folder)
    return config, build_dataset(config.data.val, config_label_names(config), role="val")


def test_detections_are_dataset_labels_scored_on_their_categories(coco):
    config, dataset = coco
    assert dataset.class_names == list(COCO_CLASSES)  # the config's names via label_map
    predictor = Predictor(FixedFCOS(config.model.arch.label_map), config)
    assert predictor.class_names == list(COCO_CLASSES)
    assert [p.canvas.shape for p in map(predictor.prepare, [np.zeros((60, 100, 3)),
            np.zeros((100, 60, 3))])] == [(64, 128, 3), (128, 64, 3)]  # fmt: skip
    results = coco_eval.predict_dataset(predictor, dataset.records, batch_size=2, progress=False)
    for image_id, flip in ((1, False), (2, True)):
        det = results[image_id]
        assert det.labels.tolist() == [0, 79]  # person, toothbrush: dataset labels
        assert [predictor.class_names[i] for i in det.labels] == ["person", "toothbrush"]
        want = [transpose(box) if flip else box for _, box, _ in OBJECTS]
        np.testing.assert_allclose(det.boxes, want, rtol=0, atol=1e-3, err_msg=str(image_id))
    dets = coco_eval.to_coco_json(results, dataset.cat_ids)
    assert sorted(d["category_id"] for d in dets) == [1, 1, 90, 90]
    metrics = coco_eval.coco_evaluate(dataset, dets, dataset.class_names)
    assert metrics["per_class"]["person"]["AP"] == pytest.approx(1.0)
    assert metrics["per_class"]["toothbrush"]["AP"] == pytest.approx(1.0)
    assert metrics["stats"]["AP"] == pytest.approx(1.0)
