"""GaLore Muon: Muon whose momentum and Newton–Schulz live in a low-rank projection of the gradient.

Why
---
The gradient of a large weight matrix is close to low rank, and it keeps pointing into roughly the
same subspace for many steps (GaLore, Zhao et al. 2024; GaLore 2 uses a randomized SVD). So keep a
projector ``P`` onto the top-``r`` singular subspace of a recent gradient, run the optimizer in the
projected space and project the update back: the momentum shrinks from ``m x n`` to ``r x n``,
and Newton–Schulz works on an ``r x n`` matrix (Gram ``r x r``) instead of ``m x n``.

The step, per matrix ``W`` (``m x n``, ``min(m, n) >= min_dim`` and ``rank < min(m, n)``)
-------------------------------------------------------------------------------------------
The smaller side is projected. With ``m <= n`` (rows), ``P`` is ``m x r`` with orthonormal columns:

    every update_freq steps (and on the first):  P_new <- top-r left singular vectors of G
                                                 M     <- (P_new^T P_old) M        (carry)
    R   <- P^T G                              (r x n)
    M   <- mu M + (1 - mu) R                  (EMA, r x n; int8 blocks with use_8bit)
    u   <- (1 - mu) R + mu M   (Nesterov)     (r x n)
    W   <- W (1 - lr wd) - lr * sqrt(max(1, m/n)) * sqrt(m/r) * galore_scale * P NewtonSchulz5(u)

With ``m > n`` everything is transposed: ``Q`` (``n x r``) spans the top right singular vectors,
``R = G Q`` (``m x r``), the carry is ``M (Q_new^T Q_old)^T`` and the update ``NS(u) Q^T``.
Matrices that are too small or whose rank would not be reduced get plain (8-bit) Muon.

Design choices
--------------
* Projector: randomized SVD (Halko, Martinsson, Tropp 2011) of the current gradient: a Gaussian
  sketch with ``oversample`` extra columns (default 8), ``power_iters`` subspace iterations
  (default 2, each re-orthonormalised by QR), then the exact SVD of the small ``(r + p) x n``
  matrix. The sketch comes from a generator seeded by ``(seed, parameter index, refresh count)``,
  so every rank of a distributed run computes the same projector from the same (all-reduced)
  gradient without communicating, and a resumed run recomputes nothing.
* Refresh carry: the momentum is re-expressed in the new basis, ``M <- P_new^T P_old M``: the
  part of the old momentum that lies in the new subspace is kept, the rest (which the new basis
  cannot represent) is dropped. Zeroing would throw away ~1/(1 - mu) steps of averaging at every
  refresh; keeping ``M`` as is would silently mix coordinates of two different bases.
* Projector storage: ``proj_dtype`` (default bf16). Projector entries are ~1/sqrt(m) with
  orthonormal columns; bf16 keeps 8 significant bits, i.e. a relative error ~2^-9 per entry in the
  back-projected update, noise far below the Newton–Schulz approximation itself. It halves the
  projector memory, which matters: at rank 128 on 768-wide matrices the projector is as large as
  the projected momentum (fp32 projectors: 26% of fp32 Muon's state; bf16: 21%; with int8
  momentum 14% vs 9%). All arithmetic is done in fp32 (the projector is upcast when used).
  Measured effect on loss (benchmarks/optim_bench.py's task, rank 32, 60 steps): held-out 1.679
  with bf16 projectors vs 1.680 with fp32 (train 1.737 vs 1.734): within run-to-run noise.
* Scale: ``P NS(u)`` has ``r`` singular values ~1 where Muon's ``NS(M)`` has ``min(m, n)``, so its
  RMS is smaller by ``sqrt(r / min(m, n))``. The projected update is multiplied by
  ``sqrt(min(m, n) / r)`` (on top of Muon's ``sqrt(max(1, m/n))`` and ``galore_scale``): the same
  update RMS as Muon at the same learning rate, so the lr tuned for Muon carries over, and at
  full rank the factor is 1 (Muon exactly). Measured (benchmarks/optim_bench.py's task, 60 steps,
  128-wide matrices, held-out loss; fp32 Muon 1.576 at its best lr 0.02): rank 16 with extra factor
  1 / 2 / 2.83 (= RMS match) / 4: 2.125 / 1.819 / 1.792 / 1.836; rank 32 with 1 / 1.41 / 2 (match)
  / 3: 1.810 / 1.730 / 1.684 / 1.708; rank 64 with 1 / 1.41 (match) / 2: 1.641 / 1.611 / 1.599.
  The best factor tracks the RMS match; the alternative (same per-direction step as Muon, factor
  1) was clearly worse. ``galore_scale`` (default 1) multiplies on top.

State per projected matrix: ``projector`` (``proj_dtype``, ``min(m,n) x r``), ``step`` (int), and
the projected momentum (``momentum_buffer`` fp32, or ``momentum_codes``/``momentum_scales``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .muon import _dtype_name
from .quantized import DEFAULT_MIN_QUANT_NUMEL, STREAM_PROJECTOR, Muon8bit, seeded_generator

_PROJ = "GaLoreMuon: proj_dtype (galore_proj_dtype)"


def randomized_svd(
    A: Tensor, rank: int, oversample: int = 8, power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` ``(U, S, Vh)`` of ``A`` (``m x n``) by a randomized SVD, in ``A``'s dtype.

    Range finder: ``Y = A Omega`` with a Gaussian ``Omega`` of ``rank + oversample`` columns,
    ``power_iters`` rounds of ``Q <- qr(A qr(A^T Q))`` (sharpens the spectrum so the leading
    subspace dominates), then the exact SVD of ``Q^T A``.
    """
    m, n = A.shape
    k = min(rank + oversample, m, n)
    omega = torch.randn(n, k, generator=generator, device=A.device, dtype=A.dtype)
    Q = torch.linalg.qr(A @ omega).Q
    for _ in range(power_iters):
        Z = torch.linalg.qr(A.T @ Q).Q
        Q = torch.linalg.qr(A @ Z).Q
    Ub, S, Vh = torch.linalg.svd(Q.T @ A, full_matrices=False)
    return (Q @ Ub)[:, :rank], S[:rank], Vh[:rank]


