"""Optimizer test data and loops, shared by the Muon, GaLore, 8-bit and AdamW-state tests."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def random_params(shapes: Sequence[tuple[int, ...]], seed: int = 0) -> list[nn.Parameter]:
    """Standard-normal parameters of ``shapes``, from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def random_grads(shapes: Sequence[tuple[int, ...]], steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    """``steps`` standard-normal gradients per shape (step-major), from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]


def run_steps(opt: torch.optim.Optimizer, params: Sequence[nn.Parameter],
              grads: Sequence[Sequence[torch.Tensor | None]], dtype: torch.dtype | None = None) -> None:
    """One ``opt.step()`` per entry of ``grads``, each parameter's gradient a copy of its entry
    (``None``: no gradient this step), cast to ``dtype`` if given."""
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = None if g is None else (g.clone() if dtype is None else g.clone().to(dtype))
        opt.step()


def planted(rows: int, cols: int, spectrum: torch.Tensor, g: torch.Generator | int = 0) -> torch.Tensor:
    """A float64 ``[rows, cols]`` matrix with singular values ``spectrum`` (``k = len(spectrum)``
    of them) and random orthonormal singular vectors drawn from ``g`` (a generator, or a seed)."""
    if isinstance(g, int):
        g = torch.Generator().manual_seed(g)
    k = len(spectrum)
    U = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64)).Q
    return U @ torch.diag(spectrum.to(torch.float64)) @ V.T


def round_trip(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` through ``torch.save`` and ``torch.load(weights_only=True)`` in memory, as a
    checkpoint stores it."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)
