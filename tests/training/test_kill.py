"""``kill -9`` of train.py — mid-step, mid-checkpoint-write, mid-evaluation
(training/fault_injection.py) and at seeded random moments — then the same command again:
every step's loss, the evaluations, ``best/`` and the final parameters are bitwise those of
an uninterrupted run, and each step is logged once.

CI runs the three named kills in one workdir (four processes) and seed 0 of the random
kills (one kill); ``pytest --kill-suite -s tests/training/test_kill.py`` runs all 16 seeds
(seeds 1-15: three kills each) and prints how many kills landed."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from nanodet_jax.training.fault_injection import ENV
from nanodet_jax.training.training_log import evaluated_steps
from tests.conftest import REPO
from tests.training.test_train import STEPS, args, logged_steps, train_losses, weights

pytestmark = pytest.mark.xdist_group("train_runs")  # with the uninterrupted run it shares


def launch(argv: list[str], log_path, kill_at: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": REPO}  # conftest's XLA cache: the programs load
    env.pop(ENV, None)
    if kill_at:
        env[ENV] = kill_at
    log_file = open(log_path, "w")  # a file: a full pipe would block the process
    return subprocess.Popen([sys.executable, "train.py", *argv], cwd=REPO, env=env,
                            stdout=log_file, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def run_to_end(argv: list[str], log_path, kill_at: str | None = None) -> int:
    proc = launch(argv, log_path, kill_at)
    return proc.wait(timeout=900)


def complete_steps(workdir) -> list[int]:
    ckpt = workdir / "checkpoints"
    return sorted(int(d.name) for d in ckpt.iterdir() if d.name.isdigit()) if ckpt.exists() else []


def eval_records(workdir) -> list[dict]:
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return [r for r in records if r["kind"] == "eval"]


def final_summary(log_path) -> dict:
    lines = [line for line in open(log_path).read().splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def assert_same_as_uninterrupted(workdir, reference, log_path) -> None:
    full, full_summary = reference
    assert logged_steps(workdir) == list(range(1, STEPS + 1))  # each step once
    ref_losses = train_losses(full)
    for step, loss in train_losses(workdir).items():
        assert loss == ref_losses[step], (step, loss, ref_losses[step])
    assert eval_records(workdir) == eval_records(full)
    summary = final_summary(log_path)
    assert summary["params_sha256"] == full_summary["params_sha256"]
    assert summary["best_mAP"] == full_summary["best_mAP"]
    config = reference_config(full)
    best, ref_best = weights(workdir, config, "best"), weights(full, config, "best")
    for k in ref_best:
        np.testing.assert_array_equal(best[k], ref_best[k], err_msg=k)
    assert not any(".orbax-checkpoint-tmp" in n for n in os.listdir(workdir / "checkpoints"))


def reference_config(full):
    from nanodet_jax.cli import train as train_cli
    from nanodet_jax.config.loading import load_config

    parsed, overrides = train_cli.parse_args(args(full.parent / "unused", full, STEPS))
    return load_config(parsed.config, overrides)


def test_killed_mid_step_mid_checkpoint_and_mid_eval_loses_nothing(
    shapes, uninterrupted_run, tmp_path
):
    workdir = tmp_path / "killed"
    argv = args(shapes, workdir, STEPS)
    # Step 2 in flight: nothing was saved yet (the first periodic checkpoint is step 3).
    assert run_to_end(argv, tmp_path / "1.log", "step:2") == -signal.SIGKILL
    assert complete_steps(workdir) == [] and logged_steps(workdir) == [1]
    # The write of step 3's checkpoint under way: it never becomes a step to resume from.
    assert run_to_end(argv, tmp_path / "2.log", "checkpoint:3") == -signal.SIGKILL
    assert 3 not in complete_steps(workdir), complete_steps(workdir)
    # The final evaluation (after step 7's checkpoint was started) has computed its
    # metrics: no record of them and no best/ exist. Whether checkpoint 7 (and 6) became complete
    # depends on how far their asynchronous writes got (all three cases seen here); from
    # 7, the restart runs the evaluation it lacks, from 6 or 3 it redoes the steps too.
    assert run_to_end(argv, tmp_path / "3.log", "eval:7") == -signal.SIGKILL
    saved = complete_steps(workdir)
    assert saved in ([3], [3, 6], [3, 6, 7]) and not (workdir / "best").exists(), saved
    assert 7 not in evaluated_steps(str(workdir))
    assert run_to_end(argv, tmp_path / "4.log") == 0, open(tmp_path / "4.log").read()[-3000:]
    text = open(tmp_path / "4.log").read()
    assert f"resumed from {workdir / 'checkpoints'} at step {saved[-1]}" in text, text[-3000:]
    if saved[-1] == 7:
        assert "the evaluation after step 7 did not finish: running it now" in text
    assert_same_as_uninterrupted(workdir, uninterrupted_run, tmp_path / "4.log")


def test_damaged_latest_checkpoint_falls_back_to_the_previous(shapes, uninterrupted_run, tmp_path):
    """A complete-looking latest checkpoint whose array files were damaged afterwards
    (a disk, a copy): restored from the one before, with a warning naming it."""
    workdir = tmp_path / "damaged"
    shutil.copytree(uninterrupted_run[0], workdir)  # a finished run: checkpoints 3, 6, 7
    assert complete_steps(workdir) == [3, 6, 7]
    damaged = 0
    for root, _, files in os.walk(workdir / "checkpoints" / "7" / "model"):
        for name in files:
            path = os.path.join(root, name)
            if os.path.getsize(path) > 4096:  # the array data, not the small metadata
                with open(path, "r+b") as f:
                    f.seek(os.path.getsize(path) // 2)
                    f.write(b"\xff" * 64)
                damaged += 1
    assert damaged, "no array file found to damage"
    # The same command again (its workdir is the copy): step 7 is redone from step 6.
    log_path = tmp_path / "resumed.log"
    assert run_to_end(args(shapes, workdir, STEPS), log_path) == 0, open(log_path).read()[-3000:]
    text = open(log_path).read()
    assert f"checkpoint {workdir / 'checkpoints' / '7'} cannot be restored" in text, text[-3000:]
    assert "using the previous one" in text, text[-3000:]
    assert f"resumed from {workdir / 'checkpoints'} at step 6" in text, text[-3000:]
    assert_same_as_uninterrupted(workdir, uninterrupted_run, log_path)


def test_evaluation_cut_short_is_run_on_resume(shapes, uninterrupted_run, tmp_path):
    """Killed during the final evaluation after step 7's checkpoint had become complete
    (the state the named kill above reaches when the write wins the race): the restart
    trains nothing and runs the missing evaluation, best/ included."""
    workdir = tmp_path / "cut"
    shutil.copytree(uninterrupted_run[0], workdir)
    shutil.rmtree(workdir / "best")
    lines = open(workdir / "metrics.jsonl").read().splitlines()
    kept = [line for line in lines if json.loads(line)["kind"] != "eval"]
    assert len(kept) == len(lines) - 1  # the uninterrupted run evaluated once, after step 7
    open(workdir / "metrics.jsonl", "w").write("\n".join(kept) + "\n")
    log_path = tmp_path / "resumed.log"
    assert run_to_end(args(shapes, workdir, STEPS), log_path) == 0, open(log_path).read()[-3000:]
    text = open(log_path).read()
    assert "the evaluation after step 7 did not finish: running it now" in text, text[-3000:]
    assert_same_as_uninterrupted(workdir, uninterrupted_run, log_path)


def random_kills(seed: int, count: int) -> list[tuple[int, float]]:
    """(steps the process must log first, seconds to wait then) for ``count`` kills."""
    rng = random.Random(seed)
    return [(rng.randint(0, 3), rng.uniform(0.0, 4.0)) for _ in range(count)]


def steps_logged(log_path) -> int:
    """Training steps the process has logged ("step N: ep E loss ..." lines)."""
    return len(re.findall(r"^step \d+: ep ", open(log_path).read(), flags=re.M))


def kill_at_random(argv, log_path, after_steps: int, delay: float) -> bool:
    """Start train.py, SIGKILL it ``delay`` s after it logged ``after_steps`` steps (or at
    once, ``after_steps`` 0); whether the kill landed before the run ended."""
    proc = launch(argv, log_path)
    deadline = time.monotonic() + 900
    while proc.poll() is None and time.monotonic() < deadline:
        if steps_logged(log_path) >= after_steps:
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    return proc.wait(timeout=900) == -signal.SIGKILL


@pytest.mark.parametrize(
    "seed", [0, *(pytest.param(s, marks=pytest.mark.kill_suite) for s in range(1, 16))]
)
def test_seeded_random_kills(shapes, uninterrupted_run, tmp_path, seed):
    """SIGKILL from outside at seeded random moments (whatever the run is doing then:
    starting, a step, a checkpoint write, logging, evaluation, writing best/), restarted
    each time; then the same checks as for the named kills."""
    workdir = tmp_path / f"random{seed}"
    argv = args(shapes, workdir, STEPS)
    kills = random_kills(seed, 1 if seed == 0 else 3)  # CI's seed 0: one kill, to save time
    landed = [kill_at_random(argv, tmp_path / f"{n}.log", after, delay)
              for n, (after, delay) in enumerate(kills)]  # fmt: skip
    log_path = tmp_path / "final.log"
    assert run_to_end(argv, log_path) == 0, open(log_path).read()[-3000:]
    assert_same_as_uninterrupted(workdir, uninterrupted_run, log_path)
    print(f"seed {seed}: {sum(landed)} of {len(landed)} kills landed before the run ended")
