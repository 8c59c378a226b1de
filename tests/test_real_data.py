"""End to end on real data (``../shared/data``): COCO mAP parity with NanoDet, predictions.

Reference numbers come from NanoDet's own pipeline on the same 80 coco_tiny val images:
``python tools/reference_eval.py /path/to/nanodet --config configs/nanodet_plus_m_416.py
--weights ../shared/data/weights/nanodet-plus-m_416.pth --ann .../instances_val2017.json
--img-dir .../val2017`` (and the same with configs/nanodet_plus_m.py and the 320 weights).
"""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest

import eval as eval_cli
from nanodet_jax.data.coco import ImageReadError
from nanodet_jax.predict import load_predictor, predict_paths
from tests.conftest import config_path

# NanoDet's mAP@[.5:.95] / AP50 on coco_tiny val with the shared weights (tools/reference_eval.py).
REFERENCE = {
    "nanodet_plus_m_416.py": ("nanodet-plus-m_416.pth", 0.3581, 0.5259),
    "nanodet_plus_m.py": ("nanodet-plus-m_320.pth", 0.3115, 0.4568),
}


@pytest.mark.parametrize("cfg", sorted(REFERENCE))
def test_coco_map_matches_nanodet(cfg, shared_data, tmp_path):
    weights, ref_map, ref_ap50 = REFERENCE[cfg]
    coco = os.path.join(shared_data, "coco_tiny")
    metrics = eval_cli.main([
        "--config", config_path(cfg),
        "--torch-weights", os.path.join(shared_data, "weights", weights),
        f"--config.data.val.ann_file={coco}/annotations/instances_val2017.json",
        f"--config.data.val.img_dir={coco}/val2017",
        "--out-dir", str(tmp_path), "--no-progress",
    ])  # fmt: skip
    stats = metrics["stats"]
    assert abs(stats["AP"] - ref_map) <= 0.002, stats
    assert abs(stats["AP50"] - ref_ap50) <= 0.002, stats
    dets = json.load(open(tmp_path / "detections.json"))
    assert dets and set(dets[0]) == {"image_id", "category_id", "bbox", "score"}
    assert len(metrics["per_class"]) == 80


def test_predict_bus(shared_data, tmp_path):
    predictor = load_predictor(
        config_path("nanodet_plus_m_416.py"),
        torch_weights=os.path.join(shared_data, "weights", "nanodet-plus-m_416.pth"),
    )
    path = os.path.join(shared_data, "images", "bus.jpg")
    [record] = predict_paths(predictor, [path], str(tmp_path), score_thr=0.35)
    confident = [d["class_name"] for d in record["detections"] if d["score"] > 0.35]
    assert confident.count("bus") == 1 and confident.count("person") >= 3
    drawn = cv2.imread(str(tmp_path / "bus.jpg"))
    assert drawn.shape == cv2.imread(path).shape
    assert not np.array_equal(drawn, cv2.imread(path))  # boxes were drawn


def test_eval_names_a_corrupt_image(tmp_path, small_config):
    from nanodet_jax import evaluation
    from nanodet_jax.data.coco import CocoDetection
    from nanodet_jax.model import build_model
    from nanodet_jax.predictor import Predictor

    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    cv2.imwrite(str(img_dir / "ok.jpg"), np.zeros((40, 60, 3), np.uint8))
    (img_dir / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    ann = {
        "images": [{"id": 1, "file_name": "ok.jpg", "width": 60, "height": 40},
                   {"id": 2, "file_name": "broken.jpg", "width": 60, "height": 40}],
        "annotations": [],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate("abcde")],
    }  # fmt: skip
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    dataset = CocoDetection(str(tmp_path / "ann.json"), str(img_dir))
    predictor = Predictor(build_model(small_config, with_aux=False), small_config)
    with pytest.raises(ImageReadError, match="broken.jpg: cannot decode image"):
        evaluation.predict_dataset(predictor, dataset.records, batch_size=2, progress=False)
