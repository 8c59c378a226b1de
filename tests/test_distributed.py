"""Data parallelism: 8 simulated devices == 1 device, 2 processes x 2 devices train.py,
checkpoints across topologies. Each scenario runs in subprocesses (device counts are fixed
when JAX starts)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from nanodet_jax.data.synthetic import write_dataset
from tests.conftest import REPO
from tests.test_train import args as train_args

TIMEOUT = 900


def run(code_or_args: list[str], devices: int, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env, "PYTHONPATH": REPO}
    full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.run([sys.executable, *code_or_args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip


def last_json(out: str) -> dict:
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]


EQUIVALENCE = r"""
import json, jax, numpy as np
from flax import nnx
from nanodet_jax import distributed, trainer
from nanodet_jax.config_utils import load_config
from nanodet_jax.model import build_model
from nanodet_jax.optim import build_optimizer
from nanodet_jax.testing import SMALL_MODEL_OVERRIDES

config = load_config("configs/nanodet_plus_m.py", [*SMALL_MODEL_OVERRIDES,
    "--config.data.train.input_size=[96, 96]"])
rng = np.random.default_rng(0)
B, M = 8, 16
xy = rng.uniform(0, 48, (B, M, 2)); wh = rng.uniform(12, 48, (B, M, 2))
batch = {"images": rng.integers(0, 256, (B, 96, 96, 3), dtype=np.uint8),
         "color": np.tile(np.array([0.1, 1.2, 0.8, 1.0], np.float32), (B, 1)),
         "gt_boxes": np.concatenate([xy, xy + wh], -1).astype(np.float32),
         "gt_labels": rng.integers(0, 5, (B, M)).astype(np.int32),
         "gt_mask": rng.uniform(size=(B, M)) < 0.5}
result = {}
for name, devices in (("8", jax.devices()), ("1", jax.devices()[:1])):
    mesh = distributed.data_mesh(devices)
    tx = build_optimizer(config, 100)
    graphdef, state = trainer.create_train_state(build_model(config, seed=0), tx)
    state = jax.device_put(state, distributed.replicated(mesh))
    step = trainer.jit_train_step(graphdef, tx, config, mesh, detach_aux=False)
    gb = jax.device_put(batch, distributed.batch_sharded(mesh))
    losses = []
    for _ in range(3):
        state, metrics = step(state, gb)
        losses.append(float(metrics["loss"]))
    flat = lambda tree: [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(tree)]
    result[name] = {"losses": losses, "params": flat(state.params),
                    "stats": flat(state.model_state)}
print(json.dumps(result))
"""


def test_eight_devices_equal_one_device():
    proc = run(["-c", EQUIVALENCE], devices=8)
    check(proc)
    res = last_json(proc.stdout)
    np.testing.assert_allclose(res["8"]["losses"], res["1"]["losses"], rtol=2e-5)
    for a, b in zip(res["8"]["stats"], res["1"]["stats"]):  # global-batch BN statistics
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # Adam amplifies float noise in near-zero gradients (stack notes: ~2e-3 after a step).
    worst = max(np.max(np.abs(np.asarray(a) - np.asarray(b))) for a, b in
                zip(res["8"]["params"], res["1"]["params"]))  # fmt: skip
    assert worst < 5e-3, worst


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_dist")
    write_dataset(str(out), num_train=32, num_val=4, size=128, seed=5)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_then_one(shapes_data, tmp_path):
    workdir = tmp_path / "run"
    base = ["train.py", *train_args(shapes_data, workdir, 4)]
    base = [a.replace("batch_size_per_device=4", "batch_size_per_device=2") for a in base]
    base += ["--log_samples"]
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, *base, "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2",
             "--process_id", str(i)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": REPO,
                 "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        )
        for i in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    summaries = [last_json(out) for out, _ in outs]
    assert summaries[0]["final_step"] == summaries[1]["final_step"] == 4
    assert summaries[0]["params_sha256"] == summaries[1]["params_sha256"]
    # Within an epoch no image is seen by both processes (global batch 8 = 2 x 2 x 2).
    seen = []
    for i in range(2):
        records = [json.loads(line) for line in open(workdir / f"samples_p{i}.jsonl")]
        seen.append({r["epoch"]: set() for r in records})
        for r in records:
            seen[i][r["epoch"]].update(r["image_ids"])
    for epoch in seen[0]:
        assert not seen[0][epoch] & seen[1][epoch], epoch
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert steps and steps[-1] == 4  # one checkpoint per step, written jointly
    # The 2-process checkpoint restores in a single-process run, which trains on.
    single = run(["train.py", *train_args(shapes_data, workdir, 5),
                  "--config.device.batch_size_per_device=8"], devices=1)  # fmt: skip
    check(single)
    assert "resumed from" in single.stderr and last_json(single.stdout)["final_step"] == 5


def test_eight_device_checkpoint_continues_on_one(shapes_data, tmp_path):
    workdir = tmp_path / "run8"
    eight = run(["train.py", *train_args(shapes_data, workdir, 2),
                 "--config.device.batch_size_per_device=1"], devices=8)  # fmt: skip
    check(eight)
    one = run(["train.py", *train_args(shapes_data, workdir, 3),
               "--config.device.batch_size_per_device=8"], devices=1)  # fmt: skip
    check(one)
    assert "resumed from" in one.stderr and last_json(one.stdout)["final_step"] == 3
