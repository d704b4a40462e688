"""What data a checkpoint was trained on, so a resume on other data is caught instead of silent.

A checkpoint's data position is a step number: batch order is a pure function of (seed, step,
rank) over the token array. Resumed on a different token array (another corpus, the same corpus
re-tokenized, a re-prepared dir) the same step names other windows, the tokenizer maps ids to other
strings, and the run silently becomes something else. ``meta.json`` therefore records a
fingerprint of the training tokens and the tokenizer, and a resume that does not match is refused
unless the user says ``--set allow_data_change=true``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError

#: token arrays up to this many bytes are hashed whole; larger ones by evenly spaced blocks
FULL_HASH_BYTES = 64 * 2**20
_BLOCKS, _BLOCK_BYTES = 256, 64 * 2**10


def _array_digest(a: np.ndarray) -> str:
    """sha256 of the token bytes. Beyond 64 MiB, of 256 evenly spaced 64 KiB blocks plus the length
    (4 MiB read instead of a full pass over a multi-GB memmap at every start); a change confined to
    the gaps between blocks goes unseen there, a re-tokenization or another corpus does not."""
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    flat = a.reshape(-1).view(np.uint8)  # a view: a memmap is not read here
    h = hashlib.sha256(f"{a.dtype.str}:{a.size}:".encode())
    if flat.size <= FULL_HASH_BYTES:
        h.update(memoryview(flat))
    else:
        for i in range(_BLOCKS):
            start = (flat.size - _BLOCK_BYTES) * i // (_BLOCKS - 1)
            h.update(memoryview(flat[start:start + _BLOCK_BYTES]))
    return h.hexdigest()


def data_fingerprint(train: np.ndarray, tokenizer_path: Path | None, vocab_size: int) -> dict[str, Any]:
    tok = hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest() if tokenizer_path else None
    return {"train_tokens": int(train.size), "train_sha256": _array_digest(train), "tokenizer_sha256": tok,
            "vocab_size": int(vocab_size)}


def check_resume_data(saved: dict[str, Any] | None, now: dict[str, Any], ckpt: Path, allow: bool,
                      warn: Callable[[str], None]) -> None:
    """Refuse (one line) a resume on data other than the checkpoint's, unless ``allow``.

    Checkpoints written before fingerprints existed carry none and are not checked."""
    if not saved:
        return
    diffs = []
    for key, value in now.items():
        if saved.get(key) != value:
            old, new = saved.get(key), value
            if isinstance(old, str) and isinstance(new, str):  # digests: a prefix is enough to tell
                old, new = old[:12], new[:12]
            diffs.append(f"{key} {old} -> {new}")
    if not diffs:
        return
    what = ", ".join(diffs)
    if allow:
        warn(f"warning: resuming {ckpt} on different data ({what}); allowed by allow_data_change")
        return
    raise DataError(f"checkpoint {ckpt} was trained on different data ({what}): its data position would mean "
                    f"other batches here. Resume with the same dataset and tokenizer, or pass "
                    f"--set allow_data_change=true to go on with this data")
