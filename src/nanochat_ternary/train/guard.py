"""Non-finite steps: skip the update, count it, and stop after too many in a row.

A NaN or inf in the loss or the gradient, applied, poisons every weight it touches (and the Muon /
AdamW moments, which then poison every later step), and the next checkpoint saves the wreck. One bad
batch or one overflow should cost one step, not the run: the trainer skips the optimizer update when
the (all-reduced) loss or global grad norm is not finite, leaving weights and optimizer state as
they were. A run that keeps producing non-finite steps has diverged; skipping forever would only
burn compute, so after ``max_consecutive_skips`` in a row it stops with one line naming the step
and the last good checkpoint (exit status 3).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

EXIT_DIVERGED = 3


class Diverged(UserError):
    """Too many consecutive non-finite steps; the last good checkpoint is named in the message."""

    exit_status = EXIT_DIVERGED


class NonFiniteGuard:
    """Bookkeeping of skipped steps: total, current run of consecutive skips, and where it began."""

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.total = 0
        self.in_a_row = 0
        self.first_of_run = 0

    def record(self, step: int, skipped: bool) -> None:
        if not skipped:
            self.in_a_row = 0
            return
        self.total += 1
        if self.in_a_row == 0:
            self.first_of_run = step
        self.in_a_row += 1

    def skip_line(self, step: int, loss: float, grad_norm: float) -> str:
        return (f"step {step:>6} | non-finite loss {loss} / grad norm {grad_norm}: update skipped "
                f"({self.in_a_row} in a row, stop at {self.max_consecutive})")

    @property
    def exhausted(self) -> bool:
        return self.in_a_row >= self.max_consecutive

    def diverged(self, step: int, last_checkpoint: Path | None) -> Diverged:
        span = f"steps {self.first_of_run}-{step}" if self.in_a_row > 1 else f"step {step}"
        last = str(last_checkpoint) if last_checkpoint is not None else "none saved yet"
        return Diverged(f"training diverged: {self.in_a_row} consecutive steps had a non-finite loss or gradient "
                        f"({span}, all skipped; max_consecutive_skips = {self.max_consecutive}); stopped at step "
                        f"{step}; last good checkpoint: {last} (resume from it with a lower --set lr=... "
                        f"or --set adam_lr=...)")
