"""Stopping a training stage early on request, so that a Slurm job about to reach its time limit
(or be preempted) leaves a step checkpoint and is requeued. Torch-free: the executor imports it.

A request is SIGUSR1 delivered to a process that called `install` (the executor, and every rank
that `stage_main` starts), or the file ``scratch/<id>/STOP``, which the executor writes when *it*
gets the signal: `#SBATCH --signal=B:USR1@...` signals only the batch shell (which `exec`s
`cascadec run`), and the ranks of a launched stage are grandchildren, some on other nodes; a file
in the shared workspace reaches all of them. The training loop (`training/train.py`) checks at
each step boundary, agrees across ranks (one rank may see the request a step before another),
writes a step checkpoint and raises `Preempted`.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path

STOP_FILE = "STOP"
SIGNAL = signal.SIGUSR1
_requested = threading.Event()


class Preempted(Exception):
    """A stage stopped on request after writing the step checkpoint of ``step``; a rerun resumes."""

    def __init__(self, step: int):
        super().__init__(f"stopped on request (SIGUSR1) after its step checkpoint of step {step}")
        self.step = step


def install(then: Callable[[], None] | None = None) -> None:
    """Make SIGUSR1 a stop request in this process (instead of killing it), calling ``then`` too.
    Only the main thread can install a handler; elsewhere this does nothing."""
    def handle(signum, frame):
        _requested.set()
        if then is not None:
            then()

    if threading.current_thread() is threading.main_thread():
        signal.signal(SIGNAL, handle)


def signalled() -> bool:
    """Whether this process got the signal (then a STOP file is no stale leftover)."""
    return _requested.is_set()


def requested(scratch: Path) -> bool:
    """Whether this process got the signal, or the executor left a STOP file in ``scratch``."""
    return _requested.is_set() or (Path(scratch) / STOP_FILE).exists()


def clear(scratch: Path | None = None) -> None:
    """Forget a request: this process's signal, and the STOP file in ``scratch`` if given."""
    _requested.clear()
    if scratch is not None:
        (Path(scratch) / STOP_FILE).unlink(missing_ok=True)
