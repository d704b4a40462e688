"""Stop on a signal at a step boundary, so the checkpoint holds exactly the updates it is named for.

SIGTERM (what schedulers and ``docker stop`` send before killing), SIGUSR1 (what SLURM sends ahead
of the time limit with ``--signal``) and SIGINT (Ctrl-C) only *request* a stop: the handler records
the signal, and the trainer looks at the request after each finished step (update, logging,
evaluation, interval checkpoint). So the checkpoint written on the way out is labelled with the last
step whose update is in the weights, and ``--resume`` continues exactly. An exception raised from the
handler instead could land anywhere: between two optimizers' ``step()`` calls (half an update), or
after the update but before the step counter moved (a checkpoint named N-1 holding step N).

A second Ctrl-C raises ``KeyboardInterrupt`` at once: the user insists, and nothing is saved (the
step in flight may be half applied); the last interval checkpoint is still there.

Under ``torchrun`` the ranks must stop at the same step, or the ones still training wait forever in
the next collective: the trainer ORs the request over ranks each step (``Runtime.any_rank``).
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

from ..errors import UserError

#: Exit status of a run stopped by a signal after saving its checkpoint: EX_TEMPFAIL of sysexits.h,
#: "temporary failure, try again", which is what a requeue wrapper should do (``--resume RUN``).
EXIT_PREEMPTED = 75

STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name)
)


class Preempted(UserError):
    """The run stopped on a signal and saved its checkpoint; ``--resume`` continues it."""

    exit_status = EXIT_PREEMPTED
    prefix = "stopped"


class StopRequests:
    """Context manager: while inside, SIGTERM / SIGINT / SIGUSR1 set :attr:`signum` instead of killing.

    Handlers can only be installed from the main thread; elsewhere (a trainer run from a worker
    thread) the process keeps its default handling and :attr:`requested` stays false.
    """

    def __init__(self, announce: bool = True) -> None:
        self.signum: int | None = None
        self._announce = announce
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # second Ctrl-C: stop now, without a checkpoint
            return  # already stopping
        self.signum = signum
        if self._announce:
            # os.write, not print: a handler that prints while the interrupted code is printing (the
            # progress bar) fails with "reentrant call" on the buffered stream
            os.write(2, f"\nreceived {signal.Signals(signum).name}: stopping after the current step and saving "
                        f"a checkpoint (Ctrl-C again to stop at once without one)\n".encode())

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous.clear()
