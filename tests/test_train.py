"""train.py end to end on a tiny generated dataset: runs, checkpoints, resumes exactly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import train as train_cli
from nanodet_jax.data.synthetic import CLASSES, write_dataset
from nanodet_jax.testing import SMALL_MODEL_OVERRIDES
from nanodet_jax.training_log import TrainingLog
from tests.conftest import config_path

STEPS = 7


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    write_dataset(str(out), num_train=24, num_val=4, size=128, seed=3)
    return out


def args(shapes, workdir, max_steps: int) -> list[str]:
    classes = [o for o in SMALL_MODEL_OVERRIDES if "num_classes" not in o and "names" not in o]
    return [
        "--config", config_path("nanodet_plus_m.py"), "--workdir", str(workdir),
        "--max_steps", str(max_steps), *classes,
        f"--config.model.arch.head.num_classes={len(CLASSES)}",
        f"--config.model.arch.aux_head.num_classes={len(CLASSES)}",
        f"--config.class_names={list(CLASSES)}",
        f"--config.data.train.img_dir={shapes}/train",
        f"--config.data.train.ann_file={shapes}/annotations/instances_train.json",
        f"--config.data.val.img_dir={shapes}/val",
        f"--config.data.val.ann_file={shapes}/annotations/instances_val.json",
        "--config.data.train.input_size=[96, 96]", "--config.data.val.input_size=[96, 96]",
        "--config.data.train.max_boxes_buckets=[16]",
        "--config.device.batch_size_per_device=4", "--config.device.workers=1",
        "--config.schedule.total_epochs=2", "--config.schedule.lr_schedule.T_max=2",
        "--config.schedule.warmup.steps=3", "--config.schedule.val_intervals=2",
        "--config.model.arch.detach_epoch=1",  # both AGM phases within the run
        "--config.log.interval=1", "--config.checkpoint.every_steps=3",
    ]  # fmt: skip


def train_losses(workdir) -> dict[int, float]:
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def test_resume_continues_exactly(shapes, tmp_path):
    full = tmp_path / "full"
    train_cli.main(args(shapes, full, STEPS))
    reference = train_losses(full)
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert all(np.isfinite(v) for v in reference.values())
    evals = [json.loads(line) for line in open(full / "metrics.jsonl")]
    assert any(r["kind"] == "eval" for r in evals)  # the final step evaluated the EMA
    assert (full / "curves.png").exists() and (full / "best").is_dir()

    # An interrupted run: it got to step 5, but only the step-3 checkpoint survived.
    part = tmp_path / "part"
    train_cli.main(args(shapes, part, 5))
    for step_dir in (part / "checkpoints").iterdir():
        if step_dir.name.isdigit() and int(step_dir.name) > 3:
            shutil.rmtree(step_dir)
    (part / "metrics.jsonl").unlink()
    train_cli.main(args(shapes, part, STEPS))  # resumes at step 3
    resumed = train_losses(part)
    assert sorted(resumed) == list(range(4, STEPS + 1))
    for step, loss in resumed.items():
        assert loss == reference[step], (step, loss, reference[step])


def test_nan_loss_is_named():
    with pytest.raises(FloatingPointError, match=r"step 12 \(epoch 3\).*loss_bbox"):
        TrainingLog.check_finite(12, 2, {"loss": np.float32(np.nan), "loss_bbox": np.inf,
                                         "loss_qfl": np.float32(0.5)})  # fmt: skip
