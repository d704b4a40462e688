"""What a trainer writes into a checkpoint besides weights and optimizer state: ``meta.json``'s
record of the run and the RNG states (shared by the ddp and the fsdp save paths)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..checkpoint import files as ckpt_io
from ..config import Config
from ..errors import CheckpointError, UserError
from .lock import RunLock
from .runtime import Runtime


def checkpoint_meta(trainer: Any, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """``meta.json`` of ``trainer``'s checkpoint ``step`` (a :class:`~.trainer.Trainer`)."""
    config = trainer.cfg.to_dict()
    config["training"]["allow_data_change"] = False  # an override is for the resume that gave it
    # acts done once at the start of this run; meta's warm_start / fire record them
    config["training"].update(init_from="", fire=False)
    return {
        "config": config,
        "tokens_seen": trainer.tokens_seen,
        "data_position": {"step": step, "epoch": trainer.batches.epoch_of(step),
                          "seed": trainer.cfg.training.seed, "world_size": trainer.rt.world_size},
        "total_steps": trainer.total_steps,
        "data": trainer.data.describe(),
        "data_fingerprint": trainer.fingerprint,
        "metrics": metrics,
        "torch_version": torch.__version__,
        **({"warm_start": trainer.warm_record} if trainer.warm_record else {}),
        **({"fire": trainer.fire_done} if trainer.fire_done else {}),
    }


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG states (the CUDA one on CUDA)."""
    rng: dict[str, torch.Tensor] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def set_rng_state(rng: dict[str, torch.Tensor], device: torch.device, ckpt: Path | None = None) -> None:
    """Restore the RNG state saved in trainer.pt; an unusable one is a one-line CheckpointError."""
    try:
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: trainer.pt's RNG state is unusable ({e})") from None


def choose_run_dir(cfg: Config, rt: Runtime, resume_ckpt: Path | None, echo: Callable[[str], None],
                   warn: Callable[[str], None]) -> tuple[Path, RunLock | None]:
    """The run dir (``checkpoint_dir``, else the dir resumed from, else ``runs/<preset>-<data>-<time>``),
    made writable and locked by the main rank, with a crashed save's leftovers removed. A dir that
    already holds checkpoints is refused unless this run resumes from it. Returns it and the lock."""
    t = cfg.training
    if t.checkpoint_dir:
        run_dir = Path(t.checkpoint_dir)
    elif resume_ckpt is not None:
        run_dir = resume_ckpt.parent
    else:
        data_name = t.dataset or (Path(t.data_path).stem if t.data_path else "stdlib")
        name = f"{cfg.preset or 'custom'}-{data_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if rt.distributed:  # every rank must agree on the name
            box = [name]
            dist.broadcast_object_list(box, src=0)
            name = box[0]
        run_dir = Path("runs") / name
    if not rt.is_main:
        return run_dir, None
    ckpt_io.ensure_writable_dir(run_dir)
    lock = RunLock(run_dir)
    lock.acquire(warn=warn)
    try:
        stale = ckpt_io.remove_stale_temp(run_dir)  # safe: no other run writes here
        if stale:
            echo(f"removed {len(stale)} unfinished checkpoint write(s) left by a crash: {', '.join(stale)}")
        existing = ckpt_io.list_checkpoints(run_dir)
        resuming_here = resume_ckpt is not None and resume_ckpt.parent.resolve() == run_dir.resolve()
        if existing and not resuming_here:
            raise UserError(f"checkpoint dir {run_dir} already holds checkpoints (latest {existing[-1].name}); "
                            f"continue it with --resume {run_dir} or choose another --checkpoint-dir")
    except BaseException:
        lock.release()
        raise
    return run_dir, lock
