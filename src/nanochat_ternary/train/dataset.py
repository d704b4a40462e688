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
from ..data.corpus import PreparedData
from ..data.datasets import default_cache_dir, load_dataset
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


def _prepare(cfg: Config, show_progress: bool, tokenizer: Path | None) -> PreparedData:
    t = cfg.training
    return load_dataset(t.dataset or None, t.data_path or None, cache_dir=default_cache_dir(),
                        vocab_size=t.tokenizer_vocab_size, n_samples=t.n_samples, seq_len=t.seq_len,
                        seed=t.seed, show_progress=show_progress,
                        val_fraction=t.val_fraction or None,  # 0: the dataset's own default split
                        tokenizer=tokenizer)


def load_training_data(cfg: Config, runtime: Runtime, tokenizer: Path | None = None) -> LoadedData:
    """``tokenizer``: a warm start's (its checkpoint's ``tokenizer.json``): text corpora are encoded
    with it, data with ids of its own must have been made by it (data/datasets.py)."""
    if runtime.is_main:
        pd = _prepare(cfg, show_progress=True, tokenizer=tokenizer)
    runtime.barrier()
    if not runtime.is_main:
        pd = _prepare(cfg, show_progress=False, tokenizer=tokenizer)  # now a cache hit
    t = cfg.training
    name = (t.dataset or ("stdlib" if not t.data_path else "auto")) + (f":{t.data_path}" if t.data_path else "")
    data = LoadedData(name=name, train=pd.train, val=pd.val, vocab_size=pd.vocab_size,
                      tokenizer_path=pd.tokenizer_path, meta=pd.meta)
    if len(data.train) == 0:
        raise DataError(f"dataset {name} has no training tokens")
    if len(data.val) == 0:
        raise DataError(f"dataset {name} has no validation tokens")
    limit = pd.vocab_size if pd.tokenizer_path is not None else cfg.model.vocab_size
    check_token_range(data.train, limit)
    check_token_range(data.val, limit)
    return data
