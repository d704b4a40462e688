"""Chat fine-tuning (sft) on the same Trainer: conversations in, loss on the assistant's tokens only.

What differs from pretraining, and nothing else (so every optimizer, low-memory option, resume,
signal handling and checkpoint of ``train`` works unchanged):

* **the tokenizer** gains the four chat markers (data/chat_template.py), written to the cache and
  copied into every checkpoint, so ``open_checkpoint`` + ``ChatTemplate`` work on the result;
* **the vocab** grows to the new tokenizer's size rounded up to 64 (the trainer's rule); the warm
  start loads the base weights and resizes the embeddings and head (``GPT.resize_vocab``: the new
  rows, and any row the base tokenizer never used, start as the mean row). The blocks are untouched;
* **the batches** carry the template's mask: a target is -1 (no loss) unless it is an assistant
  content token or the ``<|end|>`` closing an assistant turn. Two ways to make rows
  (``sft_batching``): ``pack`` cuts the stream of conversations (each starting with
  ``<|endoftext|>``) into fixed ``seq_len`` windows exactly like pretraining (a conversation may
  span two rows); ``pad`` puts one conversation per row (cut at ``seq_len``), padded to the longest
  row of its batch. Both are pure functions of (seed, step, micro, rank), so resume is exact.
  Measured speed: docs/chat_and_serving.md (benchmarks/sft_batching.py).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config, TrainConfig
from ..data.batches import TokenBatches, _gather, val_batches
from ..data.chat_template import ChatTemplate, add_chat_tokens, has_chat_tokens
from ..data.datasets import default_cache_dir
from ..data.tokenizer import load_tokenizer
from ..errors import ConfigError, DataError
from .dataset import LoadedData
from .runtime import Runtime

SFT_BATCHING = ("pack", "pad")


@dataclass
class Encoded:
    """Conversations as one stream: ``tokens[bounds[i]:bounds[i+1]]`` is conversation ``i``."""

    tokens: np.ndarray  # [N] int32
    mask: np.ndarray  # [N] uint8: 1 where the token is a trained target
    bounds: np.ndarray  # [n + 1] int64

    @property
    def trained_tokens(self) -> int:
        return int(self.mask.sum())


def encode_conversations(template: ChatTemplate, convs: list[list[dict[str, str]]]) -> Encoded:
    ids: list[int] = []
    mask: list[bool] = []
    bounds = [0]
    for conv in convs:
        i, m = template.encode_with_mask(conv)
        ids += i
        mask += m
        bounds.append(len(ids))
    return Encoded(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8),
                   np.asarray(bounds, dtype=np.int64))


def _masked(x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x, y.masked_fill(keep == 0, -1)


class PackedSFTBatches(TokenBatches):
    """:class:`TokenBatches` over the conversation stream; targets outside the mask are -1."""

    def __init__(self, enc: Encoded, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, grad_accum_steps: int = 1) -> None:
        super().__init__(enc.tokens, batch_size, seq_len, seed, rank, world_size, grad_accum_steps)
        self.mask = enc.mask

    def get(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.window_starts(step, micro)
        x, y = _gather(self.tokens, starts, self.seq_len)
        _, keep = _gather(self.mask, starts, self.seq_len)  # the mask of each target, y's alignment
        return _masked(x, y, keep)


class PaddedSFTBatches:
    """One conversation per row, padded per batch. The sampling is :class:`TokenBatches`' with
    conversations for windows: global sample ``g`` is conversation ``perm_e[g mod n]`` of epoch
    ``e = g // n``, ``perm_e`` from ``PCG64([seed, e])``."""

    def __init__(self, enc: Encoded, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, grad_accum_steps: int = 1, pad_id: int = 0) -> None:
        b = enc.bounds
        # a row holds seq_len + 1 tokens (inputs and shifted targets)
        self.rows = [(enc.tokens[b[i]:min(b[i + 1], b[i] + seq_len + 1)],
                      enc.mask[b[i]:min(b[i + 1], b[i] + seq_len + 1)]) for i in range(len(b) - 1)]
        self.rows = [r for r in self.rows if r[1][1:].any()]  # an assistant turn past seq_len: nothing to learn
        if not self.rows:
            raise DataError(f"no conversation has an assistant token within seq_len = {seq_len}")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.grad_accum_steps = rank, world_size, grad_accum_steps
        self.pad_id = pad_id
        self.windows_per_epoch = len(self.rows)
        self._perm_cache: dict[int, np.ndarray] = {}

    samples_per_step = TokenBatches.samples_per_step
    tokens_per_step = TokenBatches.tokens_per_step
    steps_per_epoch = TokenBatches.steps_per_epoch
    epoch_of = TokenBatches.epoch_of
    epochs_done = TokenBatches.epochs_done

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) >= 4:
                self._perm_cache.pop(next(iter(self._perm_cache)))
            self._perm_cache[epoch] = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(
                self.windows_per_epoch)
        return self._perm_cache[epoch]

    def row_ids(self, step: int, micro: int = 0) -> list[int]:
        first = ((step * self.grad_accum_steps + micro) * self.world_size + self.rank) * self.batch_size
        n = self.windows_per_epoch
        return [int(self._perm(g // n)[g % n]) for g in range(first, first + self.batch_size)]

    def get(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_rows([self.rows[i] for i in self.row_ids(step, micro)], self.pad_id)


def pad_rows(rows: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` ``[B, T]`` with ``T`` = the longest row - 1; padding: ``pad_id`` in x, -1 in y."""
    T = max(len(t) for t, _ in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    for r, (tok, keep) in enumerate(rows):
        t = torch.from_numpy(tok.astype(np.int64))
        k = torch.from_numpy(keep[1:].astype(bool))
        x[r, :len(t) - 1] = t[:-1]
        y[r, :len(t) - 1] = t[1:].masked_fill(~k, -1)
    return x, y


def _save_tokenizer(tok: Any) -> Path:
    """The chat tokenizer in the cache under its content hash (written atomically: every rank may)."""
    text = tok.hf.to_str()
    d = default_cache_dir() / "sft-tokenizers"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    if not path.is_file():
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return path


class SFTTask:
    """The Trainer's ``task`` for sft (trainer.py): its data, batches and warm-start vocab rule."""

    command = "sft"
    warm_ignore = ("vocab_size",)  # the base checkpoint has the vocab before the chat tokens

    def __init__(self, train: list[list[dict[str, str]]], val: list[list[dict[str, str]]], source: str,
                 tokenizer_path: Path, fresh: bool) -> None:
        """``tokenizer_path``: the base checkpoint's (``fresh``: a warm start, the chat rows get the
        mean init) or the resumed sft checkpoint's tokenizer."""
        self.train, self.val, self.source = train, val, source
        self.tokenizer_path = tokenizer_path
        self.fresh = fresh
        self.new_rows_from: int | None = None
        self.template: ChatTemplate | None = None

    def load_data(self, cfg: Config, runtime: Runtime, tokenizer: Path | None = None) -> LoadedData:
        t = cfg.training
        if t.sft_batching not in SFT_BATCHING:
            raise ConfigError(f"sft_batching = {t.sft_batching!r} is not valid (allowed: {', '.join(SFT_BATCHING)})")
        tok = load_tokenizer(self.tokenizer_path)
        had = has_chat_tokens(tok)
        base_size = tok.vocab_size
        add_chat_tokens(tok)
        if self.fresh:
            # the chat tokens' rows, and base rows no tokenizer id reaches, start as the mean row
            self.new_rows_from = tok.vocab_size if had else base_size
        self.template = ChatTemplate(tok)
        self.enc = encode_conversations(self.template, self.train)
        self.enc_val = encode_conversations(self.template, self.val)
        meta = {"source": self.source, "conversations": len(self.train), "val_conversations": len(self.val),
                "trained_tokens": self.enc.trained_tokens, "sft_batching": t.sft_batching}
        return LoadedData(name=f"sft:{self.source}", train=self.enc.tokens, val=self.enc_val.tokens,
                          vocab_size=tok.vocab_size, tokenizer_path=_save_tokenizer(tok), meta=meta)

    def batches(self, data: LoadedData, t: TrainConfig, rt: Runtime) -> tuple[Any, list]:
        """The training batches and the fixed validation batches (masked the same way)."""
        kw = dict(rank=rt.rank, world_size=rt.world_size, grad_accum_steps=t.grad_accum_steps)
        if t.sft_batching == "pad":
            train = PaddedSFTBatches(self.enc, t.batch_size, t.seq_len, t.seed, pad_id=self.template.end_id, **kw)
            vb = PaddedSFTBatches(self.enc_val, t.batch_size, t.seq_len, 0, pad_id=self.template.end_id)
            rows = vb.rows[:t.batch_size * t.eval_batches]
            val = [pad_rows(rows[i:i + t.batch_size], vb.pad_id) for i in range(0, len(rows), t.batch_size)]
            return train, val
        train = PackedSFTBatches(self.enc, t.batch_size, t.seq_len, t.seed, **kw)
        seq = min(t.seq_len, len(self.enc_val.tokens) - 1)
        xs = val_batches(self.enc_val.tokens, t.batch_size, seq, t.eval_batches)
        ms = val_batches(self.enc_val.mask, t.batch_size, seq, t.eval_batches)  # the same windows
        return train, [_masked(x, y, k) for (x, y), (_, k) in zip(xs, ms)]
