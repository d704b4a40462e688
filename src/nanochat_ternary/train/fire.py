"""FIRE: reset a trained matrix to its nearest orthogonal matrix before training on new data.

Why
---
A network trained for a while on one distribution loses *plasticity*: continued on new data it
learns more slowly than a fresh network would, partly because its weight matrices grow badly
conditioned (a few large singular directions dominate, many are nearly dead). FIRE ("FIRE", ICLR
2026, arXiv 2602.08040) fixes the conditioning once, at the switch to the new data, and keeps the
rest of what was learned: every linear weight ``W [d_out, d_in]`` is replaced by

    W  <-  sqrt(d_out / d_in) * polar(W),       polar(W) = W (W^T W)^(-1/2) = U V^T

where ``W = U S V^T`` is the SVD. ``polar(W)`` is the orthogonal matrix closest to ``W`` in
Frobenius norm (the "orthogonal Procrustes" solution): the singular *directions* ``U, V`` are kept,
the singular *values* are all set to one (then to ``sqrt(d_out / d_in)``, which gives every input
direction the same gain at any aspect ratio). Here it is applied to the Muon matrices (attention
q, k, v, o and the MLP's w1, w2, w3, each its own ``BitLinear``), not to the embedding, the head or
the norm gains.

The maths: Newton-Schulz for the polar factor
---------------------------------------------
Scale ``X_0 = W / ||W||_F`` so every singular value lies in ``(0, 1]``, then iterate

    X_{k+1} = 1.5 X_k - 0.5 X_k X_k^T X_k          (= X_k (3 I - X_k^T X_k) / 2)

Each step maps every singular value by ``f(s) = 1.5 s - 0.5 s^3`` and leaves ``U`` and ``V`` alone.
``f`` is increasing on ``[0, 1]`` with ``f(s) > s`` for ``0 < s < 1`` and the fixed point ``f(1) = 1``
(``f'(1) = 0``), so every nonzero singular value goes to 1: slowly at first (``s`` grows by about
1.5x per step while small, so ``log_1.5(||W||_F / s_min)`` steps), then quadratically
(``1 - f(s) ~ 1.5 (1 - s)^2``). The limit is ``U V^T``. A zero singular value stays zero (``W`` of
lower rank gives the partial isometry ``U_r V_r^T``, and never passes the orthogonality check).

Convergence is checked on the small Gram matrix ``G = X X^T`` (``d_out <= d_in``) or ``X^T X``: its
eigenvalues are the squared singular values, so ``max |G - I|`` bounds how far any of them is from
1. The iteration is run in float64 by default: the polar factor of a matrix with condition number
``k`` is only determined to about ``k * eps``, and fp64 leaves room for that.

This is *not* Muon's quintic Newton-Schulz (optim/muon.py): that one is tuned to push singular
values into a band around 1 in five bf16 steps and deliberately never converges; FIRE needs the
exact orthogonal factor.

Effect on a ternary model
-------------------------
BitLinear quantizes ``W`` per group of ``group_size`` values with the scale ``s_g = mean |w|`` and the
codes ``round(w / s_g)`` in {-1, 0, 1}. The codes do not change under a global rescaling, so only the
orthogonalisation moves them; the scales follow the weights' new RMS. :func:`apply_fire` measures
both (mean group scale before/after, share of codes changed) and the trainer logs them in one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..model.bitlinear import ternary_quantize_weight

#: iterations allowed; from ||W||_F-scaling, s grows ~1.5x per step: 100 covers s_min / ||W||_F > 1e-15
MAX_ITERS = 100


@dataclass
class PolarResult:
    q: Tensor  # the polar factor, W's shape and the iteration's dtype
    iters: int  # Newton-Schulz steps taken
    residual: float  # max |G - I| of the final iterate's small Gram matrix
    converged: bool


def default_tol(shape: tuple[int, ...], dtype: torch.dtype) -> float:
    """Stop when ``max |G - I| <= 8 k eps`` (``k = min(d_out, d_in)``): a Gram entry sums ``k``
    products, so its rounding error alone is up to about ``k eps``; asking for less could never end."""
    return 8 * min(shape) * torch.finfo(dtype).eps


@torch.no_grad()
def polar_newton_schulz(w: Tensor, dtype: torch.dtype = torch.float64, tol: float | None = None,
                        max_iters: int = MAX_ITERS) -> PolarResult:
    """The orthogonal polar factor ``U V^T`` of ``w [m, n]`` by the cubic Newton-Schulz iteration.

    Works on the smaller Gram matrix (``m <= n``: ``X X^T [m, m]``, else ``X^T X [n, n]``), so a step
    costs ``2 m n min(m, n)`` multiply-adds. ``dtype`` is the working precision (float64 default).
    """
    if w.ndim != 2:
        raise ValueError(f"polar factor of a matrix, got shape {tuple(w.shape)}")
    m, n = w.shape
    tol = default_tol((m, n), dtype) if tol is None else tol
    x = w.detach().to(dtype)  # [m, n]
    norm = torch.linalg.matrix_norm(x)  # Frobenius: >= s_max, so every s lands in (0, 1]
    if norm == 0:
        return PolarResult(torch.zeros_like(x), 0, 1.0, False)
    x = x / norm
    eye = torch.eye(min(m, n), dtype=dtype, device=x.device)
    wide = m <= n
    residual = math.inf
    for it in range(max_iters + 1):
        g = x @ x.T if wide else x.T @ x  # [k, k], k = min(m, n)
        residual = float((g - eye).abs().max())
        if residual <= tol or it == max_iters:
            return PolarResult(x, it, residual, residual <= tol)
        # X <- X (3I - X^T X) / 2, written with the small Gram on the short side
        x = 1.5 * x - 0.5 * (g @ x if wide else x @ g)
    raise AssertionError("unreachable")


def fire_scale(shape: tuple[int, ...]) -> float:
    """``sqrt(d_out / d_in)`` for a ``[d_out, d_in]`` weight."""
    d_out, d_in = shape
    return math.sqrt(d_out / d_in)


@torch.no_grad()
def fire_matrix(w: Tensor, dtype: torch.dtype = torch.float64) -> PolarResult:
    """FIRE's replacement for ``w``: ``sqrt(d_out / d_in) * polar(w)`` (in ``dtype``; the caller
    writes it back in the parameter's own dtype)."""
    res = polar_newton_schulz(w, dtype)
    res.q.mul_(fire_scale(tuple(w.shape)))
    return res


