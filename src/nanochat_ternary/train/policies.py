"""What the training loop does after each step, and when: one small policy per concern.

    for step in range(start, total):
        out = train_step(step)                      (trainer.py)
        log.due(out) or evaluate.due(out)  ->  a metrics record (+ val loss, + the chosen tasks)
        stop.diverged                      ->  raise: too many non-finite steps in a row (guard.py)
        checkpoint.due(out.done)           ->  an interval checkpoint (checkpointer.py)
        stop.signalled(out.done)           ->  save and raise Preempted (signals.py)

Each policy gets only the numbers it decides with (intervals, the run's first and last step) and
the callables it runs, not the whole config, so its timing is testable on its own
(tests/test_trainer.py). ``out.done`` is the step count the weights hold after the step (its
update, or its skip).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .guard import NonFiniteGuard
from .signals import StopRequests


@dataclass(frozen=True)
class StepOutcome:
    done: int  # the step the weights now hold (step index + 1)
    loss: float  # plain next-token CE, mean over ranks
    grad_norm: float
    skipped: bool  # non-finite loss or grad norm: the update was skipped


class LogPolicy:
    """A record every ``interval`` steps, on the first step this process runs, the last step and
    every skipped one; throughput (``tok_per_s``) and data wait are over the steps since the last
    record. Time the loop spends on something that is not training (a task evaluation) is taken
    out with :meth:`exclude`, so it never blurs ``tok_per_s``."""

    def __init__(self, interval: int, first_step: int, total_steps: int, tokens_per_step: int,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.interval, self.first, self.total, self.tokens_per_step = interval, first_step, total_steps, tokens_per_step
        self.clock = clock
        self.t0 = self.since = clock()
        self.steps, self.wait = 0, 0.0

    def due(self, out: StepOutcome) -> bool:
        d = out.done
        return d % self.interval == 0 or d == self.total or d == self.first + 1 or out.skipped

    def step_done(self, data_wait_s: float) -> None:
        self.steps += 1
        self.wait += data_wait_s

    def exclude(self, seconds: float) -> None:
        self.since += seconds

    def record(self, out: StepOutcome, lr: float, tokens_seen: int, extra: dict[str, Any]) -> dict[str, Any]:
        """The record of ``out`` (``extra`` after the timing fields); starts the next interval."""
        now = self.clock()
        rec: dict[str, Any] = {
            "step": out.done, "loss": out.loss, "lr": lr, "grad_norm": out.grad_norm,
            "tok_per_s": self.steps * self.tokens_per_step / max(now - self.since, 1e-9),
            "elapsed_s": now - self.t0,
            "tokens_seen": tokens_seen,
            # mean seconds per step spent waiting for the batch (since the last record)
            "data_wait_s": self.wait / max(self.steps, 1),
            **extra,
        }
        self.since, self.steps, self.wait = now, 0, 0.0
        return rec


class EvalPolicy:
    """The val loss every ``interval`` steps (0: only at the end) and at the last step, never once
    the guard has stopped the run; with ``tasks``, the chosen task evaluation next to it (its
    fields and its own time, ``task_eval_s``)."""

    def __init__(self, interval: int, total_steps: int, validate: Callable[[], tuple[float, float | None]],
                 tasks: Callable[[], dict[str, float]] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.interval, self.total, self.validate, self.tasks, self.clock = interval, total_steps, validate, tasks, clock

    def due(self, out: StepOutcome, stopping: bool = False) -> bool:
        d = out.done
        return ((self.interval > 0 and d % self.interval == 0) or d == self.total) and not stopping

    def run(self) -> tuple[dict[str, Any], float]:
        """``({val_loss, val_bpb, task fields...}, seconds spent on the tasks)``."""
        val_loss, val_bpb = self.validate()
        fields: dict[str, Any] = {"val_loss": val_loss, "val_bpb": val_bpb}
        if self.tasks is None:
            return fields, 0.0
        t0 = self.clock()
        fields.update(self.tasks())
        spent = self.clock() - t0
        fields["task_eval_s"] = spent
        return fields, spent


class CheckpointPolicy:
    """An interval checkpoint every ``interval`` steps (0: none); the last step's checkpoint is the
    final save's, written once the loop ends."""

    def __init__(self, interval: int, total_steps: int) -> None:
        self.interval, self.total = interval, total_steps

    def due(self, done: int) -> bool:
        return self.interval > 0 and done % self.interval == 0 and done != self.total


class StopPolicy:
    """The run stops before ``total_steps`` when the guard has seen ``max_consecutive_skips``
    non-finite steps in a row, or when a signal asked on any rank (``any_rank``: the same decision
    everywhere, a collective under torchrun; asked after every step but the last)."""

    def __init__(self, guard: NonFiniteGuard, stops: StopRequests, total_steps: int,
                 any_rank: Callable[[bool], bool] = lambda flag: flag) -> None:
        self.guard, self.stops, self.total, self.any_rank = guard, stops, total_steps, any_rank

    def record(self, out: StepOutcome) -> None:
        self.guard.record(out.done, out.skipped)

    @property
    def diverged(self) -> bool:
        return self.guard.exhausted

    def signalled(self, done: int) -> bool:
        return done < self.total and self.any_rank(self.stops.requested)
