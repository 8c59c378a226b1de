"""train.py end to end on a tiny generated dataset: runs, checkpoints, stops on SIGTERM
with a checkpoint of its step, resumes exactly (losses and EMA), keeps the EMA weights in
``best/``, refuses a resume with another global batch, stops on a non-finite loss; the
quickstart config generates its data and trains."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from nanodet_jax.cli import train as train_cli
from nanodet_jax.config.loading import load_config
from nanodet_jax.data.synthetic import CLASSES
from nanodet_jax.models import build_model
from nanodet_jax.testing import SMALL_MODEL_OVERRIDES
from nanodet_jax.training.training_log import TrainingLog
from nanodet_jax.weights import checkpoint
from tests.conftest import REPO, config_path
from tests.weights.test_checkpoint import values

STEPS = 7


def plus_args(shapes, workdir, max_steps: int) -> list[str]:
    """train.py arguments: the narrow NanoDet-Plus (SMALL_MODEL_OVERRIDES) on ``shapes`` at
    96x96, batch 4, 2 epochs of 6 steps (the AGM aux head detached from epoch 2)."""
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


# The runs that check the loop (stop, resume, kill, NaN guard) train a narrow legacy
# NanoDet (ShuffleNetV2 0.5x, PAN, NanoDetHead + ATSS; one phase) with an EMA (its recipe
# has none): the loop is generic over the detector, and this step traces and compiles
# ~4x faster than NanoDet-Plus's two (a run: 37 vs 157 s cold, 23 vs 79 s from the XLA
# cache, on this 2-core machine). NanoDet-Plus goes through train.py in test_finetune.py,
# the quick start below and test_fcos/test_pretrained's runs.
LEGACY_EMA = "--config.model.weight_averager={'name': 'ExpMovingAverager', 'decay': 0.9998}"


def args(shapes, workdir, max_steps: int) -> list[str]:
    """train.py arguments: :func:`plus_args`'s run on the narrow legacy NanoDet-m."""
    out = []
    for a in plus_args(shapes, workdir, max_steps):
        if "aux_head" in a or "detach_epoch" in a or "lr_schedule" in a:
            continue  # NanoDet-Plus's fields (the legacy recipe: MultiStepLR, one phase)
        out.append(a.replace("nanodet_plus_m.py", os.path.join("legacy", "nanodet_m.py")))
    return [*out, LEGACY_EMA]


def train_losses(workdir, partial: bool = False) -> dict[int, float]:
    """Train losses by step; ``partial``: of a file still being written (its last line
    may be incomplete)."""
    lines = open(workdir / "metrics.jsonl").read().split("\n")
    if partial:
        lines = lines[:-1]  # everything after the last newline may be cut
    records = [json.loads(line) for line in lines if line.strip()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def logged_steps(workdir) -> list[int]:
    """The steps of metrics.jsonl's train records, in order (a redone step shows twice)."""
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return [r["step"] for r in records if r["kind"] == "train"]


def train_until_signalled(
    argv: list[str], workdir, log_path, after_step: int = 1
) -> tuple[int, str, str]:
    """Run train.py in a subprocess and SIGTERM it once metrics.jsonl has ``after_step``;
    its exit status, stdout and stderr."""
    env = {**os.environ, "PYTHONPATH": REPO}  # conftest's XLA cache: the program loads
    with open(log_path, "w") as log_file:  # a file: a full stderr pipe would block it
        proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=log_file, text=True)  # fmt: skip
        deadline = time.monotonic() + 900
        while proc.poll() is None and time.monotonic() < deadline:
            if (
                os.path.exists(workdir / "metrics.jsonl")
                and max(train_losses(workdir, partial=True), default=0) >= after_step
            ):
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=900)
    return proc.returncode, out, open(log_path).read()


def weights(workdir, config, directory: str, **kw) -> dict[str, np.ndarray]:
    """Every weight (params and BN statistics) a restore of ``workdir/directory`` gives."""
    model = build_model(config)
    checkpoint.restore_weights(workdir / directory, model, **kw)
    return values(model)


@pytest.mark.xdist_group("train_runs")  # with test_kill.py, which shares the uninterrupted run
def test_resume_continues_exactly(shapes, uninterrupted_run, tmp_path):
    full, _ = uninterrupted_run
    reference = train_losses(full)
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert all(np.isfinite(v) for v in reference.values())
    evals = [json.loads(line) for line in open(full / "metrics.jsonl")]
    assert any(r["kind"] == "eval" for r in evals)  # the final step evaluated the EMA
    # The loader-wait share of every logged interval (docs/distributed.md).
    waits = [r["data_wait"] for r in evals if r["kind"] == "train"]
    assert len(waits) == STEPS and all(0 <= w <= 1 for w in waits), waits
    assert (full / "curves.png").exists() and (full / "best").is_dir()

    # An interrupted run: train.py gets SIGTERM (a preemption) once it has logged step 1;
    # it finishes its step, writes that step's checkpoint and exits 0.
    part = tmp_path / "part"
    status, out, err = train_until_signalled(args(shapes, part, STEPS), part, tmp_path / "log")
    assert status == 0, err[-4000:]
    stopped = json.loads(out.strip().splitlines()[-1])
    stop_step = stopped["final_step"]
    assert stopped["stopped_by"] == "SIGTERM" and 1 <= stop_step < STEPS, (stopped, err[-4000:])
    assert f"stopped by SIGTERM after step {stop_step}" in err, err[-4000:]
    assert "to resume, run the same command" in err, err[-4000:]
    saved = sorted(int(d.name) for d in (part / "checkpoints").iterdir() if d.name.isdigit())
    assert saved == sorted({s for s in (3, stop_step) if s <= stop_step}), saved  # 3: periodic
    assert not (part / "best").exists()  # no evaluation was due
    assert logged_steps(part) == list(range(1, stop_step + 1))
    train_cli.main(args(shapes, part, STEPS))  # the same command resumes after stop_step
    assert logged_steps(part) == list(range(1, STEPS + 1))  # each step once: no step redone
    for step, loss in train_losses(part).items():  # the interrupted run's, then the resumed
        assert loss == reference[step], (step, loss, reference[step])

    # The EMA came back with the resume (it is not re-seeded from the weights), and
    # best/ holds the EMA weights of the step it was written at, not the raw ones.
    parsed, overrides = train_cli.parse_args(args(shapes, full, STEPS))
    config = load_config(parsed.config, overrides)
    ema_full = weights(full, config, "checkpoints", step=STEPS)
    ema_part = weights(part, config, "checkpoints", step=STEPS)
    raw = weights(full, config, "checkpoints", step=STEPS, prefer_ema=False)
    best = weights(full, config, "best")
    assert any(not np.array_equal(ema_full[k], raw[k]) for k in raw)
    for k in ema_full:
        np.testing.assert_array_equal(ema_part[k], ema_full[k], err_msg=k)
        np.testing.assert_array_equal(best[k], ema_full[k], err_msg=k)

    # Resuming with another global batch would change the data order: refused, one line.
    other_batch = [a.replace("batch_size_per_device=4", "batch_size_per_device=2")
                   for a in args(shapes, part, STEPS + 1)]  # fmt: skip
    with pytest.raises(SystemExit, match=r"global batch of 4 images, this run has 2"):
        train_cli.main(other_batch)


