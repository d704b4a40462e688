"""Where a run begins: fresh, resumed from a checkpoint (``resume``), or warm-started from another
run's weights (``init_from``, warm_start.py), with FIRE (fire.py) applied once on top of either.

    open_start(t)              read the resume target's meta first (it fixes the run dir and the
                               model shape) and open the warm start; nothing is loaded yet
    check_start(start, ...)    the data and model config must match what is resumed / warm-started
    restore(ckpt, meta, ...)   weights, optimizer and in-backward state, RNG -> (step, tokens seen)
    fire_once(start, ...)      FIRE on the Muon matrices, unless this run's checkpoint records it
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import dcp as ckpt_dcp
from ..checkpoint import files as ckpt_io
from ..config import ModelConfig, TrainConfig
from ..errors import CheckpointError, UserError
from ..optim.factory import split_named_params
from .checkpointing import set_rng_state
from .fingerprint import check_resume_data
from .fire import apply_fire
from .warm_start import WarmStart, check_model_config, reset_momentum

_STATE_ERRORS = (ValueError, KeyError, RuntimeError, TypeError, AttributeError, IndexError)


@dataclass
class StartPoint:
    resume_ckpt: Path | None = None  # the resolved checkpoint dir this run continues
    resume_meta: dict[str, Any] | None = None
    warm: WarmStart | None = None
    fire_done: dict[str, Any] | None = None  # FIRE already applied in this run (meta's "fire")
    warm_record: dict[str, Any] | None = None  # meta's "warm_start": where the run began

    @property
    def loads_weights(self) -> bool:
        return self.resume_ckpt is not None or self.warm is not None


def open_start(t: TrainConfig, task: Any = None) -> StartPoint:
    """The resume target and the warm start of ``t`` (``task``: sft's, None: pretraining)."""
    start = StartPoint()
    if t.resume:
        start.resume_ckpt = ckpt_io.resolve_checkpoint(t.resume)
        start.resume_meta = ckpt_io.read_meta(start.resume_ckpt)
        if task is None and str((start.resume_meta.get("data") or {}).get("name", "")).startswith("sft:"):
            raise UserError(f"{start.resume_ckpt} is a chat fine-tune: continue it with "
                            f"nanochat-train sft --resume {t.resume}")
    start.warm = WarmStart.open(t.init_from) if t.init_from else None
    start.fire_done = (start.resume_meta or {}).get("fire")  # never again on resume
    start.warm_record = start.warm.record() if start.warm else (start.resume_meta or {}).get("warm_start")
    return start


def check_start(start: StartPoint, fingerprint: dict[str, Any], tokenizer_path: Path | None, model: ModelConfig,
                allow_data_change: bool, warn: Callable[[str], None], warm_ignore: tuple[str, ...] = ()) -> None:
    """What is resumed or warm-started must fit this run's data and model config (one line if not)."""
    if start.resume_meta is not None:
        check_resume_data(start.resume_meta.get("data_fingerprint"), fingerprint, start.resume_ckpt,
                          allow_data_change, warn)
        check_model_config(start.resume_meta, model, start.resume_ckpt)
    if start.warm is not None:
        start.warm.check_data(tokenizer_path)
        check_model_config(start.warm.meta, model, start.warm.ckpt, ignore=warm_ignore)


def restore(ckpt: Path, meta: dict[str, Any], model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
            device: torch.device, *, fsdp: bool = False, in_backward: Any = None) -> int:
    """Load checkpoint ``ckpt`` into the model and optimizers; returns its step."""
    if ckpt_dcp.is_dcp_checkpoint(ckpt):  # a sharded run's: reshards to this run's ranks (or one process)
        ckpt_dcp.load_dcp_checkpoint(ckpt, model, optimizers)
        state = ckpt_io.load_trainer_state(ckpt)
    elif fsdp:
        raise CheckpointError(f"checkpoint {ckpt} was saved by a ddp / single-process run: resume it with "
                              f"parallelism = 'ddp' (fsdp resumes the dcp/ checkpoints of fsdp runs)")
    else:
        state = restore_files(ckpt, model, optimizers)
    if in_backward is not None and "in_backward" in state:
        try:
            in_backward.load_state_dict(state["in_backward"])
        except _STATE_ERRORS as e:
            raise CheckpointError(f"checkpoint {ckpt}: in-backward state does not match ({e})") from None
    set_rng_state(state.get("rng", {}), device, ckpt)
    return int(meta["step"])


def restore_files(ckpt: Path, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
    """Weights and optimizer states of a ddp / single-process checkpoint; returns trainer.pt."""
    ckpt_io.load_model_weights(model, ckpt)
    state = ckpt_io.load_trainer_state(ckpt)
    saved = state.get("optimizers", [])
    if len(saved) != len(optimizers):
        raise CheckpointError(f"checkpoint {ckpt} holds {len(saved)} optimizer states, expected "
                              f"{len(optimizers)} (was it saved with another optimizer setup?)")
    # trainer.pt's structure is checked by load_trainer_state; what does not fit these
    # optimizers (a crafted or foreign file) is one line naming it, whatever torch raises
    try:
        for opt, sd in zip(optimizers, saved):
            opt.load_state_dict(sd)
    except _STATE_ERRORS as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {ckpt}: optimizer state does not match ({first})") from None
    return state


def fire_once(start: StartPoint, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], group_size: int,
              step: int, echo: Callable[[str], None]) -> None:
    """FIRE (fire.py) on the Muon matrices, once per run: a resumed run whose checkpoint records it
    keeps its weights; on resume the orthogonalised matrices' momentum is reset. Records it in
    ``start.fire_done`` (every later checkpoint's meta)."""
    if start.fire_done is not None:
        echo(f"fire: already applied at step {start.fire_done['step']} of this run (checkpoint meta); not again")
        return
    muon, _ = split_named_params(model)
    report = apply_fire(muon, group_size)
    if start.resume_ckpt is not None:
        reset_momentum(optimizers, [p for _, p in muon])
    start.fire_done = {"step": step, "via": "resume" if start.resume_ckpt is not None else "init_from",
                       **report.to_dict()}
    echo(report.line())
