"""LM head + cross-entropy without the ``[N, V]`` logits: the loss of a batch, one chunk of rows
at a time.

Why
---
A plain head computes ``logits = h · Wᵀ`` for every token (``N × V``: at 32 × 1024 tokens and a
50K vocabulary that is 1.6 G values, 6.6 GB in fp32), keeps them for the backward and makes a
softmax of the same size there. Nothing needs them all at once: the loss and both gradients of a
row depend on that row's logits only. So, for each chunk of ``c`` rows (``V`` classes)::

    z    = h_c · Wᵀ                      [c, V]   (matmul in the compute dtype, then fp32)
    loss += Σ (logsumexp(z) − z[y])      over rows with y >= 0
    G    = softmax(z) − onehot(y)        (0 on rows with y = −1)
    dh_c = G · W                         [c, D]
    dW  += Gᵀ · h_c                      [V, D]   (accumulated in fp32)

The forward returns the summed loss and keeps ``dh`` ``[N, D]`` and ``dW`` ``[V, D]``; the backward
only scales them by the incoming (scalar) gradient. The three matmuls are the ones a plain head
does (forward, input gradient, weight gradient), so the work is the same, and the softmax and the
one-hot subtraction happen while the chunk's logits are hot. Peak memory above ``h`` is one chunk's
logits plus ``dW``.

Precision: on CUDA under bf16 autocast the matmuls take bf16 operands (as the plain head's do) and
the logits, the log-sum-exp and ``dW``'s accumulation are fp32; elsewhere everything is in ``h``'s
dtype. With ``compiled=True`` the per-chunk body runs through ``torch.compile`` (one fused kernel
for the softmax, the one-hot and the masking instead of several passes over ``[c, V]``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_ELEMENTS = 1 << 27  # logits values per chunk on CUDA: 128 M (512 MB in fp32)
CPU_CHUNK_ROWS = 1024


def chunk_rows(n_rows: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk: on CUDA as many as keep one chunk's fp32 logits near 512 MB (a multiple of
    256 rows, for whole matmul tiles); on CPU 1024 (cache-sized, as measured before)."""
    if device.type != "cuda":
        return CPU_CHUNK_ROWS
    rows = max(256, (CHUNK_ELEMENTS // max(vocab, 1)) // 256 * 256)
    return min(rows, max(n_rows, 1))


def logit_grads(z: Tensor, y: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """One chunk's summed loss (fp32) and ``G = softmax(z) − onehot(y)`` in ``z``'s dtype, for
    logits ``z [c, Vp]`` of which the first ``vocab`` columns are real (the rest come from zero
    padding rows of the head and get probability 0) and targets ``y [c]`` (rows with ``y = -1`` get
    a zero row and no loss)."""
    valid = y >= 0
    tgt = y.clamp(min=0)
    cols = torch.arange(z.shape[1], device=z.device)[None, :]  # [1, Vp]
    if torch.compiler.is_compiling():
        # one reduction pass and one elementwise pass over [c, Vp] (inductor fuses the rest)
        zf = z.float().masked_fill(cols >= vocab, float("-inf")) if vocab < z.shape[1] else z.float()
        lse = torch.logsumexp(zf, dim=-1)  # [c]
        loss = torch.where(valid, lse - zf.gather(1, tgt[:, None]).squeeze(1), 0.0).sum()
        g = (torch.exp(zf - lse[:, None]) - (cols == tgt[:, None]).float()) * valid[:, None]
        return loss, g.to(z.dtype)
    zf = z.float()  # [c, Vp]; eager: in place, no [c, Vp] temporaries beyond this one
    if vocab < z.shape[1]:
        zf[:, vocab:] = float("-inf")
    lse = torch.logsumexp(zf, dim=-1)  # [c]
    loss = torch.where(valid, lse - zf.gather(1, tgt[:, None]).squeeze(1), 0.0).sum()
    g = zf.sub_(lse[:, None]).exp_()  # softmax, in place of the fp32 logits
    g[torch.arange(g.shape[0], device=g.device), tgt] -= 1.0
    return loss, g.mul_(valid[:, None]).to(z.dtype)


_compiled_logit_grads: Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]] | None = None


def padded_vocab(vocab: int, dtype: torch.dtype) -> int:
    """Rows of the head as the matmuls see it: 16-bit operands need every row stride to be a
    multiple of 16 bytes for the fast tensor-core GEMMs (a 50257-row head falls back to kernels
    several times slower on H100), so a 16-bit head is padded with zero rows to a multiple of 64."""
    return 64 * ((vocab + 63) // 64) if dtype in (torch.bfloat16, torch.float16) else vocab


def compute_dtype(h: Tensor) -> torch.dtype:
    """The dtype the head's matmuls take: autocast's where it is on (bf16 on CUDA), else ``h``'s."""
    dev = h.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype


def head_operand(w: Tensor, dtype: torch.dtype) -> Tensor:
    """``w [V, D]`` in ``dtype``, with zero rows up to :func:`padded_vocab` (``[Vp, D]``)."""
    vocab, vp = w.shape[0], padded_vocab(w.shape[0], dtype)
    if vp == vocab:
        return w.to(dtype)
    wc = torch.zeros(vp, w.shape[1], dtype=dtype, device=w.device)
    wc[:vocab] = w
    return wc


@torch.no_grad()
def linear_token_losses(h: Tensor, w: Tensor, targets: Tensor) -> Tensor:
    """Per-row CE ``[N]`` of ``h [N, D]`` through ``w [V, D]`` (0 where ``targets`` is -1), one chunk of
    logits at a time and with no graph: the scores a token selection needs before any gradient
    (Collider, train/objective.py). Same precision as :class:`ChunkedLinearCE`'s forward."""
    dtype = compute_dtype(h)
    out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)  # [N]
    with torch.autocast(h.device.type, enabled=False):
        hc_all, wc, vocab = h.to(dtype), head_operand(w, dtype), w.shape[0]
        rows = chunk_rows(h.shape[0], vocab, h.device)
        for i in range(0, h.shape[0], rows):
            z = F.linear(hc_all[i:i + rows], wc).float()  # [c, Vp]
            if vocab < z.shape[1]:
                z[:, vocab:] = float("-inf")
            y = targets[i:i + rows]
            lse = torch.logsumexp(z, dim=-1)
            out[i:i + rows] = torch.where(y >= 0, lse - z.gather(1, y.clamp(min=0)[:, None]).squeeze(1), 0.0)
            del z
    return out


def _logit_grads_fn(compiled: bool) -> Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]:
    global _compiled_logit_grads
    if not compiled:
        return logit_grads
    if _compiled_logit_grads is None:
        _compiled_logit_grads = torch.compile(logit_grads, dynamic=False, fullgraph=True)
    return _compiled_logit_grads


