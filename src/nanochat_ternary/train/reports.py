"""What a run prints about itself besides the step log: the measured optimizer state, the sample."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..config import TrainConfig
from ..data.tokenizer import load_tokenizer
from ..generate import generate, prompt_ids
from ..optim.factory import memory_report


def optimizer_memory_line(optimizers: list[torch.optim.Optimizer]) -> str:
    """The optimizer state measured from its tensors after the first step."""
    rep = memory_report(optimizers)
    return (f"optimizer state after step 1 (measured): {rep['variant']}: Muon "
            f"{rep['muon_state_bytes'] / 2**20:.2f} MiB for {rep['muon_params'] / 1e6:.2f}M params "
            f"({rep['bytes_per_muon_param']:.3f} B/param; int8 momenta {rep['muon_int8_tensors']}, "
            f"GaLore-projected {rep['galore_projected']}), AdamW {rep['adamw_state_bytes'] / 2**20:.2f} MiB "
            f"for {rep['adamw_params'] / 1e6:.2f}M params")


def sample_text(model: torch.nn.Module, tokenizer_path: Path, t: TrainConfig, echo: Callable[[str], None]) -> str:
    """``sample_tokens`` tokens continuing ``sample_prompt`` (empty: a new document), printed and returned."""
    tok = load_tokenizer(tokenizer_path)
    prompt = t.sample_prompt
    ids = prompt_ids(tok, prompt)
    out = list(generate(model, ids, max_tokens=t.sample_tokens, temperature=0.8, top_k=50, top_p=0.95, seed=t.seed))
    text = tok.decode((ids if prompt else []) + out)
    echo(f"--- sample ({t.sample_tokens} tokens, prompt {prompt!r}) ---\n{text}\n---")
    return text
