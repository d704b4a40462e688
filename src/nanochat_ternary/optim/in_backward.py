"""The Muon step inside the backward pass: no full set of gradients ever exists.

Why
---
After ``loss.backward()`` every parameter holds a gradient as large as itself: at 6.2B params in
fp32 that is another 23.6 GB next to the weights. But Muon updates each hidden matrix on its own
(momentum, Newton–Schulz and the update of one matrix need nothing from the others), so the
matrix can be updated the moment its gradient is complete, and the gradient freed. Autograd says
when: ``Tensor.register_post_accumulate_grad_hook`` fires after a leaf's ``.grad`` has received
its last contribution of the backward. At most one Muon matrix's gradient (plus the ones autograd
is still producing) is alive at any time (GaLore's paper does the same per-layer update).

The step, per Muon matrix ``W`` and optimizer step ``t`` with ``K`` micro-batches
---------------------------------------------------------------------------------
In the hook of micro-batch ``k`` (gradient ``g_k`` of ``loss_k / K``, shape of ``W``)::

    g_k <- c_t g_k                          (clip coefficient, fixed for the step: see below)
    K == 1:  Muon's own step for W with g_0  (the same code as ``Muon.step``: exact)
    K > 1:   buf <- mu buf (k == 0);  buf <- buf + (1 - mu) g_k;  at k == K-1: W <- update(NS(buf))
    W.grad <- None

Momentum is linear in the gradient, so ``buf`` ends at ``mu buf + (1 - mu) sum_k g_k``: exactly the
normal step's momentum for the accumulated gradient (fp32: up to summation order, ~1e-7
relative). Nesterov's update ``(1 - mu) G + mu buf`` needs the whole ``G`` besides ``buf``, a second
matrix per parameter, so accumulation requires ``muon_nesterov = false`` (config validation says
so); ``K == 1`` keeps Nesterov. int8 momentum is dequantised, added into and requantised at every
micro-batch: ``K - 1`` extra roundings per step, each within half a quantisation step of the
block (unbiased with ``stochastic_rounding``).

Gradient clipping
-----------------
Global-norm clipping scales every gradient by ``c = min(1, max_norm / (||G||_total + 1e-6))``, but
``||G||_total`` is known only when the whole backward is done, after the Muon matrices were
updated. The replacement: **the previous step's norm**. ``c_t`` comes from step ``t - 1``'s total
norm (1 at the first step) and multiplies every gradient of step ``t``, Muon's in the hooks and the
others (AdamW's, still on the normal step) before their ``step()``; the total norm of step ``t``
is accumulated on the way (the hooks add ``||g||^2`` of each matrix) and logged as ``grad_norm``.
Why this one: Newton–Schulz makes Muon's update invariant to the scale of ``u``; the clip only
changes how much the current gradient weighs against the momentum, and a one-step-old norm is a
good estimate of the current one (norms drift slowly; a spike is clipped one step late, and at
step 1, where the momentum is zero and Adam's first step is sign-like, clipping has no effect
anyway). Per-matrix clipping was the alternative; it would change the meaning of ``grad_clip``.
With ``K > 1`` the Muon part of the norm is ``sqrt(sum_k ||g_k||^2)``: the norm of the sum is not
available without the summed gradient (equal for ``K == 1``, an estimate otherwise).

Scope
-----
* AdamW's parameters (embeddings, head, norms) keep the normal step: their gradients are 1/6 of
  the 7B preset's, and AdamW's fused step is fastest over all of them at once.
* Data parallel runs are refused: DDP reduces gradients in buckets after its own hooks, so the
  post-accumulate hook would see the local gradient; reducing each matrix in its hook is the way
  to lift this (not built).
* A non-finite gradient is applied to a Muon matrix before the step's norm is known: the
  trainer's skip of a non-finite step (guard.py) then skips only AdamW's step (its counting and
  stop rule still hold).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.nn import Parameter

from ..config import ConfigError
from .muon import Muon

CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_



def _norm_dtype(t: Tensor) -> torch.dtype:
    """Norms in fp32 at least (bf16 gradients), float64 for a float64 model (the exact tests)."""
    return torch.promote_types(t.dtype, torch.float32)

class InBackwardStep:
    """Hooks that run ``opt``'s update for each of its parameters inside the backward.

    Use, per optimizer step::

        ib.begin_micro_batch(k) for each micro-batch k, before its backward
        loss_k.backward()                         (Muon matrices are updated in here)
        grad_norm = ib.finish_step()              (scales the other grads by this step's c_t)
        other_optimizer.step()

    Args:
        opt: the Muon (any variant) whose parameters get hooks.
        other_params: parameters stepped normally after the backward (their gradients are
            clipped here and counted in the norm).
        n_micro: micro-batches per optimizer step.
        grad_clip: ``max_norm`` of the previous-step clipping (0: no clipping).
    """

    def __init__(self, opt: Muon, other_params: Iterable[Parameter], n_micro: int = 1,
                 grad_clip: float = 0.0) -> None:
        if n_micro < 1:
            raise ValueError(f"InBackwardStep: n_micro must be >= 1, got {n_micro}")
        if n_micro > 1 and any(g["nesterov"] for g in opt.param_groups):
            raise ValueError("InBackwardStep: accumulating micro-batches into the momentum needs a Muon "
                             "without Nesterov (muon_nesterov = false)")
        self.opt = opt
        self.other_params = [p for p in other_params if p.requires_grad]
        self.n_micro = n_micro
        self.grad_clip = grad_clip
        self.micro = 0
        self.clip_coef = 1.0  # c_t: from the previous step's norm
        self.last_grad_norm: float | None = None
        self.hook_calls = 0  # matrices updated in the current micro-batch's backward (tests read it)
        self.skipped_matrices = 0  # matrices whose update a non-finite gradient skipped (whole run)
        self._sq: Tensor | None = None  # this step's sum of squared Muon gradient norms
        self._handles = [p.register_post_accumulate_grad_hook(self._hook)
                         for g in opt.param_groups for p in g["params"]]

    def remove(self) -> None:
        """Take the hooks off (the parameters then need the normal ``opt.step()`` again)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ---- per step ----------------------------------------------------------------------------

    def begin_micro_batch(self, micro: int) -> None:
        """Call before the backward of micro-batch ``micro`` (0-based) of the step."""
        if not 0 <= micro < self.n_micro:
            raise ValueError(f"InBackwardStep: micro-batch {micro} out of range [0, {self.n_micro})")
        if micro == 0:
            self._sq = None
        self.micro = micro
        self.hook_calls = 0

    @torch.no_grad()
    def _hook(self, p: Tensor) -> None:
        grad = p.grad
        if grad is None:
            return
        sq = torch.linalg.vector_norm(grad, dtype=_norm_dtype(grad)).square()
        self._sq = sq if self._sq is None else self._sq + sq
        if not torch.isfinite(sq):
            # The Trainer's non-finite guard decides after backward, too late for a matrix stepped
            # here: skip this matrix's update (weights and momentum untouched). The step's norm is
            # now non-finite, so the guard also skips the other parameters and counts the step.
            # (One host sync per matrix: the price of never letting a NaN into the weights.)
            p.grad = None
            self.skipped_matrices += 1
            return
        if self.clip_coef != 1.0:
            grad.mul_(self.clip_coef)
        self.opt.step_param(p, grad, self.micro, self.n_micro)
        p.grad = None
        self.hook_calls += 1

    @torch.no_grad()
    def finish_step(self) -> Tensor:
        """After the last micro-batch's backward: this step's total gradient norm (a 0-d tensor).

        Scales the other parameters' gradients by ``c_t`` (ready for their ``step()``) and sets
        ``c_{t+1}`` from this step's norm. The norm is of the unclipped gradients, as
        ``clip_grad_norm_`` reports it.
        """
        others = [p.grad for p in self.other_params if p.grad is not None]
        device = others[0].device if others else (self._sq.device if self._sq is not None else None)
        total_sq = torch.zeros((), dtype=torch.float32, device=device)
        if self._sq is not None:
            total_sq = total_sq + self._sq
        if others:
            other = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g, dtype=_norm_dtype(g)) for g in others]))
            total_sq = total_sq + other.square()
            if self.clip_coef != 1.0:
                torch._foreach_mul_(others, self.clip_coef)
        norm = total_sq.sqrt()
        self.last_grad_norm = float(norm)
        if self.grad_clip > 0 and math.isfinite(self.last_grad_norm):
            self.clip_coef = min(1.0, self.grad_clip / (self.last_grad_norm + CLIP_EPS))
        self._sq = None
        return norm

    # ---- checkpoint --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The clip coefficient of the next step (what a resumed run needs to stay exact)."""
        return {"clip_coef": self.clip_coef, "last_grad_norm": self.last_grad_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clip_coef = float(state["clip_coef"])
        norm = state.get("last_grad_norm")
        self.last_grad_norm = None if norm is None else float(norm)


def install_in_backward(optimizers: list[torch.optim.Optimizer], n_micro: int, grad_clip: float,
                        distributed: bool = False) -> InBackwardStep:
    """Hooks for the Muon among ``optimizers``; every other optimizer's params are clipped with it.

    Raises ConfigError with a one-line reason when it cannot work (no Muon, data parallel).
    """
    if distributed:
        raise ConfigError("optimizer_in_backward = true does not support data-parallel (torchrun) runs yet: "
                         "DDP reduces gradients after the hooks would use them; train on one process")
    muons = [o for o in optimizers if isinstance(o, Muon)]
    if len(muons) != 1:
        raise ConfigError("optimizer_in_backward = true needs exactly one Muon optimizer for the hidden matrices "
                         f"(found {len(muons)})")
    others = [p for o in optimizers if o is not muons[0] for g in o.param_groups for p in g["params"]]
    try:
        return InBackwardStep(muons[0], others, n_micro=n_micro, grad_clip=grad_clip)
    except ValueError as e:
        raise ConfigError(str(e)) from None
