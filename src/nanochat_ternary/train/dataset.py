"""Turn the config's ``dataset`` / ``data_path`` into train and val token arrays for the trainer.

Preparing a corpus (training a tokenizer, encoding) happens once and is cached; under torchrun
the main rank prepares while the others wait at a barrier and then read the same cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..data import prepare
from ..data.tokenfile import check_token_range
from ..errors import DataError
from .runtime import Runtime


@dataclass
class LoadedData:
    name: str
    train: np.ndarray  # token ids (memmap)
    val: np.ndarray
    vocab_size: int  # the tokenizer's vocab, or max id + 1 for bare token files
    tokenizer_path: Path | None
    meta: dict[str, Any]

    @property
    def val_tokens_per_byte(self) -> float | None:
        """Tokens per UTF-8 byte of the val text, to turn nats/token into bits/byte."""
        n_bytes = self.meta.get("val_bytes")
        return len(self.val) / n_bytes if n_bytes else None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "train_tokens": len(self.train), "val_tokens": len(self.val),
                "vocab_size": self.vocab_size, "source": self.meta.get("source")}


def _prepare(cfg: Config) -> prepare.PreparedData:
    t = cfg.training
    cache = prepare.default_cache_dir()
    if t.dataset == "stdlib":
        return prepare.stdlib_dataset(cache, t.tokenizer_vocab_size)
    if t.dataset == "text":
        return prepare.text_dataset(Path(t.data_path), cache, t.tokenizer_vocab_size)
    if t.dataset == "synthetic":
        return prepare.synthetic_dataset(t.n_samples, t.seq_len, t.seed, cache)
    if t.dataset == "tokens":
        return prepare.load_prepared(Path(t.data_path))
    raise DataError(f"unknown dataset '{t.dataset}'")


def load_training_data(cfg: Config, runtime: Runtime) -> LoadedData:
    if runtime.is_main:
        pd = _prepare(cfg)
    runtime.barrier()
    if not runtime.is_main:
        pd = _prepare(cfg)  # now a cache hit
    name = cfg.training.dataset + (f":{cfg.training.data_path}" if cfg.training.data_path else "")
    data = LoadedData(name=name, train=pd.train, val=pd.val, vocab_size=pd.vocab_size,
                      tokenizer_path=pd.tokenizer, meta=pd.meta)
    if len(data.train) == 0:
        raise DataError(f"dataset {name} has no training tokens")
    if len(data.val) == 0:
        raise DataError(f"dataset {name} has no validation tokens")
    check_token_range(data.train, cfg.model.vocab_size if pd.tokenizer is None else max(pd.vocab_size, 1))
    check_token_range(data.val, cfg.model.vocab_size if pd.tokenizer is None else max(pd.vocab_size, 1))
    return data
