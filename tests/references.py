"""Independent references shared by the tests: the algorithms written from their definitions, in float64,
not from the code under test."""

from __future__ import annotations

import torch

# Newton-Schulz quintic coefficients (Keller Jordan's Muon)
A, B, C = 3.4445, -4.7750, 2.0315


def reference_muon(params, grads_per_step, lrs, wds, mu=0.95, nesterov=True, steps=5):
    """Plain float64 Muon: momentum EMA, Nesterov, Frobenius-normalised quintic Newton-Schulz, shape scale
    max(1, rows/cols)^0.5, decoupled weight decay. ``lrs`` / ``wds``: per parameter; a None grad skips it."""
    params = [p.detach().double().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for i, (p, buf, g) in enumerate(zip(params, bufs, grads)):
            if g is None:
                continue
            g = g.double()
            buf.mul_(mu).add_(g, alpha=1 - mu)
            u = (1 - mu) * g + mu * buf if nesterov else buf
            X = u.T if u.shape[0] > u.shape[1] else u
            X = X / (torch.linalg.matrix_norm(X) + 1e-7)
            for _ in range(steps):
                Am = X @ X.T
                X = A * X + (B * Am + C * Am @ Am) @ X
            ortho = X.T if u.shape[0] > u.shape[1] else X
            p.mul_(1 - lrs[i] * wds[i])
            p.sub_(lrs[i] * max(1.0, p.shape[0] / p.shape[1]) ** 0.5 * ortho)
    return params
