"""Progress for people and for log files.

On a terminal a stage shows a tqdm bar. Anywhere else (a Slurm job's output file, CI, a pipe,
`tee`) a bar's every refresh would become text: tens of kilobytes of carriage returns per
stage. There a stage writes one plain line each time it passes another tenth of its work, or a
minute after its last line, and one at the end.

`quiet_libraries()` does the same for the libraries a stage calls (transformers, datasets,
huggingface_hub, lm-evaluation-harness): outside a terminal it sets `TQDM_DISABLE=1`, which
tqdm reads at every bar's creation, in this process and every process it starts.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

EVERY_FRACTION = 0.1
EVERY_SECONDS = 60.0


def interactive() -> bool:
    """Whether progress goes to a person: stderr is a terminal and bars are not turned off."""
    return sys.stderr.isatty() and os.environ.get("TQDM_DISABLE", "").lower() not in ("1", "true", "yes")


QUIET_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


def quiet_libraries() -> None:
    """Outside a terminal, no library draws a progress bar, here and in child processes.

    The environment reaches libraries imported later and every child process; a library this
    process already imported is told through its own switch."""
    if interactive():
        return
    os.environ.update(QUIET_ENV)
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "datasets" in sys.modules:
        sys.modules["datasets"].utils.logging.disable_progress_bar()


class Progress:
    """A bar on a terminal, plain lines through ``log`` elsewhere; ``enabled=False`` is silent."""

    def __init__(self, total: int, *, what: str, unit: str = "step", initial: int = 0,
                 log: Callable[[str], None] | None = None, enabled: bool = True):
        self.total, self.done, self.what, self.unit = total, initial, what, unit
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))  # stdout may be a result
        self.enabled = enabled
        self.bar = None
        if enabled and interactive():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, desc=what)
        self.next_at = (int(initial / max(total, 1) / EVERY_FRACTION) + 1) * EVERY_FRACTION
        self.last = time.monotonic()
        self.postfix: dict = {}

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        self.postfix = postfix
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
            return
        fraction = self.done / max(self.total, 1)
        now = time.monotonic()
        if (fraction >= self.next_at - 1e-12 or now - self.last >= EVERY_SECONDS) and self.done < self.total:
            self._line()
            while self.next_at <= fraction + 1e-12:
                self.next_at += EVERY_FRACTION
            self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self._line()

    def _line(self) -> None:
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        pct = 100 * self.done / max(self.total, 1)
        self.log(f"{self.what}: {self.unit} {self.done:,}/{self.total:,} ({pct:.0f}%){extra}")