def test_ema_update_rule():
    """``ema = ema * (1 - d) + new * d`` with NanoDet's d(iteration); ints truncated."""
    from nanodet_jax.training.ema import ema_decay, update_ema

    ema = {"w": np.float32([1.0, -2.0]), "n": np.int32(10)}
    new = {"w": np.float32([3.0, 0.0]), "n": np.int32(13)}
    for it in (1, 50, 5000):
        d = 0.9998 * np.exp(-(1.0 + it) / 2000.0) + (1 - 0.9998)
        assert float(ema_decay(np.float32(it), 0.9998)) == pytest.approx(d, rel=1e-6)
        out = update_ema(ema, new, np.int32(it), 0.9998)
        np.testing.assert_allclose(
            out["w"], ema["w"] * (1 - d) + new["w"] * d, rtol=1e-6, atol=1e-6
        )
        assert int(out["n"]) == int(10 * (1 - d) + 13 * d)


def test_nan_loss_stops_the_run(shapes, tmp_path):
    """A diverging run (lr 1e30) stops at the first non-finite loss, naming the step and
    the terms; nothing after it is logged or checkpointed."""
    workdir = tmp_path / "nan"
    argv = [*args(shapes, workdir, 6), "--config.schedule.optimizer.lr=1e30"]
    bad = r"non-finite loss or gradient at step (\d+)"
    with pytest.raises(FloatingPointError, match=bad) as err:
        train_cli.main(argv)
    bad_step = int(re.search(r"at step (\d+)", str(err.value)).group(1))
    assert 1 <= bad_step < 6 and "loss_qfl=" in str(err.value), str(err.value)
    assert "grad_norm" in str(err.value).split("[")[0], str(err.value)  # named among the bad
    logged = train_losses(workdir)
    assert all(step < bad_step and np.isfinite(v) for step, v in logged.items()), logged
    saved = [int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit()]
    assert all(step < bad_step for step in saved), (saved, bad_step)


def test_nan_loss_is_named():
    with pytest.raises(FloatingPointError, match=r"step 12 \(epoch 3\).*loss_bbox"):
        TrainingLog.check_finite(12, 2, {"loss": np.float32(np.nan), "loss_bbox": np.inf,
                                         "loss_qfl": np.float32(0.5)})  # fmt: skip


def test_quickstart_generates_its_data_and_trains(shapes, tmp_path):
    """configs/quickstart.py as documented, then train.py on it (data made on first run;
    sizes shrunk so the step is the one the other runs here compiled)."""
    config = load_config(config_path("quickstart.py"))
    assert config.class_names == list(CLASSES) and config.model.arch.head.num_classes == 3
    assert tuple(config.data.train.input_size) == (256, 256)
    assert config.data.synthetic.out_dir == "data/quickstart_shapes"
    assert config.data.train.ann_file.startswith(config.data.synthetic.out_dir)
    data = tmp_path / "qs_data"
    base = [a for a in plus_args(shapes, tmp_path / "qs", 1)
            if not a.startswith("--config.data.")]  # fmt: skip
    base[base.index("--config") + 1] = config_path("quickstart.py")
    train_cli.main([
        *base, "--config.data.train.input_size=[96, 96]", "--config.data.val.input_size=[96, 96]",
        "--config.data.train.max_boxes_buckets=[16]",
        f"--config.data.synthetic.out_dir={data}", "--config.data.synthetic.num_train=24",
        "--config.data.synthetic.num_val=4", "--config.data.synthetic.size=128",
        f"--config.data.train.img_dir={data}/train",
        f"--config.data.train.ann_file={data}/annotations/instances_train.json",
        f"--config.data.val.img_dir={data}/val",
        f"--config.data.val.ann_file={data}/annotations/instances_val.json",
    ])  # fmt: skip
    train_json = json.load(open(data / "annotations" / "instances_train.json"))
    assert len(train_json["images"]) == 24 and len(os.listdir(data / "val")) == 4
    assert [c["name"] for c in train_json["categories"]] == list(CLASSES)
    assert sorted(train_losses(tmp_path / "qs")) == [1]
