"""Learning-rate schedules: "wsd" (the default) and "bitnet" (``lr_schedule``).

"wsd": linear warmup, a long flat stretch, then linear decay.

Warmup-stable-decay keeps the peak rate for most of the run and anneals at the end, which is what
Muon-trained nanochat-style models use; unlike cosine it does not need to know the run length to
stay at peak, and the decay tail is where most of the final loss improvement lands.

    factor(s) = (s + 1) / warmup                          for s < warmup
              = 1                                         for warmup <= s < decay_start
              = 1 - (1 - min_ratio) * (s - decay_start) / (total - decay_start)   after

"bitnet": BitNet b1.58's two-stage recipe ("The Era of 1-bit LLMs: Training Tips, Code and FAQ";
BitNet b1.58 2B4T): ternary weights move only when an update crosses a rounding threshold, so the
first half runs at a high rate; at mid-training the rate drops, and weight decay is switched off,
so that the latent weights settle instead of flipping back and forth across thresholds::

    factor(s) = (s + 1) / warmup                                    for s < warmup
              = 1                                                   for warmup <= s < mid
              = r2 * (1 - (1 - min_ratio) * (s - mid) / (total - mid))  for s >= mid
    wd_factor(s) = 1 before mid, 0 from mid on

with ``mid = max(warmup, int(bitnet_switch_frac * total))`` and ``r2 = bitnet_stage2_ratio``.
"""

from __future__ import annotations

import torch

from ..config import TrainConfig


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


def bitnet_lr_factor(step: int, total_steps: int, warmup_steps: int, switch_frac: float,
                     stage2_ratio: float, min_lr_ratio: float = 0.0) -> float:
    """The "bitnet" schedule's multiplier at ``step`` (0-based); see the module docstring."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    mid = max(warmup_steps, int(switch_frac * total_steps))
    if step < mid or total_steps <= mid:
        return 1.0
    progress = min(1.0, (step - mid) / (total_steps - mid))
    return stage2_ratio * (1.0 - (1.0 - min_lr_ratio) * progress)


def schedule_factors(step: int, total_steps: int, t: TrainConfig) -> tuple[float, float]:
    """``(lr factor, weight-decay factor)`` of the configured ``lr_schedule`` at ``step``."""
    if t.lr_schedule == "bitnet":
        mid = max(t.warmup_steps, int(t.bitnet_switch_frac * total_steps))
        return (bitnet_lr_factor(step, total_steps, t.warmup_steps, t.bitnet_switch_frac, t.bitnet_stage2_ratio,
                                 t.min_lr_ratio), 0.0 if step >= mid else 1.0)
    return lr_factor(step, total_steps, t.warmup_steps, t.decay_start_frac, t.min_lr_ratio), 1.0


def set_weight_decay(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    """Each group's weight decay = its value at construction (kept as ``initial_weight_decay``, which the
    optimizer's state dict carries across a resume) times ``factor``."""
    for opt in optimizers:
        for group in opt.param_groups:
            if "weight_decay" in group:
                group["weight_decay"] = float(group.setdefault("initial_weight_decay", group["weight_decay"])) * factor


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            lr = float(group["initial_lr"]) * factor
            if isinstance(group["lr"], torch.Tensor):  # some optimizers (torchao's) keep lr as a tensor
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