@dataclass
class FireReport:
    """What one application did, summed over the matrices it touched."""

    n_matrices: int
    n_weights: int
    max_iters: int  # the most Newton-Schulz steps any matrix needed
    max_residual: float  # the worst final max |G - I|
    not_converged: list[str]  # matrices that hit MAX_ITERS (rank-deficient, or a zero matrix)
    scale_before: float  # mean ternary group scale (mean |w| per group), over all groups
    scale_after: float
    codes_changed: float  # share of ternary codes {-1, 0, 1} that differ after
    zeros_before: float  # share of zero codes
    zeros_after: float

    def line(self) -> str:
        warn = (f"; NOT converged: {', '.join(self.not_converged[:3])}" if self.not_converged else "")
        return (f"fire: {self.n_matrices} block matrices ({self.n_weights / 1e6:.2f}M weights) set to "
                f"sqrt(d_out/d_in) * polar(W) (Newton-Schulz, <= {self.max_iters} steps, max |G-I| "
                f"{self.max_residual:.1e}); ternary group scale mean {self.scale_before:.4g} -> "
                f"{self.scale_after:.4g} (x{self.scale_after / self.scale_before:.2f}), codes changed "
                f"{self.codes_changed:.1%}, zero codes {self.zeros_before:.1%} -> {self.zeros_after:.1%}{warn}")

    def to_dict(self) -> dict[str, object]:
        return {k: v for k, v in vars(self).items()}


@torch.no_grad()
def apply_fire(named_matrices: list[tuple[str, Tensor]], group_size: int,
               dtype: torch.dtype = torch.float64) -> FireReport:
    """Replace every ``[d_out, d_in]`` matrix in place by its FIRE value and measure the effect on
    the ternary quantization (group scales and codes, as BitLinear computes them)."""
    sums = dict(groups=0, scale_before=0.0, scale_after=0.0, weights=0, changed=0, z_before=0, z_after=0)
    iters, worst, bad = 0, 0.0, []
    for name, p in named_matrices:
        t0, s0 = ternary_quantize_weight(p.float(), group_size)
        res = fire_matrix(p, dtype)
        p.copy_(res.q.to(p.dtype))  # a bf16 latent rounds to nearest here
        t1, s1 = ternary_quantize_weight(p.float(), group_size)
        sums["groups"] += s0.numel()
        sums["scale_before"] += float(s0.double().sum())
        sums["scale_after"] += float(s1.double().sum())
        sums["weights"] += p.numel()
        sums["changed"] += int((t0 != t1).sum())
        sums["z_before"] += int((t0 == 0).sum())
        sums["z_after"] += int((t1 == 0).sum())
        iters, worst = max(iters, res.iters), max(worst, res.residual)
        if not res.converged:
            bad.append(name)
    g, nw = max(sums["groups"], 1), max(sums["weights"], 1)
    return FireReport(n_matrices=len(named_matrices), n_weights=sums["weights"], max_iters=iters,
                      max_residual=worst, not_converged=bad, scale_before=sums["scale_before"] / g,
                      scale_after=sums["scale_after"] / g, codes_changed=sums["changed"] / nw,
                      zeros_before=sums["z_before"] / nw, zeros_after=sums["z_after"] / nw)