class ChunkedLinearCE(torch.autograd.Function):
    """``sum_i CE(h_i · Wᵀ, y_i)`` over rows with ``y_i >= 0``, chunk by chunk; see the module
    docstring. ``h [N, D]``, ``w [V, D]``, ``y [N]``."""

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, y: Tensor, chunk: int,  # type: ignore[override]
                compiled: bool = False) -> Tensor:
        dev, dtype = h.device.type, compute_dtype(h)
        body = _logit_grads_fn(compiled)
        with torch.autocast(dev, enabled=False):
            hc_all = h.to(dtype)  # [N, D] in the compute dtype
            vocab, wc = w.shape[0], head_operand(w, dtype)  # [Vp, D]
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None  # [N, D]
            grad_w = torch.zeros(wc.shape, dtype=torch.float32, device=w.device) if ctx.needs_input_grad[1] \
                else None  # [Vp, D], fp32 accumulator
            for i in range(0, h.shape[0], chunk):
                hc = hc_all[i:i + chunk]  # [c, D]
                loss, g = body(F.linear(hc, wc), y[i:i + chunk], vocab)  # g: [c, Vp]
                total += loss
                if grad_h is not None:
                    grad_h[i:i + chunk] = g @ wc
                if grad_w is not None:
                    if g.dtype == torch.float32:
                        grad_w.addmm_(g.t(), hc)  # no [V, D] temporary
                    else:
                        grad_w += g.t() @ hc
                del g
            if grad_w is not None and wc.shape[0] != vocab:
                grad_w = grad_w[:vocab]
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w.dtype
        return total

    @staticmethod
    def backward(ctx, g_total: Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        # in place: the saved gradients are used once (no double backward through the head), and a
        # copy of dW would cost a [V, D] fp32 buffer (2 GB at vocab 128000 x 4096)
        gh = grad_h.mul_(g_total.to(grad_h.dtype)) if grad_h is not None else None
        gw = grad_w.mul_(g_total).to(ctx.w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def linear_cross_entropy(h: Tensor, w: Tensor, targets: Tensor, compiled: bool = False) -> Tensor:
    """Mean next-token CE of ``h [..., D]`` through the head ``w [V, D]`` against ``targets [...]``
    (``-1`` ignored), never holding more than one chunk of logits. Equal to
    ``F.cross_entropy(F.linear(h, w).float(), targets, ignore_index=-1)`` up to float summation
    order (and, under autocast, the bf16 rounding the plain head's matmul has too)."""
    h2 = h.reshape(-1, h.shape[-1])
    y = targets.reshape(-1)
    n_valid = (y >= 0).sum().clamp(min=1)
    rows = chunk_rows(h2.shape[0], w.shape[0], h2.device)
    return ChunkedLinearCE.apply(h2, w, y, rows, compiled) / n_valid
