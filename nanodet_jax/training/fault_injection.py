"""Deliberate ``kill -9`` at named points of a training run, for the fault-injection tests
(``tests/training/test_kill.py``, ``tools/kill_suite.py``).

``NANODET_JAX_KILL_AT=<point>:<step>`` makes the process send itself SIGKILL, the signal
nothing can catch, when it reaches ``point`` at ``step``:

- ``step``: step ``step`` has been dispatched and its computation is in flight;
- ``checkpoint``: the asynchronous write of step ``step``'s checkpoint has started;
- ``eval``: the evaluation after step ``step`` has computed its metrics, but neither their
  record in metrics.jsonl nor ``best/`` exist yet.

A named point is what makes each such crash reproducible; kills at arbitrary moments come
from outside the process (the tests also do that). Unset, this costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "NANODET_JAX_KILL_AT"
POINTS = ("step", "checkpoint", "eval")


def kill_point(point: str, step: int) -> None:
    """SIGKILL this process if ``$NANODET_JAX_KILL_AT`` names ``point`` at ``step``."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, at = spec.partition(":")
    if name not in POINTS or not at.isdigit():
        raise ValueError(f"{ENV}={spec!r}: expected <point>:<step> with point one of {POINTS}")
    if name == point and int(at) == step:
        os.kill(os.getpid(), signal.SIGKILL)
