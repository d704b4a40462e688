"""Past one machine: tokenize with HF datatrove's pipeline, train on what it writes.

Why datatrove, and why its own tokenizer stage: for a corpus that needs many machines, the hard
parts are the executor (SLURM / Ray / local, task retries, which task already finished), remote
storage (fsspec: S3, GCS, HF Hub) and the readers and filters (JSONL, parquet, WARC, dedup,
language filters). datatrove has all of them and its ``DocumentTokenizer`` is what FineWeb was
tokenized with; re-implementing that here would be the home-made engine the design rules out. So
the split of work is: datatrove reads, filters and tokenizes (with *our* ``tokenizer.json``, so ids
mean what a nanochat model learns), and our loader reads its output as a shard set, memory-mapped,
exactly like a ``prepare-data`` dir. Its ``.ds`` files are bare little-endian uint16/uint32 token
arrays, documents each followed by ``<|endoftext|>`` (``eos_token``), which is the stream our
sampler expects.

The validation split stays ours: ``split_filter`` keeps the documents of one split by the same
seeded hash of a document's id that ``prepare-data`` uses for its keys, so the train and the val
pipeline (``tokenize_pipelines``) see disjoint documents, decided per document without
coordination between tasks. ``finish_dir`` then checks the two outputs, copies the tokenizer and
writes ``meta.json`` (``layout: datatrove``); ``nanochat-train train --dataset tokens --data-path
OUT`` trains on it.

Layout of OUT::

    tokenizer.json  meta.json  train/*.ds  val/*.ds   (plus datatrove's .ds.index / .ds.metadata)
"""

from __future__ import annotations

import functools
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .corpus import PREPARED_FORMAT_VERSION
from .shards import ShardedTokens
from .stream import _unit_hash
from .tokenizer import EOT, load_tokenizer

LAYOUT = "datatrove"

try:  # an optional dependency: only the pipeline side needs it, the loader does not
    from datatrove.pipeline.tokens import DocumentTokenizer as _DocumentTokenizer
except ImportError:  # pragma: no cover - exercised where datatrove is absent
    _DocumentTokenizer = object  # type: ignore[assignment,misc]


class OurDocumentTokenizer(_DocumentTokenizer):  # type: ignore[misc,valid-type]
    """datatrove's tokenizer stage with our rule that text is data: a literal ``<|endoftext|>`` inside a
    document is encoded as its bytes (``encode_special_tokens``, not stored in tokenizer.json), so the
    only separators are the ones between documents, as in ``prepare-data``. Module level, so the
    executors can pickle it."""

    @functools.cached_property
    def tokenizer(self) -> Any:
        tok = _DocumentTokenizer.tokenizer.func(self)  # type: ignore[attr-defined]
        tok.encode_special_tokens = True
        return tok


def in_split(doc_id: str, split: str, val_fraction: float, seed: int = 0) -> bool:
    """Whether the document ``doc_id`` belongs to ``split`` (the seeded per-document draw)."""
    is_val = _unit_hash(seed, doc_id) < val_fraction
    return is_val if split == "val" else not is_val


def split_filter(split: str, val_fraction: float, seed: int = 0) -> Any:
    """A datatrove filter step that keeps the documents of ``split``."""
    from datatrove.pipeline.filters import LambdaFilter

    return LambdaFilter(lambda doc: in_split(str(doc.id), split, val_fraction, seed))


def tokenize_pipelines(make_reader: Any, out: str | Path, tokenizer: str | Path, val_fraction: float = 0.01,
                       seed: int = 0, batch_size: int = 1000) -> dict[str, list[Any]]:
    """The train and the val pipeline: ``make_reader()`` (a fresh datatrove reader step) -> the
    split's filter -> ``DocumentTokenizer`` into ``out/<split>`` with our tokenizer. Run each with
    any datatrove executor (``LocalPipelineExecutor``, ``SlurmPipelineExecutor``, ...)."""
    if _DocumentTokenizer is object:
        raise DataError("tokenizing with datatrove needs it installed: pip install datatrove")
    return {split: [make_reader(), split_filter(split, val_fraction, seed),
                    OurDocumentTokenizer(output_folder=str(Path(out) / split), tokenizer_name_or_path=str(tokenizer),
                                      eos_token=EOT, batch_size=batch_size, shuffle_documents=False,
                                      save_final_metadata=True)]
            for split in ("train", "val")}


def _ds_files(out: Path, split: str) -> list[Path]:
    root = (out / split).resolve()
    files = sorted(p for p in (out / split).glob("*.ds") if p.is_file())
    for p in files:
        if p.is_symlink() or p.resolve().parent != root:
            raise DataError(f"{p} must be a regular file inside {out / split}")
    if not files:
        raise DataError(f"no datatrove token files (*.ds) in {out / split}: run the {split} pipeline first")
    return files


def _dtype(vocab: int) -> str:
    return "<u2" if vocab <= 65536 else "<u4"


def _bytes(tokens: ShardedTokens, lengths: np.ndarray) -> int:
    """UTF-8 bytes behind the tokens (bits per byte), in chunks of 16M tokens."""
    return sum(int(lengths[tokens[i:i + (1 << 24)]].sum()) for i in range(0, len(tokens), 1 << 24))


def finish_dir(out: str | Path, tokenizer: str | Path, val_fraction: float, seed: int = 0) -> dict[str, Any]:
    """Check the two pipelines' outputs, copy the tokenizer, write ``meta.json``; return it."""
    out = Path(out)
    tok = load_tokenizer(tokenizer)
    if Path(tokenizer).resolve() != (out / "tokenizer.json").resolve():
        shutil.copyfile(tokenizer, out / "tokenizer.json")
    lengths = np.asarray(tok.token_byte_lengths(), dtype=np.int64)
    meta: dict[str, Any] = {"source": f"datatrove:{out}", "vocab_size": tok.vocab_size, "tokenizer": "tokenizer.json",
                            "eot_id": tok.eot_id, "layout": LAYOUT, "val_fraction": val_fraction, "seed": seed,
                            "split_rule": "per document, seeded hash of its datatrove id"}
    for split in ("train", "val"):
        arr = ShardedTokens(_ds_files(out, split), _dtype(tok.vocab_size))
        meta[f"{split}_tokens"] = len(arr)
        meta[f"{split}_bytes"] = _bytes(arr, lengths)
        meta[f"n_{split}_docs"] = int(sum(np.count_nonzero(a == tok.eot_id) for a in arr.arrays))
        meta[f"{split}_shards"] = len(arr.paths)
    meta["n_docs"] = meta["n_train_docs"] + meta["n_val_docs"]
    meta["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta["format_version"] = PREPARED_FORMAT_VERSION
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def load_split(out: Path, meta: dict[str, Any], split: str) -> ShardedTokens:
    """A split of a finished datatrove dir as one token array (the loader's entry point)."""
    vocab = meta.get("vocab_size")
    if not isinstance(vocab, int) or vocab <= 0:
        raise DataError(f"{out / 'meta.json'}: 'vocab_size' must be a positive integer, got {vocab!r}")
    return ShardedTokens(_ds_files(out, split), _dtype(vocab))
