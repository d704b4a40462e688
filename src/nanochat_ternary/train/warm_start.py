"""Warm start (``init_from``): begin a new run from the weights of a checkpoint, on any data.

What is taken from the checkpoint and what is not, and why:

* **the weights**, all of them (``model.safetensors``): that is the knowledge to keep;
* **its tokenizer** (``tokenizer.json``): the embedding rows and the head mean the strings of that
  tokenizer, so the new data is encoded with it (data/datasets.py); data that comes with other ids
  (synthetic, a prepared dir of another tokenizer) is refused in one line, never trained on silently;
* **not** the optimizer state, the RNG, the step, or the schedule: a warm start is a new run (step
  0, learning rate re-warmed, fresh Muon momentum and AdamW moments). Continuing the *same* run is
  ``resume``, and the two are exclusive.

The model config must match the checkpoint's, the check ``resume`` makes (:func:`check_model_config`).
Every checkpoint of the new run records where it started (``meta.json``: ``warm_start``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import files as ckpt_io
from ..config import ModelConfig
from ..errors import CheckpointError


def check_model_config(meta: dict[str, Any], model: ModelConfig, ckpt: Path, ignore: tuple[str, ...] = ()) -> None:
    """One line naming the first few model fields where ``ckpt``'s config differs from ``model``
    (``ignore``: fields allowed to differ, e.g. ``vocab_size`` when sft adds the chat tokens)."""
    saved = meta["config"].get("model", {})
    diffs = [f"{k}={saved.get(k)!r} (config {v!r})" for k, v in vars(model).items()
             if k in saved and saved[k] != v and k not in ignore]
    if diffs:
        raise CheckpointError(f"checkpoint {ckpt} does not match the config: " + ", ".join(diffs[:4]))


@dataclass
class WarmStart:
    ckpt: Path  # the resolved checkpoint dir (step_NNNNNN)
    meta: dict[str, Any]
    tokenizer_path: Path | None  # its tokenizer.json; None for a model trained on bare token ids

    @classmethod
    def open(cls, spec: str) -> WarmStart:
        """A checkpoint dir, or a run dir (its latest complete checkpoint), as ``resume`` takes."""
        ckpt = ckpt_io.resolve_checkpoint(spec)
        meta = ckpt_io.read_meta(ckpt)
        tok = ckpt / "tokenizer.json"
        return cls(ckpt, meta, tok if tok.is_file() else None)

    def check_data(self, data_tokenizer: Path | None) -> None:
        """A checkpoint trained on bare ids has no tokenizer to encode new text with: its data must be
        bare ids too (their range is checked against the vocab like any run's)."""
        if self.tokenizer_path is None and data_tokenizer is not None:
            raise CheckpointError(f"init_from {self.ckpt}: the checkpoint has no tokenizer.json (it was trained on "
                                  f"bare token ids), so text data cannot be encoded with its vocabulary; "
                                  f"use --dataset tokens with ids of that vocabulary")

    def load_weights(self, model: torch.nn.Module, new_rows_from: int | None = None) -> None:
        """The checkpoint's weights into ``model``. With ``new_rows_from`` (sft adding the chat
        tokens) the checkpoint may have fewer vocab rows than ``model``: it is loaded into a model of
        its own shape, resized (``GPT.resize_vocab``: rows from ``new_rows_from`` on start as the
        mean row) and copied in; this holds a second copy of the weights on the CPU for a moment."""
        if new_rows_from is None:
            ckpt_io.load_model_weights(model, self.ckpt)
            return
        from ..config import Config
        from ..model.gpt import GPT

        old = GPT(Config.from_dict(self.meta["config"]).model)
        ckpt_io.load_model_weights(old, self.ckpt)
        old.resize_vocab(model.cfg.vocab_size, new_rows_from=new_rows_from, seed=int(self.meta["step"]))
        model.load_state_dict(old.state_dict())

    def record(self) -> dict[str, Any]:
        """``meta.json``'s ``warm_start``: where the run began."""
        return {"from": str(self.ckpt.resolve()), "step": int(self.meta["step"]),
                "data": (self.meta.get("data") or {}).get("name"),
                "tokenizer_sha256": (self.meta.get("data_fingerprint") or {}).get("tokenizer_sha256")}

    def line(self) -> str:
        data = self.record()["data"] or "?"
        tok = f"its tokenizer ({self.tokenizer_path.name})" if self.tokenizer_path else "bare token ids"
        return (f"warm start from {self.ckpt} (step {self.meta['step']}, trained on {data}): its weights and "
                f"{tok}; fresh optimizer state, schedule from step 0")


def reset_momentum(optimizers: list[torch.optim.Optimizer], params: list[torch.Tensor]) -> int:
    """Drop the momentum of ``params`` from every optimizer's state (``momentum_buffer``, and the
    8-bit ``momentum_codes`` / ``momentum_scales``): after FIRE on resume, a momentum built for the
    old weights would push the orthogonalised ones back. Other state (a bf16 latent's rounding step
    counter, a GaLore projector) is kept. Returns how many parameters had momentum."""
    n = 0
    for opt in optimizers:
        for p in params:
            state = opt.state.get(p)
            keys = [k for k in (state or {}) if k.startswith("momentum")]
            for k in keys:
                del state[k]
            n += bool(keys)
    return n
