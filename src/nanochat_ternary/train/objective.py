"""The per-step training objective: what is backpropagated, and what is logged.

    h = trunk(x)                                               (GPT.hidden_states)
    main  = CE(lm_head(h), y)              or, with Collider, the CE of the kept tokens only
    loss  = main + mtp_weight * mean_k CE(lm_head(head_k(h)), y shifted by k)     (with MTP)

Logged scalars (fp32 tensors, detached): ``ce`` (plain next-token CE over all tokens, what the
trainer logs as ``loss`` so runs with and without the features are comparable), ``mtp_ce_k`` for
each head, ``kept_frac`` (Collider). Validation always uses the plain CE (``GPT.forward``).

The LM head: with ``chunked_head`` (CUDA, or gradient checkpointing) the main CE and every MTP
head's CE go through :func:`~..model.linear_ce.linear_cross_entropy`, which never holds more than
one chunk of logits. Otherwise the plain head computes the ``[B*T, V]`` logits (fastest on CPU).

Multi-token prediction, memory without the chunked head: each head's (head -> shared unembedding
-> CE) runs inside a non-reentrant ``torch.utils.checkpoint``, so the forward keeps only the head's input ``h`` (shared
with the trunk) and its targets; the head's ``[B*T, V]`` logits are freed right after its CE. In
backward each head is recomputed (one head's projection + unembedding matmul) and backpropagated on
its own, its gradient accumulating into ``h``'s. Peak memory therefore grows by about one head's
logits, not ``n``; the price is one extra forward of each head (a D×D and a D×V matmul per token),
about +1/3 of the heads' own cost. A single ``loss.backward()`` does all of it, so DDP and gradient
accumulation need nothing special.

Collider token filtering: see :func:`collider_keep` for which tokens are kept. How their loss is
backpropagated: with the plain head, :class:`KeptRowsCE` (one matmul over all rows, the head's
backward on the kept rows only). With ``chunked_head``, :func:`collider_chunked_ce`: every row's
loss scored chunk by chunk without a graph, then the kept rows through the chunked head, so no
``[B*T, V]`` logits exist there either; it costs one more matmul over the kept rows.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from ..config import Config, ModelConfig, TrainConfig
from ..model.linear_ce import chunk_rows, linear_cross_entropy, linear_token_losses
from ..model.mtp import mtp_targets

# --------------------------------------------------------------------------------------------
# Collider


def collider_keep(tok_loss: Tensor, valid: Tensor, sparsity: float, threshold: float) -> Tensor:
    """Bool mask of the tokens whose loss is backpropagated.

    Kept: the ``ceil((1 - sparsity) * n_valid)`` valid tokens with the highest loss under the
    current model (ties broken by ``torch.topk``), plus every valid token whose loss is at least
    ``(1 + threshold) * mean`` (``mean`` = the batch's mean valid-token loss): a safety net so that
    at high sparsity no clearly hard token is dropped. Tokens with target -1 are never kept.
    """
    n_valid = int(valid.sum())
    mask = torch.zeros_like(valid)
    if n_valid == 0:
        return mask
    k = min(n_valid, max(1, math.ceil((1.0 - sparsity) * n_valid)))
    scores = tok_loss.masked_fill(~valid, float("-inf"))
    mask[torch.topk(scores, k).indices] = True
    mean = tok_loss[valid].mean()
    return mask | (valid & (tok_loss >= (1.0 + threshold) * mean))


class KeptRowsCE(torch.autograd.Function):
    """Cross-entropy through the LM head that scores every row but backpropagates only kept rows.

    Forward (one matmul over all rows, no graph): logits = h·Wᵀ, per-token loss, the Collider
    selection, and the softmax of the kept rows only (saved). Backward: gradient of the mean kept
    loss, with the LM-head and loss backward done densely on the gathered kept rows::

        G = (softmax - onehot)[kept] / n_kept        [K, V]
        dW = Gᵀ · h[kept]   ·   dh[kept] = G · W     (dh = 0 on dropped rows)

    so the head's backward costs K/N of the unfiltered one and the saved activations are K rows of
    probabilities instead of all N rows of logits. Returns ``(loss, per_token_loss, kept_mask)``.
    """

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, targets: Tensor, sparsity: float, threshold: float):
        valid = targets >= 0
        tgt = targets.clamp(min=0)
        logits = F.linear(h, w).float()  # [N, V]
        lse = torch.logsumexp(logits, dim=-1)
        tok_loss = torch.where(valid, lse - logits.gather(1, tgt[:, None]).squeeze(1), 0.0)
        keep = collider_keep(tok_loss, valid, sparsity, threshold)
        kept = keep.nonzero().squeeze(1)
        probs = torch.exp(logits.index_select(0, kept) - lse.index_select(0, kept)[:, None])  # [K, V]
        del logits
        n_kept = max(1, kept.numel())
        loss = tok_loss.index_select(0, kept).sum() / n_kept
        ctx.save_for_backward(h.index_select(0, kept), w, kept, probs, tgt.index_select(0, kept))
        ctx.n_rows, ctx.n_kept, ctx.h_dtype = h.shape[0], n_kept, h.dtype
        ctx.mark_non_differentiable(tok_loss, keep)
        return loss, tok_loss, keep

    @staticmethod
    def backward(ctx, g_loss: Tensor, _g_tok, _g_keep):
        h_kept, w, kept, probs, tgt = ctx.saved_tensors
        grad = probs  # reuse the buffer: softmax - onehot, scaled
        grad[torch.arange(grad.shape[0], device=grad.device), tgt] -= 1.0
        grad.mul_(g_loss / ctx.n_kept)
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = torch.zeros(ctx.n_rows, w.shape[1], dtype=ctx.h_dtype, device=grad.device)
            grad_h.index_copy_(0, kept, (grad @ w.float()).to(ctx.h_dtype))
        if ctx.needs_input_grad[1]:
            grad_w = (grad.t() @ h_kept.float()).to(w.dtype)
        return grad_h, grad_w, None, None, None


def collider_chunked_ce(h: Tensor, w: Tensor, targets: Tensor, sparsity: float, threshold: float,
                        compiled: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """:class:`KeptRowsCE`'s ``(loss, per_token_loss, kept_mask)`` without ``[N, V]`` logits.

    The selection needs every row's loss before any gradient, so the rows are scored first, one
    chunk of logits at a time and without a graph (:func:`linear_token_losses`); the mean CE of the
    kept rows then goes through :func:`linear_cross_entropy`, whose gradient reaches ``h`` only on
    the kept rows (through ``index_select``). ``h [N, D]``, ``w [V, D]``, ``targets [N]``."""
    tok_loss = linear_token_losses(h, w, targets)  # [N], no graph
    keep = collider_keep(tok_loss, targets >= 0, sparsity, threshold)
    rows = keep.nonzero().squeeze(1)  # [K]
    tgt = targets.index_select(0, rows)
    if compiled:
        # K changes every step and the compiled chunk body is specialised to its row count: pad the
        # kept rows with dropped ones (target -1: no loss, zero gradient) to whole chunks, so that
        # it only ever sees two row counts (a whole chunk, and N's ragged last one)
        chunk = chunk_rows(h.shape[0], w.shape[0], h.device)
        pad = min(-(-rows.numel() // chunk) * chunk, h.shape[0]) - rows.numel()
        rows = torch.cat([rows, (~keep).nonzero().squeeze(1)[:pad]])
        tgt = torch.cat([tgt, tgt.new_full((pad,), -1)])
    loss = linear_cross_entropy(h.index_select(0, rows), w, tgt, compiled)  # mean over the kept rows
    return loss, tok_loss, keep


# --------------------------------------------------------------------------------------------
# The objective


class TrainObjective(Protocol):
    """The trainer's loss seam. Per micro-batch the loop calls ``prepare(x)`` with the inputs, then
    the model's forward calls the objective on its final hidden states ``h [B, T, D]`` and the
    targets ``[B, T]`` (-1: no loss there), inside the forward so DDP / FSDP see one module call.
    It returns the loss to backpropagate and the scalars to log (``ce``, the plain next-token CE,
    is logged as ``loss``). ``line()`` describes it at the start of a run ("" says nothing).

    Pretraining is :class:`Objective`; chat fine-tuning (sft.py) is the same objective on targets
    that its batches mask to the assistant's tokens; distillation (distill.py) wraps it."""

    def prepare(self, x: Tensor) -> None: ...

    def __call__(self, model: Any, h: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]: ...

    def line(self) -> str: ...


class Objective:
    """Callable ``(model, h, targets) -> (loss to backpropagate, {name: logged scalar})``."""

    def __init__(self, mcfg: ModelConfig, tcfg: TrainConfig, chunked_head: bool | None = None,
                 compiled: bool = False) -> None:
        # chunked_head: the LM head and CE through linear_cross_entropy (model/linear_ce.py), for the
        # main loss and every MTP head, so no [B*T, V] logits exist. None: when the model runs with
        # gradient checkpointing (the trainer turns it on for CUDA too). compiled: its per-chunk
        # softmax runs through torch.compile.
        self.chunked_head = chunked_head
        self.compiled = compiled
        self.use_mtp = mcfg.use_mtp
        self.mtp_weight = tcfg.mtp_weight
        self.use_collider = tcfg.use_collider
        self.sparsity = tcfg.collider_sparsity
        self.threshold = tcfg.collider_threshold

    def prepare(self, x: Tensor) -> None:
        """Nothing to do before the forward (the distiller runs its teacher here)."""

    def line(self) -> str:
        return ""

    def __call__(self, model, h: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        stats: dict[str, Tensor] = {}
        V = model.lm_head.weight.shape[0]
        chunked = (self.chunked_head if self.chunked_head is not None
                   else getattr(model, "gradient_checkpointing", False)) and torch.is_grad_enabled()
        if self.use_collider:
            h2 = h.reshape(-1, h.shape[-1])
            y = targets.reshape(-1)
            if chunked:
                loss, tok_loss, keep = collider_chunked_ce(h2, model.lm_head.weight, y, self.sparsity,
                                                           self.threshold, self.compiled)
            else:
                loss, tok_loss, keep = KeptRowsCE.apply(h2, model.lm_head.weight, y, self.sparsity,
                                                        self.threshold)
            valid = y >= 0
            n_valid = valid.sum().clamp(min=1)
            stats["ce"] = (tok_loss.sum() / n_valid).detach()
            stats["kept_frac"] = (keep.sum() / n_valid).detach().float()
        elif chunked:
            loss = linear_cross_entropy(h, model.lm_head.weight, targets, self.compiled)  # no [B*T, V] logits
            stats["ce"] = loss.detach()
        else:
            logits = model.logits(h)
            loss = F.cross_entropy(logits.view(-1, V), targets.reshape(-1), ignore_index=-1)
            del logits
            stats["ce"] = loss.detach()
        if self.use_mtp and model.mtp is not None:
            mtp_losses = []
            for k, head in enumerate(model.mtp.heads, start=1):
                yk = mtp_targets(targets, k)
                if chunked:
                    ce_k = linear_cross_entropy(head(h), model.lm_head.weight, yk, self.compiled)
                elif torch.is_grad_enabled():
                    ce_k = torch.utils.checkpoint.checkpoint(_head_ce, model, head, h, yk,
                                                             use_reentrant=False)
                else:
                    ce_k = _head_ce(model, head, h, yk)
                stats[f"mtp_ce_{k}"] = ce_k.detach()
                mtp_losses.append(ce_k)
            loss = loss + self.mtp_weight * torch.stack(mtp_losses).mean()
        return loss, stats


def _head_ce(model, head, h: Tensor, yk: Tensor) -> Tensor:
    """CE of one MTP head: head -> shared unembedding -> cross-entropy (logits live only here)."""
    logits = model.logits(head(h))
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), yk.reshape(-1), ignore_index=-1)


def build_objective(cfg: Config, device: torch.device, autocast: Any, fingerprint: dict[str, Any],
                    chunked_head: bool | None = None, compiled: bool = False) -> TrainObjective:
    """The config's objective: :class:`Objective`, wrapped by the distiller when ``teacher`` is set
    (``fingerprint``: the run's data, whose tokenizer the teacher must share)."""
    base = Objective(cfg.model, cfg.training, chunked_head=chunked_head, compiled=compiled)
    if not cfg.training.teacher:
        return base
    from .distill import Distiller  # opens the teacher checkpoint

    return Distiller(cfg, base, device, fingerprint, autocast)
