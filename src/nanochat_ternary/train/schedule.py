"""Learning-rate schedule: linear warmup, a long flat stretch, then linear decay ("WSD").

Warmup-stable-decay keeps the peak rate for most of the run and anneals at the end, which is what
Muon-trained nanochat-style models use; unlike cosine it does not need to know the run length to
stay at peak, and the decay tail is where most of the final loss improvement lands.

    factor(s) = (s + 1) / warmup                          for s < warmup
              = 1                                         for warmup <= s < decay_start
              = 1 - (1 - min_ratio) * (s - decay_start) / (total - decay_start)   after
"""

from __future__ import annotations

import torch


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay_start_frac: float,
              min_lr_ratio: float = 0.0) -> float:
    """Multiplier applied to every param group's ``initial_lr`` at ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_start = max(warmup_steps, int(decay_start_frac * total_steps))
    if step < decay_start or total_steps <= decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / (total_steps - decay_start))
    return 1.0 - (1.0 - min_lr_ratio) * progress


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            lr = float(group["initial_lr"]) * factor
            if isinstance(group["lr"], torch.Tensor):  # some optimizers (torchao's) keep lr as a tensor
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
