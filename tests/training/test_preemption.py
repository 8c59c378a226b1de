"""The stop-signal handling of training (training/preemption.py) on its own: a signal
requests a stop, a second Ctrl-C kills at once, the grace bounds a stop, the caller's
handlers come back. (train.py stopping on SIGTERM with a checkpoint and resuming bitwise:
tests/training/test_train.py; on two processes: tests/training/test_distributed.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from nanodet_jax.training import preemption
from tests.conftest import REPO


def wait_for(predicate, timeout: float = 5.0) -> bool:
    """Python runs a signal handler between bytecodes of the main thread: soon, not at once."""
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_requests_a_stop_and_handlers_come_back(signum):
    before = {s: signal.getsignal(s) for s in preemption.SIGNALS}
    with preemption.StopOnSignal(grace_s=0) as stop:
        assert not stop.requested(1)
        os.kill(os.getpid(), signum)
        assert wait_for(lambda: stop.requested(2)), "the signal did not request a stop"
        assert stop.signal_name == signal.Signals(signum).name
        # A second Ctrl-C gets the default action (termination), not this handler.
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    assert {s: signal.getsignal(s) for s in preemption.SIGNALS} == before


# A process holding StopOnSignal that signals itself; what follows is the case's.
SCRIPT = """
import logging, os, signal, sys, time
logging.basicConfig(level=logging.INFO)
from nanodet_jax.training.preemption import StopOnSignal
with StopOnSignal(grace_s=float(sys.argv[1])) as stop:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.5)
    if sys.argv[2] == "twice":
        os.kill(os.getpid(), signal.SIGINT)
    time.sleep(20)  # a step or a checkpoint that never ends
print("not stopped")
"""


@pytest.mark.parametrize(
    "grace, twice, status, line",
    [
        # Ctrl-C twice: killed by the second SIGINT at once (no grace to wait out).
        (60, "twice", -signal.SIGINT, "Ctrl-C again kills at once"),
        # The stop did not finish within the grace: exit 128 + SIGINT, saying so.
        (1, "once", 128 + signal.SIGINT, "did not finish within checkpoint.preemption_grace_s=1 s"),
    ],
)
def test_second_ctrl_c_kills_and_the_grace_bounds_a_stop(grace, twice, status, line):
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(grace), twice], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == status, proc.stderr[-2000:]
    assert line in proc.stderr and "not stopped" not in proc.stdout, proc.stderr[-2000:]
    assert time.monotonic() - t0 < 15  # the 20 s sleep was cut short
