"""Stopping a training run cleanly on SIGTERM / SIGINT (a preemption, Ctrl-C).

The loop asks :meth:`StopOnSignal.requested` after every step; once it says yes, the loop
writes that step's checkpoint, waits for orbax's asynchronous write and returns, so the
process exits 0 and the same command resumes from the workdir.

- One process: a Python handler records the signal; the next step boundary stops.
- Several processes (``jax.distributed``): every process must stop at the same step, or
  the joint checkpoint would mix steps (or hang in its collectives).
  ``jax.distributed.initialize`` installs XLA's preemption notifier as the C handler of
  SIGTERM: a SIGTERM on any process is broadcast through the coordination service, the
  processes agree on (the largest step any of them has reported) + 1, and
  ``multihost_utils.reached_preemption_sync_point(step)`` is True on every process at
  that step only. A Python SIGTERM handler would replace XLA's (both use sigaction), so
  none is installed there; SIGINT is forwarded to the notifier as a SIGTERM to self.

A second SIGINT kills at once (the default action is restored after the first: Ctrl-C
twice). A repeated SIGTERM is ignored: schedulers may signal a process and its group.

``grace_s`` bounds how long a stop may take: from the signal (several processes: from
the agreed step) until the checkpoint is written. Past it, the process logs what was
lost and exits with 128 + the signal number, before the scheduler's SIGKILL would end
it without a word.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType, TracebackType

import jax

log = logging.getLogger("nanodet_jax")
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal:
    """Context manager: installs the handlers (main thread only) and restores the previous
    ones on exit, so an in-process caller (a test, a notebook) keeps its own."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = float(grace_s)
        self.signum: int | None = None  # the first stop signal seen (None: none yet)
        self._previous: dict[int, object] = {}
        self._watchdog: threading.Timer | None = None
        self._sync = False  # several processes: stop at the step they agree on

    def __enter__(self) -> StopOnSignal:
        self._sync = jax.distributed.is_initialized()
        if self._sync and not jax.config.jax_enable_preemption_service:
            # No notifier, no agreement: stopping each process on its own signal would
            # leave the others waiting in the step's collectives. Signals kill, as before.
            log.warning("jax_enable_preemption_service is off: SIGTERM / SIGINT kill training")
            self._sync = False
            return self
        if threading.current_thread() is not threading.main_thread():
            # Python installs handlers from the main thread only; XLA's notifier still works.
            log.debug("not the main thread: no SIGINT / SIGTERM handlers of ours")
            return self
        # Several processes: SIGTERM stays XLA's preemption notifier (see the module doc).
        ours = (signal.SIGINT,) if self._sync else SIGNALS
        for signum in ours:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum or signal.SIGTERM).name

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            log.warning(f"{signal.Signals(signum).name} again: already stopping")
            return
        self.signum = signum
        # A second Ctrl-C is the user insisting: the default action, termination.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        name = signal.Signals(signum).name
        if self._sync:
            log.warning(f"{name}: asking every process to stop at a common step")
            os.kill(os.getpid(), signal.SIGTERM)  # XLA's notifier broadcasts it
            return
        limit = f"within {self.grace_s:g} s" if self.grace_s > 0 else "no time limit"
        log.warning(
            f"{name}: finishing this step, then writing its checkpoint "
            f"({limit}; Ctrl-C again kills at once)"
        )
        self._start_watchdog()

    def _start_watchdog(self) -> None:
        if self.grace_s <= 0 or self._watchdog is not None:
            return
        self._watchdog = threading.Timer(self.grace_s, self._expired)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _expired(self) -> None:
        log.error(
            f"stop signal: the step and its checkpoint did not finish within "
            f"checkpoint.preemption_grace_s={self.grace_s:g} s; exiting without it (the "
            "run resumes from the previous checkpoint)"
        )
        logging.shutdown()
        os._exit(128 + (self.signum or signal.SIGTERM))

    def requested(self, step: int) -> bool:
        """Whether to stop after ``step`` (the number of steps done). Call it after every
        step, on every process, with consecutive steps: the multi-process agreement
        counts the calls."""
        if self._sync:
            from jax.experimental import multihost_utils

            if not multihost_utils.reached_preemption_sync_point(step):
                return False
            if self.signum is None:
                self.signum = signal.SIGTERM  # this process may not have been signalled
            self._start_watchdog()
            return True
        return self.signum is not None
