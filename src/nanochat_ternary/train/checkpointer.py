"""The trainer's checkpointer: writes the training state of a step into the run dir, and decides
what a refused write means (an interval save warns and goes on; the final or a stop-request save
is a one-line error). What goes into the files is checkpointing.py's (meta, RNG) and
checkpoint/files.py's / checkpoint/dcp.py's (weights, optimizer state) job; this is the when.

    save(step)          every rank; the main rank writes (or, under fsdp, every rank its shards)
    save_or_warn(step)  the interval checkpoint (CheckpointPolicy decides the interval)
    save_on_exit(step)  the end of the run or a stop request: reuses this very step's interval save
    preempted(step)     save_on_exit, then the Preempted error that says how to continue
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import dcp as ckpt_dcp
from ..checkpoint import files as ckpt_io
from ..errors import CheckpointError
from .checkpointing import rng_state
from .runtime import Runtime
from .signals import Preempted

MetaFn = Callable[[int, dict[str, Any]], dict[str, Any]]  # (step, last metrics) -> meta.json


class Checkpointer:
    """``last`` is the newest good checkpoint (the resumed one until this run saves), named
    whenever something fails. ``make_model`` builds an empty CPU model (the fsdp save's full copy)."""

    def __init__(self, run_dir: Path, rt: Runtime, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
                 meta: MetaFn, *, in_backward: Any = None, fsdp: bool = False, keep_last: int = 3,
                 resumed_from: Path | None = None, tokenizer_path: Path | None = None,
                 make_model: Callable[[], torch.nn.Module] | None = None, command: str = "train",
                 warn: Callable[[str], None] = lambda _m: None) -> None:
        self.run_dir, self.rt, self.model, self.optimizers = run_dir, rt, model, optimizers
        self.meta, self.in_backward, self.fsdp, self.keep_last = meta, in_backward, fsdp, keep_last
        self.protect = (resumed_from,) if resumed_from else ()  # pruning never deletes what we resumed from
        self.tokenizer_path, self.make_model = tokenizer_path, make_model
        self.command, self.warn = command, warn
        self.last: Path | None = resumed_from

    def save(self, step: int, metrics: dict[str, Any]) -> Path | None:
        """Write checkpoint ``step`` (main rank) and wait for it on every rank. Raises
        ``CheckpointWriteError`` when the filesystem refuses and ``CheckpointError`` on NaN/inf."""
        if self.fsdp:  # every rank writes its shards (checkpoint/dcp.py)
            path = ckpt_dcp.save_dcp_checkpoint(self.run_dir, step, self.model, self.optimizers,
                                                {"rng": rng_state(self.rt.device)}, self.meta(step, metrics),
                                                make_model=self.make_model, tokenizer_path=self.tokenizer_path,
                                                keep_last=self.keep_last, protect=self.protect)
            self.last = path
            return path if self.rt.is_main else None
        path = None
        err: CheckpointError | None = None
        if self.rt.is_main:
            state = {"optimizers": [opt.state_dict() for opt in self.optimizers], "rng": rng_state(self.rt.device)}
            if self.in_backward is not None:
                state["in_backward"] = self.in_backward.state_dict()
            try:
                path = ckpt_io.save_checkpoint(self.run_dir, step, self.model, state, self.meta(step, metrics),
                                               tokenizer_path=self.tokenizer_path, keep_last=self.keep_last,
                                               protect=self.protect)
                self.last = path
            except CheckpointError as e:
                err = e
        self.rt.barrier()  # after the main rank's attempt, failed or not, so no rank waits forever
        if err is not None:
            raise err
        return path

    def save_or_warn(self, step: int, metrics: dict[str, Any]) -> None:
        """An interval checkpoint the disk refuses does not end the run: the previous checkpoint is
        intact, the partial one is gone, and the next interval tries again (a full disk is often
        freed by the user or by ``keep_last_checkpoints`` pruning). Only the final save is fatal."""
        try:
            self.save(step, metrics)
        except ckpt_io.CheckpointWriteError as e:
            self.warn(f"warning: {e}; training goes on and retries at the next interval "
                      f"(last checkpoint: {self.last or 'none yet'})")

    def save_on_exit(self, step: int, metrics: dict[str, Any], why: str) -> Path:
        """The checkpoint at the end of a run or on a stop request; failure is a one-line error."""
        if self.last is not None and self.last.name == ckpt_io.step_dir_name(step) and self.last.parent == self.run_dir:
            return self.last  # the interval checkpoint of this very step
        try:
            path = self.save(step, metrics)
        except ckpt_io.CheckpointWriteError as e:
            raise CheckpointError(f"{why}: {e}; the last checkpoint is {self.last or 'none'}") from None
        return path if path is not None else self.run_dir / ckpt_io.step_dir_name(step)

    def preempted(self, step: int, signal_name: str, metrics: dict[str, Any]) -> Preempted:
        """Save the checkpoint of ``step`` (the last finished one) and say how to continue."""
        why = f"{signal_name or 'a signal on another rank'} at step {step}"
        path = self.save_on_exit(step, metrics, f"stopped by {why}")
        return Preempted(f"{why}: checkpoint saved in {path}; continue with: "
                         f"nanochat-train {self.command} --resume {self.run_dir}")
