"""Tiny random GPTs for tests: one builder, each test naming only what differs from TINY."""

from __future__ import annotations

from typing import Any

import torch

from nanochat_ternary.config import ModelConfig
from nanochat_ternary.model import GPT

# dim 64, 2 layers, 2 query heads sharing 1 KV head: small enough for one core, GQA exercised
TINY: dict[str, Any] = dict(dim=64, n_layers=2, n_heads=2, n_kv_heads=1)


def tiny_config(**kw: Any) -> ModelConfig:
    """TINY, then ``kw`` (any ModelConfig field)."""
    return ModelConfig(**{**TINY, **kw})


def tiny_model(seed: int = 0, dtype: torch.dtype | None = None, train: bool = False, matrix_scale: float = 1.0,
               **kw: Any) -> GPT:
    """A GPT of ``tiny_config(**kw)`` initialised under ``torch.manual_seed(seed)``.

    ``matrix_scale`` multiplies every matrix (a trained-looking spread of logits instead of a
    near-uniform one); ``dtype`` converts it after that; ``train`` leaves it in train mode (eval
    otherwise)."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(**kw))
    if matrix_scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(matrix_scale)
    if dtype is not None:
        model = model.to(dtype)
    return model.train() if train else model.eval()
