"""AdamW with folded moments (FOAM, Wen et al. 2025, arXiv 2512.07112): state 8/2^l bytes per param.

Why
---
AdamW keeps two fp32 moments per parameter: 8 bytes, twice the weights. For our AdamW parameters
(embedding, head, norms) that is the largest optimizer state of a small-vocab run and, at 128K
vocab, GBs. FOAM's premise: one moment per *block* of ``B = 2^l`` adjacent values can stand in
for ``B`` of them, provided the part of the current gradient that the block average loses is
added back. That part is computed fresh every
step, so it costs temporaries, never state. With ``l = 3`` the moments shrink 8x (1 B/param).

The maths
---------
Per parameter, viewed as ``[..., n]`` and folded along its last dimension (a 0-d scalar is ``[1]``)
in ``nb = ceil(n / B)`` blocks::

    g~ = fold(g)                                   [..., nb]  mean of each block of B values
    R  = g - unfold(g~)                            [..., n]   residual, this step only
    m~ <- b1 m~ + (1 - b1) g~                      [..., nb]  the only persistent state, with v~
    v~ <- b2 v~ + (1 - b2) g~^2                    [..., nb]  (v_fold = "square_of_mean")
    m  = unfold(m~) / (1 - b1^t) + R               [..., n]
    v  = unfold(v~) / (1 - b2^t) + R^2             [..., n]
    p <- p (1 - lr wd) - lr m / (sqrt(v) + eps)

``unfold`` repeats each block's value over the block's B positions. With ``l = 0`` every block is
one value, ``R = 0`` and this is exactly AdamW (``tests/test_adamw_state.py`` checks it against
``torch.optim.AdamW``).

Decisions
---------
* **Bias correction** is Adam's ``1 - b^t``, applied to the folded EMAs only, not to ``R``: the
  correction undoes the EMAs' zero start, and ``R`` is the current gradient, not an average, so it
  has no such bias. Correcting the sum instead (the authors' public code divides the whole update
  by ``1 - b1^t``) multiplies the residual by 10 at step 1 with b1 = 0.9. Both read the same at
  ``l = 0`` and converge to each other as ``t`` grows.
* **A last dimension not divisible by B**: the last block is padded and its mean is taken over its
  real values only (the padding never enters a moment); its state entry is kept like the others.
* **Second moment**: the paper's update folds ``g~^2``, the square of the block mean (the
  default). The authors' released code folds the block mean of ``g^2`` instead, which keeps the
  within-block spread of the gradient in ``v~`` across steps; ``v_fold = "mean_of_squares"``
  selects it. Both equal AdamW at ``l = 0``; ``benchmarks/adamw_state.py`` measures both.
* **Fold level**: the authors' pre-training scripts (LLaMA 60M-1B) use ``l = 2``, for the block
  matrices only (embedding and head keep Adam's state there), with an extra update scale of 0.25
  at ``lr`` 1e-2. Here FOAM stands in for AdamW on the embedding, head and norms at AdamW's
  learning rate, without that scale.

What it changes: only the block mean of the gradient gets momentum and a time-averaged second
moment. The residual ``R``, which is most of the gradient when neighbouring values are unrelated
(an embedding row's dimensions are), enters the update without momentum: with ``g~^2`` it is
normalised by its own size (close to ``sign(R)`` where ``R`` dominates), with the mean of ``g^2``
by the block's running RMS. So FOAM is a different optimizer, not a compressed copy of AdamW's
trajectory: at ``l >= 1`` it drifts far from AdamW's weights (docs/low_memory.md), and whether it
trains as well is a convergence question (``benchmarks/optim_convergence.py``, "adamw-foam").

All arithmetic is fp32. A bf16 parameter is read into fp32 and written back with stochastic
rounding (as :class:`~nanochat_ternary.optim.adamw_lowmem.AdamW8bit`), from a stream seeded by
``(seed, parameter index, step)``, so a resumed run is exact. The state is plain fp32 tensors and
an int step: checkpoints load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .adamw_lowmem import STREAM_ADAMW
from .base import StatefulOptimizer
from .low_precision import STREAM_LATENT, is_low_precision, seeded_generator, write_latent

CHUNK_ELEMENTS = 1 << 24  # values per slice of rows: 64 MB fp32 temporaries each
V_FOLDS = ("square_of_mean", "mean_of_squares")
MAX_FOLD_LEVEL = 10


def folded_shape(shape: torch.Size | tuple[int, ...], level: int) -> tuple[int, ...]:
    """Shape of a folded moment of a parameter of ``shape``: ``(*shape[:-1], ceil(n / 2^level))``."""
    shape = tuple(shape) or (1,)
    b = 1 << level
    return (*shape[:-1], (shape[-1] + b - 1) // b)


class AdamWFoam(StatefulOptimizer):
    """AdamW whose moments are kept per block of ``2^fold_level`` values (module docstring).

    Args: as ``torch.optim.AdamW`` (``lr``, ``betas``, ``eps``, ``weight_decay``), plus
    ``fold_level`` (``l``: blocks of ``2^l`` values along the last dim; 0 is AdamW), ``v_fold``
    (what the second moment folds: ``"square_of_mean"`` or ``"mean_of_squares"``) and ``seed``
    (of the stochastic rounding of bf16 parameters).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 *, fold_level: int = 3, v_fold: str = "square_of_mean", seed: int = 0) -> None:
        if lr < 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamWFoam: invalid hyperparameters lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay}")
        if not (isinstance(fold_level, int) and 0 <= fold_level <= MAX_FOLD_LEVEL):
            raise ValueError(f"AdamWFoam: fold_level = {fold_level!r} must be an int in [0, {MAX_FOLD_LEVEL}]")
        if v_fold not in V_FOLDS:
            raise ValueError(f"AdamWFoam: v_fold = {v_fold!r} (allowed: {', '.join(V_FOLDS)})")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      fold_level=fold_level, v_fold=v_fold, seed=seed))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype not in (torch.float32, torch.bfloat16):
                    raise ValueError(f"AdamWFoam: parameters must be float32 or bfloat16, not {p.dtype}")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As the base class, but the moments stay fp32 (the base class would cast them to a bf16
        parameter's dtype) and a state saved at another fold level, or by another optimizer, is refused."""
        for mine, saved in zip(self.param_groups, state_dict["param_groups"]):
            if saved.get("fold_level") != mine["fold_level"] or saved.get("v_fold") != mine["v_fold"]:
                raise ValueError(f"AdamWFoam: the saved state has fold_level={saved.get('fold_level')!r} "
                                 f"v_fold={saved.get('v_fold')!r}, this optimizer fold_level={mine['fold_level']} "
                                 f"v_fold={mine['v_fold']!r}")
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                raw = state_dict["state"][saved_ids[self._param_index(p)]]
                for key in ("exp_avg", "exp_avg_sq"):
                    st[key] = raw[key].to(device=p.device, dtype=torch.float32, copy=True)
                    if st[key].shape != folded_shape(p.shape, group["fold_level"]):
                        raise ValueError(f"AdamWFoam: the saved {key} {tuple(st[key].shape)} does not fit a "
                                         f"{tuple(p.shape)} parameter at fold_level {group['fold_level']}")

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = self._run_closure(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamWFoam does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    shape = folded_shape(p.shape, group["fold_level"])
                    state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
                    state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
                step = state["step"] + 1
                if p.numel() == 0:
                    state["step"] = step
                    continue
                idx = self._param_index(p)
                gen = seeded_generator(p.device, group["seed"], STREAM_ADAMW, STREAM_LATENT, idx, step) \
                    if is_low_precision(p) else None
                # as rows [rows, n]: folding is along the last dim, so rows are independent and the step
                # runs in slices of whole rows (the fp32 temporaries are one slice's, not the tensor's)
                n = p.shape[-1] if p.ndim else 1
                rows = p.numel() // n if n else 0
                direct = p.is_contiguous()
                work = p.detach() if direct else p.detach().contiguous()
                w2, g2 = work.view(rows, n), p.grad.reshape(rows, n)
                m2 = state["exp_avg"].view(rows, -1)
                v2 = state["exp_avg_sq"].view(rows, -1)
                per = max(1, CHUNK_ELEMENTS // max(1, n))
                for r0 in range(0, rows, per):
                    r1 = min(rows, r0 + per)
                    self._update_rows(w2[r0:r1], g2[r0:r1], m2[r0:r1], v2[r0:r1], group, step, gen)
                if not direct:
                    p.copy_(work)
                state["step"] = step
        return loss

    @staticmethod
    def _update_rows(p: Tensor, grad: Tensor, m: Tensor, v: Tensor, group: dict[str, Any], step: int,
                     gen: torch.Generator | None) -> None:
        """The step for ``p`` [rows, n] (rows of the parameter, any float dtype) with its gradient
        [rows, n] and folded moments ``m``, ``v`` [rows, nb] (module docstring)."""
        b1, b2 = group["betas"]
        rows, n = p.shape
        nb = m.shape[1]
        bsz = 1 << group["fold_level"]
        pad = nb * bsz - n
        g = grad.float()
        if pad:  # zero padding never enters a sum; the last block's mean divides by its real count
            g = F.pad(g, (0, pad))
        gb = g.view(rows, nb, bsz)  # [rows, nb, B]
        if pad:
            count = torch.full((nb,), float(bsz), device=g.device)
            count[-1] = bsz - pad
            g_fold = gb.sum(-1).div_(count)  # [rows, nb]
        else:
            g_fold = gb.mean(-1)  # [rows, nb]; exact for B = 1
        if group["v_fold"] == "square_of_mean":
            v_in = g_fold * g_fold  # [rows, nb]
        else:
            v_in = (gb * gb).sum(-1).div_(count) if pad else (gb * gb).mean(-1)
        m.lerp_(g_fold, 1 - b1)
        v.mul_(b2).add_(v_in, alpha=1 - b2)
        resid = gb - g_fold.unsqueeze(-1)  # [rows, nb, B]: R, zero at l = 0
        denom = (resid * resid).add_((v / (1 - b2 ** step)).unsqueeze(-1)).sqrt_().add_(group["eps"])
        update = resid.add_((m / (1 - b1 ** step)).unsqueeze(-1)).div_(denom)  # m / (sqrt(v) + eps)
        update = update.view(rows, nb * bsz)[:, :n]  # [rows, n]
        w = p.float() if gen is not None else p  # a bf16 parameter: updated in fp32, written back once
        if group["weight_decay"]:
            w.mul_(1 - group["lr"] * group["weight_decay"])
        w.add_(update, alpha=-group["lr"])
        if gen is not None:
            write_latent(p, w, stochastic=True, generator=gen)
