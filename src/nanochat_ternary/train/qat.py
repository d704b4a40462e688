"""Continual QAT: full precision first, then ternary (``qat_start``, ``qat_ramp_steps``).

Why: a ternary forward from step 0 spends its first steps on a model whose rounding thresholds sit
on random weights. Training in full precision first and switching to ternary later reaches a lower
loss at equal compute in reported work (arXiv 2502.11895, "continual pre-training" to 1.58 bits);
a short ramp that blends the float and the quantized weight avoids the loss spike of a hard switch.

The quantizer mix of every BitLinear at step ``s`` (0-based), ``start`` the switch step::

    mix(s) = 0                                    for s < start       (the full-precision path)
           = min(1, (s - start + 1) / ramp)        for s >= start      (ramp = 0: 1 at once)

and each BitLinear computes with ``w + mix * (ternary(w) - w)`` and ``x + mix * (int8(x) - x)``
(straight-through gradients), so ``mix = 0`` is exactly ``quantization = "none"`` and ``mix = 1``
exactly today's ternary layer. A pure function of the step: a resumed run lands on the same mix.
"""

from __future__ import annotations

from torch import nn

from ..config import TrainConfig
from ..model.bitlinear import BitLinear


def qat_start_step(t: TrainConfig, total_steps: int) -> int:
    """The first ternary step: 0 when off, ``qat_start * total`` for a fraction, else the step itself."""
    if t.qat_start <= 0:
        return 0
    return int(t.qat_start * total_steps) if t.qat_start < 1 else int(t.qat_start)


def quant_mix(step: int, start: int, ramp_steps: int) -> float:
    """The quantizer mix at ``step`` (see the module docstring)."""
    if step < start:
        return 0.0
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (step - start + 1) / ramp_steps)


def set_quant_mix(model: nn.Module, mix: float) -> None:
    """Set ``quant_mix`` on every BitLinear of ``model`` (only the ternary ones read it)."""
    for mod in model.modules():
        if isinstance(mod, BitLinear):
            mod.quant_mix = mix


class QatSchedule:
    """The trainer's hook: ``apply(model, step)`` before each step; ``line`` describes the plan."""

    def __init__(self, t: TrainConfig, total_steps: int) -> None:
        self.start = qat_start_step(t, total_steps)
        self.ramp = t.qat_ramp_steps
        self.total = total_steps
        self.enabled = self.start > 0 or self.ramp > 0
        self.mix: float | None = None

    def apply(self, model: nn.Module, step: int) -> None:
        mix = quant_mix(step, self.start, self.ramp)
        if mix != self.mix:
            set_quant_mix(model, mix)
            self.mix = mix

    def line(self) -> str:
        ramp = f", phased in over {self.ramp} steps" if self.ramp > 0 else ""
        warn = " (after the last step: the run never trains ternary)" if self.start >= self.total else ""
        first = f"full precision for steps 0..{self.start - 1}, " if self.start > 0 else ""
        return f"continual QAT: {first}ternary from step {self.start}{ramp}{warn}"
