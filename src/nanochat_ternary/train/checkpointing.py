"""What a trainer writes into a checkpoint besides weights and optimizer state: ``meta.json``'s
record of the run and the RNG states (shared by the ddp and the fsdp save paths)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError


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
