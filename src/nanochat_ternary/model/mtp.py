"""Multi-token prediction (MTP) heads: extra training-only predictions of tokens further ahead.

Head ``k`` (``k = 1 .. n``) reads the trunk's final hidden state at position ``t`` and predicts
token ``t + 1 + k`` (the main LM head predicts ``t + 1``). Each head is a residual projection::

    h_k = RMSNorm_out( h + W_k · RMSNorm_in(h) )   ->   shared unembedding (the LM head)

Why a projection and not a transformer layer per head: the heads exist to shape the trunk's
representation (the gradient they send back), not to be good predictors themselves; one D×D matrix
per head gives each head its own view of ``h`` at 1/12 of a transformer layer's parameters and no
attention activations, so n = 4 heads add ~4 D² params and, with the per-head checkpointing of
:mod:`..train.objective`, about one head's logits of peak memory. A full layer per head (DeepSeek-V3
style) would add ~n/L of the trunk's compute and activations.

The heads are full precision (``nn.Linear``, not BitLinear): they are dropped at inference, so
nothing is gained by making them ternary. Their parameters are named ``mtp.*`` — not ``blocks.*`` — so
the optimizer factory gives them to AdamW along with the embedding and LM head (a deliberate choice:
they sit next to the unembedding, whose optimizer they share). They are saved in checkpoints;
generation and export ignore them (``GPT.forward`` / ``hidden_states`` never call them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig


class MTPHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm_in = _RMSNorm(cfg.dim, cfg.norm_eps)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.norm_out = _RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, h: Tensor) -> Tensor:
        """``h: [..., D]`` trunk hidden states -> this head's hidden states ``[..., D]``."""
        return self.norm_out(h + self.proj(self.norm_in(h)))


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class MTPHeads(nn.Module):
    """``n`` heads; ``heads[k - 1]`` predicts token ``t + 1 + k``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads = nn.ModuleList(MTPHead(cfg) for _ in range(cfg.mtp_n_tokens))

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        for head in self.heads:
            nn.init.normal_(head.proj.weight, mean=0.0, std=std)
            nn.init.ones_(head.norm_in.weight)
            nn.init.ones_(head.norm_out.weight)


def mtp_targets(targets: Tensor, k: int) -> Tensor:
    """Targets of head ``k``: ``out[:, t] = targets[:, t + k]`` (token ``t + 1 + k``), ``-1`` (ignored)
    for the last ``k`` positions, whose token lies beyond the batch."""
    out = torch.full_like(targets, -1)
    if k < targets.shape[1]:
        out[:, : targets.shape[1] - k] = targets[:, k:]
    return out
