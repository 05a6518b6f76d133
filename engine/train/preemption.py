"""Stopping on request: SIGUSR1 (SLURM's warning before a time limit or preemption) and SIGTERM.

The handler only sets a flag; the loop acts on it at the next step boundary, where all ranks
agree (one all-reduce), save one checkpoint together and exit with ``EXIT_PREEMPTED`` so the
job is requeued and resumes.
"""

from __future__ import annotations

import signal


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None

    def install(self) -> None:
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:  # only sets a flag: no I/O in a signal handler
        self.signal_name = signal.Signals(signum).name

    def ignore_further(self) -> None:
        """Once the run has stopped: a late signal (srun's --kill-on-bad-exit sends TERM while the
        process tears down, when Python has restored the default handlers) must not turn the exit
        status into 143."""
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