class GaLoreMuon(Muon8bit):
    """Muon with GaLore low-rank projection of the big matrices (see the module docstring).

    Args (besides :class:`Muon`'s and :class:`Muon8bit`'s, whose ``quantize`` defaults to False
    here: set it for int8 projected momentum):
        rank: projection rank ``r``; a matrix with ``min(m, n) <= rank`` is not projected.
        update_freq: refresh the projector every this many steps (of that parameter).
        min_dim: only matrices with ``min(m, n) >= min_dim`` are projected.
        scale: multiplies the back-projected update (``galore_scale``), on top of the RMS-matching
            ``sqrt(min(m, n) / rank)``.
        proj_dtype: storage dtype of the projectors (name or torch dtype).
        oversample, power_iters: randomized SVD settings.
    """

    variant_name = "galore-muon"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        ns_dtype: torch.dtype | str | None = None,
        *,
        rank: int = 128,
        update_freq: int = 200,
        min_dim: int = 256,
        scale: float = 1.0,
        proj_dtype: torch.dtype | str = "bfloat16",
        oversample: int = 8,
        power_iters: int = 2,
        quantize: bool = False,
        block_size: int = 128,
        stochastic_rounding: bool = False,
        min_quant_numel: int = DEFAULT_MIN_QUANT_NUMEL,
        seed: int = 0,
        latent_rounding: str = "stochastic",
    ) -> None:
        for name, value, low in (("rank", rank, 1), ("update_freq", update_freq, 1), ("min_dim", min_dim, 0),
                                 ("oversample", oversample, 0), ("power_iters", power_iters, 0)):
            if value < low:
                raise ValueError(f"GaLoreMuon: {name} must be >= {low}, got {value}")
        if not scale > 0:
            raise ValueError(f"GaLoreMuon: scale must be > 0, got {scale}")
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                         weight_decay=weight_decay, ns_dtype=ns_dtype, quantize=quantize,
                         block_size=block_size, stochastic_rounding=stochastic_rounding,
                         min_quant_numel=min_quant_numel, seed=seed, latent_rounding=latent_rounding,
                         rank=rank, update_freq=update_freq, min_dim=min_dim, scale=scale,
                         proj_dtype=_dtype_name(proj_dtype, _PROJ),
                         oversample=oversample, power_iters=power_iters)

    @property
    def variant(self) -> str:
        return self.variant_name + ("-8bit" if any(g["quantize"] for g in self.param_groups) else "")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["proj_dtype"] = _dtype_name(group["proj_dtype"], _PROJ)

    @staticmethod
    def projected(shape: torch.Size | tuple[int, int], group: dict[str, Any]) -> bool:
        """Whether a matrix of ``shape`` in ``group`` is projected."""
        small = min(shape)
        return small >= group["min_dim"] and group["rank"] < small

    _STATE_KEYS = Muon8bit._STATE_KEYS | {"projector"}

    def _momentum_numel(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> int:
        P = state.get("projector")
        return p.numel() if P is None else _projected_shape(p.shape, P.size(1)).numel()

    def _check_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        super()._check_state(p, state, group)
        P = state.get("projector")
        if P is not None and (not self.projected(p.shape, group) or P.shape != (min(p.shape), group["rank"])):
            raise ValueError(f"GaLoreMuon: the saved projector {tuple(P.shape)} of a {tuple(p.shape)} "
                             f"parameter does not fit rank {group['rank']} / min_dim {group['min_dim']}")

    def _new_projector(self, p: Tensor, grad: Tensor, group: dict[str, Any], refresh: int) -> Tensor:
        left = p.size(0) <= p.size(1)
        gen = seeded_generator(grad.device, group["seed"], STREAM_PROJECTOR, self._param_index(p), refresh)
        U, _, _ = randomized_svd(grad if left else grad.T, group["rank"], group["oversample"],
                                 group["power_iters"], gen)
        return U.to(getattr(torch, group["proj_dtype"])).contiguous()

    def _prepare(self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any],
                 step: int) -> tuple[Tensor, Tensor]:
        if not self.projected(p.shape, group):
            return super()._prepare(p, grad, state, group, step)
        left = p.size(0) <= p.size(1)
        carried = None
        if step % group["update_freq"] == 0 or "projector" not in state:
            new = self._new_projector(p, grad, group, step // group["update_freq"])
            old = state.get("projector")
            if "momentum_codes" in state or "momentum_buffer" in state:
                # carry: coordinates in the old basis (identity if there was none) -> the new basis
                P_new = new.float()
                M_shape = p.shape if old is None else _projected_shape(p.shape, old.size(1))
                M = self._load_momentum(state, M_shape, grad.device, group)
                C = P_new.T if old is None else P_new.T @ old.float()  # r x r (or r x side)
                carried = C @ M if left else M @ C.T
            state["projector"] = new
        R = self._project(p, grad, state, group)
        M = carried if carried is not None else self._load_momentum(state, R.shape, grad.device, group)
        return R, M

    def _project(self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        if not self.projected(p.shape, group):
            return grad
        P = state["projector"].float()
        return P.T @ grad if p.size(0) <= p.size(1) else grad @ P

    def _back_project(self, p: Tensor, direction: Tensor, group: dict[str, Any]) -> Tensor:
        """The orthogonalised projected update in ``p``'s shape (unchanged where ``p`` is not projected)."""
        if self.projected(p.shape, group):
            P = self.state[p]["projector"]
            P = P.float() * (group["scale"] * (P.size(0) / P.size(1)) ** 0.5)  # RMS match: sqrt(min(m,n)/r)
            direction = P @ direction if p.size(0) <= p.size(1) else direction @ P.T
        return direction

    def _apply_update(self, p: Tensor, direction: Tensor, group: dict[str, Any]) -> None:
        super()._apply_update(p, self._back_project(p, direction, group), group)


def _projected_shape(shape: torch.Size, rank: int) -> torch.Size:
    m, n = shape
    return torch.Size((rank, n) if m <= n else (m, rank))
