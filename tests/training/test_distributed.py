"""Data parallelism: 8 simulated devices == 1 device (and its checkpoint continues on 1),
2 processes x 2 devices train.py (stopped together by SIGTERM, resumed on 1 device).
Each scenario runs in subprocesses (device counts are fixed when JAX starts)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from nanodet_jax.data.synthetic import write_dataset
from tests.conftest import REPO
from tests.training.test_train import args as train_args
from tests.training.test_train import train_losses

TIMEOUT = 900


# Topologies are compared on XLA's own ops, the path GPUs and TPUs take: a sample's work
# there does not depend on how the batch is split. (The CPU kernels' backward sums follow
# the per-device batch, which moves gradients by ~2e-3 and losses after a few steps by
# ~3e-4: float noise, but above what these tests hold; the kernels' sharded programs are
# checked op by op in test_depthwise.py / test_conv3x3.py.)
XLA_OPS = {
    "NANODET_JAX_DEPTHWISE": "lax",
    "NANODET_JAX_CONV3X3": "lax",
    "NANODET_JAX_CONV1X1": "lax",
}


# The train.py runs check topology handling (sharding, collectives, checkpoints), not
# XLA's code generation: LLVM at -O0 compiles their steps ~40% faster (NanoDet-Plus's:
# 69 vs 118 s measured on a loaded 2-core machine), and every run compared is built alike.
TRAIN_RUN_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int, train_run: bool) -> str:
    flags = f"--xla_force_host_platform_device_count={devices}"
    return f"{flags} {TRAIN_RUN_FLAGS}" if train_run else flags


def run(code_or_args: list[str], devices: int, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **XLA_OPS, **env, "PYTHONPATH": REPO}
    full_env["XLA_FLAGS"] = xla_flags(devices, train_run=code_or_args[0] == "train.py")
    return subprocess.run([sys.executable, *code_or_args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip


def last_json(out: str) -> dict:
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]


EQUIVALENCE = r"""
from nanodet_jax import runtime
runtime.configure_xla()  # the entry points' XLA settings, as train.py runs with
runtime.enable_compilation_cache()  # the session's cache (conftest), as train.py
import json, tempfile, jax, jax.numpy as jnp, numpy as np, optax
jax.config.update("jax_enable_x64", True)  # see test_eight_devices_equal_one_device
from nanodet_jax.training import distributed, trainer
from nanodet_jax.weights import checkpoint
from nanodet_jax.config.loading import load_config
from nanodet_jax.models import build_model
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
# Plain SGD at a real learning rate whose optimizer state keeps the last gradient: the
# gradients are compared exactly as the step computed them (Adam's update would hide a
# wrongly scaled or partial gradient: it is ~lr for any non-zero gradient).
LR = 0.05
def sgd_keeping_gradient():
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(lambda g: -LR * g, grads), grads))
flat = lambda tree: [np.asarray(x, np.float64).ravel().tolist() for x in jax.tree.leaves(tree)]
ckpt_dir = tempfile.mkdtemp()
result = {}
for name, devices in (("8", jax.devices()), ("1", jax.devices()[:1])):
    mesh = distributed.data_mesh(devices)
    tx = sgd_keeping_gradient()
    def fresh_state():  # float64 throughout: the step then computes in float64
        graphdef, state = trainer.create_train_state(build_model(config, seed=0), tx)
        state = jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == "float32" else a,
                             state)
        return graphdef, jax.device_put(state, distributed.replicated(mesh))
    graphdef, state = fresh_state()
    step = trainer.jit_train_step(graphdef, tx, config, mesh, phase="joint")
    gb = jax.device_put(batch, distributed.batch_sharded(mesh))
    runs = []
    for _ in range(2):
        state, metrics = step(state, gb)
        runs.append({"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                     "grads": flat(state.opt_state), "stats": flat(state.model_state)})
    result[name] = runs
    mngr = checkpoint.train_manager(ckpt_dir, keep=1)
    if name == "8":  # the 8-device state after 2 steps, written from 8 devices ...
        checkpoint.save_train_state(mngr, state, {"devices": 8})
        mngr.wait_until_finished()
        result["third_on_8"] = float(step(state, gb)[1]["loss"])
    else:  # ... restored onto 1 device (digest-checked) takes the same third step there
        restored, meta = checkpoint.restore_train_state(mngr, fresh_state()[1])
        devices_of = {d for x in jax.tree.leaves(restored.params) for d in x.sharding.device_set}
        result["resume"] = {"devices": len(devices_of), "meta": meta["devices"],
                            "third_on_1": float(step(restored, gb)[1]["loss"])}
    mngr.close()
print(json.dumps(result))
"""


def _concat(tensors: list) -> np.ndarray:
    return np.concatenate([np.asarray(t) for t in tensors])


def test_eight_devices_equal_one_device():
    """One global batch of 8 split over 8 devices computes the 1-device step: the same
    loss, gradients (the cross-device reduction), BatchNorm statistics, and the same loss
    after a real-learning-rate update.

    The step runs in float64 (a float64 state under jax_enable_x64, on XLA's float64
    ops), where the two agree to 9e-15 (gradients, relative L2) and 9e-12 in the worst
    tensor. In float32 this small randomly initialised network amplifies rounding through
    its BatchNorm backward so much that merely reversing the batch order on one device
    moves the gradients by 1.8e-3 (L2; 8 vs 1 devices: 4.3e-3), and how much depends on
    the host CPU's code generation (5e-6 on a Zen 4, measured): no float32 bound separates
    that from a bug on every host. A dropped or doubled reduction is off by O(1)
    (planted in the float32 version of this test: per-device gradients without the
    all-reduce -> grad_norm 12.47 vs 6.78).
    """
    proc = run(["-c", EQUIVALENCE], devices=8)
    check(proc)
    res = last_json(proc.stdout)
    (eight, eight_next), (one, one_next) = res["8"], res["1"]
    assert eight["loss"] == pytest.approx(one["loss"], rel=1e-12)
    assert eight["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-12)
    g8, g1 = _concat(eight["grads"]), _concat(one["grads"])
    global_rel = float(np.linalg.norm(g8 - g1) / np.linalg.norm(g1))
    assert global_rel < 1e-11, f"gradients differ across topologies: {global_rel:.2e} (L2)"
    floor = 1e-5 * float(np.abs(g1).max())  # biases before BatchNorm: zero up to rounding
    worst = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), floor))
        for a, b in zip(eight["grads"], one["grads"])
    )
    assert worst < 1e-8, f"a gradient tensor differs across topologies by {worst:.2e}"
    g1_stats, g8_stats = _concat(one["stats"]), _concat(eight["stats"])
    np.testing.assert_allclose(g8_stats, g1_stats, rtol=1e-10, atol=1e-12 * np.abs(g1_stats).max())
    assert eight_next["loss"] == pytest.approx(one_next["loss"], rel=1e-12)
    # The 8-device checkpoint restores onto 1 device (its SHA-256 checked on restore), and
    # the next step there is the one the 8 devices take (2 x 2 processes -> 1 device
    # through train.py, data position included: test_two_processes_then_one).
    resume = res["resume"]
    assert resume["devices"] == 1 and resume["meta"] == 8
    assert resume["third_on_1"] == pytest.approx(res["third_on_8"], rel=1e-12)


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_dist")
    write_dataset(str(out), num_train=32, num_val=4, size=128, seed=5)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# SGD with momentum for the topology comparisons: Adam turns float noise in near-zero
# gradients into full +-lr updates (measured: 2x2 vs 1x4 losses 8.5e-4 apart after the
# first full-lr AdamW step), SGD does not; its momentum is still state that a resume
# must restore.
SGD = "--config.schedule.optimizer={'name': 'SGD', 'lr': 0.01, 'momentum': 0.9}"
# Train losses of different topologies on the same global batches agree to float noise;
# a per-process augmentation seed moves step 1 by 12% (planted).
LOSS_RTOL = 1e-4
# A run resumed on 1 device (batch 8 on one device) continues within 2.6e-4 of the 4-device
# reference (measured); on the same topology a resume is bitwise (test_train.py). The first
# resumed loss shows the restored weights, the second the restored optimizer state.
RESUME_RTOL = 2e-3


# The train.py runs are test_train's runs on its small legacy NanoDet (with an EMA):
# topology handling is generic over the detector, and each topology and batch is its own
# program, whose compile is less than half NanoDet-Plus's (63 vs 147 s measured on a
# loaded 2-core machine). NanoDet-Plus's step, aux head included, is the one
# test_eight_devices_equal_one_device compares across topologies.
def dist_args(
    data, workdir, max_steps: int, batch: int, field: str = "batch_size_per_device"
) -> list[str]:
    """train.py arguments: test_train's tiny run with ``batch`` images per device, or in
    all (``field="global_batch_size"``)."""
    args = [a.replace("batch_size_per_device=4", f"{field}={batch}")
            for a in train_args(data, workdir, max_steps)]  # fmt: skip
    return ["train.py", *args, SGD]


@pytest.fixture(scope="module")
def one_host_reference(shapes_data, tmp_path_factory) -> dict[int, float]:
    """Train losses of steps 1-6 on 1 process x 4 devices (global batch 8 = 4 x 2)."""
    workdir = tmp_path_factory.mktemp("one_host") / "run"
    proc = run(dist_args(shapes_data, workdir, 6, 2), devices=4)
    check(proc)
    assert "global batch 8 = 4 devices x 2 per device (device.batch_size_per_device)" in (
        proc.stderr
    ), proc.stderr[-4000:]
    return train_losses(workdir)


def assert_losses_equal(
    losses: dict[int, float], reference: dict[int, float], what: str, rtol: float = LOSS_RTOL
):
    assert losses, what
    for step, loss in sorted(losses.items()):
        assert loss == pytest.approx(reference[step], rel=rtol), (what, step, losses)


def test_two_processes_then_one(shapes_data, tmp_path, one_host_reference):
    """2 processes x 2 devices train as 1 x 4; a SIGTERM to both (a preemption) stops them
    at one common step with one joint checkpoint, exit 0; it resumes on 1 device. The
    reference states 2 per device, this run the global batch of 8 (split over the devices
    of both processes), the resumed run 8 on its one device."""
    workdir = tmp_path / "run"
    base = [*dist_args(shapes_data, workdir, 6, 8, "global_batch_size"), "--log_samples"]
    port = free_port()
    logs = [tmp_path / f"p{i}.log" for i in range(2)]
    procs = []
    for i in range(2):
        with open(logs[i], "w") as err:  # files: a full stderr pipe would block a process
            procs.append(subprocess.Popen(
                [sys.executable, *base, "--coordinator", f"127.0.0.1:{port}",
                 "--num_processes", "2", "--process_id", str(i)],
                cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True,
                env={**os.environ, **XLA_OPS, "PYTHONPATH": REPO,
                     "XLA_FLAGS": xla_flags(2, train_run=True)},
            ))  # fmt: skip
    # Once jax.distributed is up on a process (XLA's preemption notifier holds SIGTERM from
    # then on), it is preempted; the processes are still building, so they agree on step 1.
    for i, p in enumerate(procs):
        deadline = time.monotonic() + TIMEOUT
        while f"process {i} of 2" not in logs[i].read_text() and p.poll() is None:
            assert time.monotonic() < deadline, logs[i].read_text()[-4000:]
            time.sleep(0.1)
        p.send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    errs = [log.read_text() for log in logs]
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-4000:]
    summaries = [last_json(out) for out in outs]
    stop = summaries[0]["final_step"]
    assert [s["stopped_by"] for s in summaries] == ["SIGTERM", "SIGTERM"], errs[0][-4000:]
    assert summaries[1]["final_step"] == stop and 1 <= stop <= 4, summaries
    assert f"stopped by SIGTERM after step {stop}" in errs[0], errs[0][-4000:]
    assert "global batch 8 = 4 devices x 2 per device (device.global_batch_size)" in errs[0]
    assert summaries[0]["params_sha256"] == summaries[1]["params_sha256"]
    # 2 hosts x 2 devices compute what 1 host x 4 devices does (the steps before the stop).
    two_hosts = train_losses(workdir)
    assert sorted(two_hosts) == list(range(1, stop + 1))
    assert_losses_equal(two_hosts, one_host_reference, "2 processes x 2 devices vs 1 x 4")
    # Within an epoch no image is seen by both processes (global batch 8 = 2 x 2 x 2).
    seen = []
    for i in range(2):
        records = [json.loads(line) for line in open(workdir / f"samples_p{i}.jsonl")]
        assert [r["step"] for r in records] == list(range(stop)), i  # both stopped there
        seen.append({r["epoch"]: set() for r in records})
        for r in records:
            seen[i][r["epoch"]].update(r["image_ids"])
    for epoch in seen[0]:
        assert not seen[0][epoch] & seen[1][epoch], epoch
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert steps == [s for s in (3,) if s < stop] + [stop]  # the stop's, written jointly
    # The 2-process checkpoint restores in a single-process run, which trains on exactly
    # as the uninterrupted run did.
    (workdir / "metrics.jsonl").unlink()
    single = run(dist_args(shapes_data, workdir, 6, 8), devices=1)
    check(single)
    assert "resumed from" in single.stderr and last_json(single.stdout)["final_step"] == 6
    resumed = train_losses(workdir)
    assert sorted(resumed) == list(range(stop + 1, 7))  # 2+ steps: the restored momentum
    assert_losses_equal(resumed, one_host_reference, "resumed on 1 device after 2 x 2", RESUME_RTOL)
