"""``configs/fcos_quickstart.py`` through the generic trainer (``train_and_evaluate``): two
steps of FCOS on the generated shapes data, with the contiguous labels 0..2 as the logit
indices (no ``label_map``), then the generic COCO evaluation."""

from __future__ import annotations

import json

import numpy as np

from nanodet_jax.config.loading import load_config
from nanodet_jax.training.loop import train_and_evaluate
from tests.conftest import config_path

TERMS = ("classification", "bbox_regression", "bbox_ctrness")


def test_fcos_quickstart_trains_two_steps(shapes, tmp_path):
    config = load_config(config_path("fcos_quickstart.py"), [
        f"--config.data.train.img_dir={shapes}/train",
        f"--config.data.train.ann_file={shapes}/annotations/instances_train.json",
        f"--config.data.val.img_dir={shapes}/val",
        f"--config.data.val.ann_file={shapes}/annotations/instances_val.json",
        "--config.data.train.input_size=[64, 64]", "--config.data.val.input_size=[64, 64]",
        "--config.device.batch_size_per_device=4", "--config.device.workers=1",
        "--config.schedule.total_epochs=1", "--config.log.interval=1",
    ])  # fmt: skip
    config.data.synthetic = None
    summary = train_and_evaluate(config, str(tmp_path / "run"), max_steps=2, progress_bar=False)
    assert summary["final_step"] == 2
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert all(np.isfinite(r[k]) for k in (*TERMS, "loss"))
        assert abs(r["loss"] - sum(r[k] for k in TERMS)) <= 1e-5 * r["loss"]
        assert r["bbox_regression"] > 0  # the generated images have boxes: positives exist
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals and 0.0 <= evals[-1]["AP"] <= 1.0
