"""Turn the config's ``dataset`` / ``data_path`` into train and val token arrays for the trainer.

Preparing a corpus (training a tokenizer, encoding) happens once and is cached; under torchrun
the main rank prepares while the others wait at a barrier and then read the same cache.
"""

from __future__ import annotations

import os
import stat
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


def check_data_inputs(data_path: str, cache_dir: Path) -> None:
    """What the data loaders will open, checked with ``stat`` before anything opens it.

    A FIFO or a device given as data (``--data-path /dev/zero``, a named pipe) would hang the open or
    read forever; only regular files and directories are data. The cache dir must be a directory we
    can create and write (``NANOCHAT_CACHE=/dev/null``, a read-only or file path): one line here,
    rather than an ``OSError`` from deep in the preparation."""
    if data_path:
        path = Path(data_path).expanduser()
        try:
            st = path.stat()
        except FileNotFoundError:
            raise DataError(f"--data-path {path}: not found") from None
        except OSError as e:
            raise DataError(f"--data-path {path}: cannot read it ({e.strerror or e})") from None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise DataError(f"--data-path {path}: not a regular file or directory (a FIFO, device or socket "
                            f"cannot be read as data)")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(cache_dir, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise DataError(f"cache dir {cache_dir} is unusable ({e.strerror or e}); set NANOCHAT_CACHE to a "
                        f"writable directory") from None


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
        check_data_inputs(cfg.training.data_path, default_cache_dir())
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
