"""Parameter counts and weight sizes of a config, computed on the meta device.

Building the model under ``torch.device("meta")`` gives real parameter shapes without allocating
storage, so ``info`` works for the 7B preset on a laptop.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import Config
from .gpt import GPT


def model_info(cfg: Config) -> dict[str, Any]:
    with torch.device("meta"):
        model = GPT(cfg.model)
    seen: set[int] = set()
    muon = adamw = 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name.startswith("blocks.") and p.ndim == 2:
            muon += p.numel()
        else:
            adamw += p.numel()
    total = model.num_params()
    # packed ternary export: 2 bits per block weight + one fp16 scale per group; the rest in fp16
    group = cfg.model.group_size
    ternary_bytes = muon // 4 + 2 * ((muon + group - 1) // group) + 2 * adamw
    return {
        "preset": cfg.preset,
        "params": total,
        "non_embedding_params": model.num_params(non_embedding=True),
        "muon_params": muon,
        "adamw_params": adamw,
        "fp32_weight_bytes": 4 * total,
        "ternary_packed_bytes": ternary_bytes,
        "fp32_optimizer_state_bytes": 4 * muon + 8 * adamw,
        "dim": cfg.model.dim,
        "n_layers": cfg.model.n_layers,
        "n_heads": cfg.model.n_heads,
        "n_kv_heads": cfg.model.n_kv_heads,
        "ffn_hidden": cfg.model.hidden_dim,
        "vocab_size": cfg.model.vocab_size,
        "max_seq_len": cfg.model.max_seq_len,
        "weight_tied": cfg.model.weight_tied,
    }
