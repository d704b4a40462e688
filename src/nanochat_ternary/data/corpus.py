"""Turn text, code and parquet files into a prepared data dir, and load prepared data back.

A prepared data dir holds four files::

    tokenizer.json   byte-level BPE (HF tokenizers) trained on the train split
    train.bin        token file (see ``tokenfile``), documents each followed by <|endoftext|>
    val.bin          held-out documents, same format
    meta.json        source, vocab size, document / token / byte counts, format version

Design choices and why:

* **Documents.** Each text file is one document, each non-empty parquet row is one document. A
  separator token ends every document so the model sees where one file stops and the next begins.
* **Validation is split by document**, not by a cut in the token stream: a cut would put the first
  half of a file in train and its second half in val, and a model that memorised the first half
  would look better than it is. The split is a seeded permutation, so it is reproducible. Only a
  one-document corpus falls back to holding out the tail of its token stream.
* **The tokenizer is trained on the train split only** (on a capped, seeded sample of it when the
  corpus is large, which keeps preparation fast on a 2-core laptop; BPE statistics converge long
  before tens of MB).
* **Bytes are recorded per split** (UTF-8 bytes of the text behind the tokens, separators
  excluded) so that results are comparable across tokenizers:
  ``bits_per_byte = loss_nats * tokens / (bytes * ln 2)``.
* **Atomic.** Everything is written into a hidden temporary dir beside the destination and renamed
  into place at the end, so an interrupted run never leaves a dir that looks complete.
* **Memory.** The decoded text is held in memory while preparing (about the corpus size); tokens
  are streamed to disk. Loading memory-maps the token files, so training never copies them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .tokenfile import check_token_range, read_header, read_tokens, write_tokens
from .tokenizer import MIN_VOCAB_SIZE, Tokenizer, load_tokenizer, train_tokenizer

#: Version of the prepared-dir layout (meta.json ``format_version``).
PREPARED_FORMAT_VERSION = 1
PREPARED_FILES = ("tokenizer.json", "train.bin", "val.bin", "meta.json")
#: The tokenizer is trained on at most this much text (a seeded sample of documents).
TOKENIZER_SAMPLE_BYTES = 48 * 1024 * 1024
#: Documents are encoded in groups of about this many bytes (progress granularity, peak memory).
_ENCODE_GROUP_BYTES = 4 * 1024 * 1024


# ----------------------------------------------------------------------------------------------
# Reading inputs
# ----------------------------------------------------------------------------------------------


@dataclass
class Documents:
    """The decoded documents of a corpus, in deterministic (sorted path, row) order."""

    texts: list[str]
    n_files: int = 0
    skipped: list[str] = field(default_factory=list)  # files passed over as binary/undecodable
    sources: list[str] = field(default_factory=list)  # the inputs, as given (resolved)

    @property
    def n_bytes(self) -> int:
        return sum(len(t.encode("utf-8")) for t in self.texts)


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() == ".parquet"


def _decode_text(path: Path) -> str | None:
    """The file's text, or None for binary (NUL bytes) or non-UTF-8 content."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    if b"\0" in data:  # text files never contain NUL; images, archives and .pyc do
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _read_parquet(path: Path, column: str) -> Iterator[str]:
    """Yield the non-empty string values of ``column``, batch by batch (bounded memory)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"reading {path} needs pyarrow: pip install 'nanochat-ternary[parquet]'") from e
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError subclasses
        raise DataError(f"cannot read parquet file {path}: {str(e).splitlines()[0]}") from e
    names = pf.schema_arrow.names
    if column not in names:
        raise DataError(
            f"parquet file {path} has no column {column!r} (columns: {', '.join(names)});"
            " choose one with parquet_column / --set parquet_column=NAME"
        )
    ctype = pf.schema_arrow.field(column).type
    if not (pa.types.is_string(ctype) or pa.types.is_large_string(ctype)):
        raise DataError(f"parquet column {column!r} in {path} is {ctype}, not text")
    for batch in pf.iter_batches(columns=[column], batch_size=4096):
        for value in batch.column(0).to_pylist():
            if value:
                yield value


def _walk_dir(root: Path, pattern: str, exclude_dirs: frozenset[str], skip: set[Path]) -> list[Path]:
    """Files under ``root`` matching ``pattern``, sorted; hidden and excluded dirs are skipped.

    Hidden entries (.git, .venv, ...) are skipped because they are tooling state, not corpus text.
    A pattern without '/' matches at any depth ("*.py" means "**/*.py").
    """
    if "/" not in pattern and not pattern.startswith("**"):
        pattern = "**/" + pattern
    out = []
    for p in root.glob(pattern):
        rel = p.relative_to(root).parts
        if any(part.startswith(".") for part in rel):
            continue
        if any(part in exclude_dirs for part in rel[:-1]):
            continue
        if not p.is_file():
            continue
        rp = p.resolve()
        if any(rp == s or s in rp.parents for s in skip):
            continue
        out.append(p)
    return sorted(out, key=lambda q: q.relative_to(root).as_posix())


def collect_documents(
    inputs: Sequence[str | Path],
    glob: str = "**/*",
    parquet_column: str = "text",
    exclude_dirs: Iterable[str] = (),
    skip_paths: Iterable[str | Path] = (),
) -> Documents:
    """Read every input into documents.

    ``inputs`` may name text files (must be UTF-8), ``.parquet`` files (``parquet_column`` is read)
    and directories (searched recursively with ``glob``; binary and non-UTF-8 files inside them are
    skipped and counted, since real source trees contain images and the odd Latin-1 file).
    ``exclude_dirs`` are directory names skipped anywhere below a directory input; ``skip_paths``
    are paths never read (the output dir, when it lies inside an input dir).
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if not inputs:
        raise DataError("no input paths given")
    excl = frozenset(exclude_dirs)
    skip = {Path(p).resolve() for p in skip_paths}
    docs = Documents(texts=[])
    for raw in inputs:
        path = Path(raw).expanduser()
        if not path.exists():
            raise DataError(f"input not found: {path}")
        docs.sources.append(str(path.resolve()))
        if path.is_dir():
            files = _walk_dir(path, glob, excl, skip)
            explicit = False
        else:
            files = [path]
            explicit = True
        for f in files:
            docs.n_files += 1
            if _is_parquet(f):
                docs.texts.extend(_read_parquet(f, parquet_column))
                continue
            text = _decode_text(f)
            if text is None:
                if explicit:
                    raise DataError(f"not a UTF-8 text file (binary or another encoding): {f}")
                docs.skipped.append(str(f))
                continue
            if text:
                docs.texts.append(text)
    if docs.n_files == 0:
        where = ", ".join(str(Path(p)) for p in inputs)
        raise DataError(f"no input files matched {glob!r} in {where}")
    if not docs.texts:
        where = ", ".join(str(Path(p)) for p in inputs)
        raise DataError(f"no text found in {where} ({docs.n_files} files, {len(docs.skipped)} skipped)")
    return docs


# ----------------------------------------------------------------------------------------------
# Preparing
# ----------------------------------------------------------------------------------------------


def _split_documents(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of val documents: a seeded choice of round(n * fraction) docs, at least one,
    never all of them."""
    n_val = min(n_docs - 1, max(1, round(n_docs * val_fraction)))
    rng = np.random.Generator(np.random.PCG64(seed))
    mask = np.zeros(n_docs, dtype=bool)
    mask[rng.permutation(n_docs)[:n_val]] = True
    return mask


def _tokenizer_sample(texts: list[str], cap_bytes: int, seed: int) -> list[str]:
    """All texts if they fit in ``cap_bytes``; else a seeded sample of whole documents that does,
    kept in corpus order."""
    sizes = [len(t) for t in texts]  # characters: a cheap, close-enough proxy for bytes
    if sum(sizes) <= cap_bytes:
        return texts
    rng = np.random.Generator(np.random.PCG64([seed, 1]))
    chosen: list[int] = []
    total = 0
    for i in rng.permutation(len(texts)):
        if total >= cap_bytes:
            break
        chosen.append(int(i))
        total += sizes[i]
    return [texts[i] for i in sorted(chosen)]


def _encode_stream(
    tok: Tokenizer, texts: list[str], progress: Callable[[int], None] | None = None
) -> Iterator[np.ndarray]:
    """Yield token chunks for ``texts``, each document followed by the separator."""
    group: list[str] = []
    group_chars = 0

    def flush() -> np.ndarray:
        eot = np.array([tok.eot_id], dtype=np.uint32)
        parts: list[np.ndarray] = []
        for ids in tok.encode_batch(group):
            parts.append(np.asarray(ids, dtype=np.uint32))
            parts.append(eot)
        return np.concatenate(parts)

    for t in texts:
        group.append(t)
        group_chars += len(t)
        if group_chars >= _ENCODE_GROUP_BYTES:
            yield flush()
            if progress:
                progress(group_chars)
            group, group_chars = [], 0
    if group:
        yield flush()
        if progress:
            progress(group_chars)


def _is_replaceable_dir(path: Path) -> bool:
    """An existing output dir may be replaced only if it holds nothing but prepared-data files."""
    return path.is_dir() and all(p.name in PREPARED_FILES for p in path.iterdir())


def _install_dir(tmp: Path, dest: Path) -> None:
    """Move a finished temp dir to ``dest``, replacing an old prepared dir there."""
    if dest.exists() or dest.is_symlink():
        if not _is_replaceable_dir(dest):
            raise DataError(f"output exists and is not a prepared data dir, refusing to overwrite: {dest}")
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dest, old)
        try:
            os.replace(tmp, dest)
        except BaseException:
            os.replace(old, dest)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def _write_meta(path: Path, meta: dict[str, Any]) -> None:
    path.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def prepare_documents(
    docs: Documents,
    out_dir: str | Path,
    vocab_size: int = 4096,
    val_fraction: float = 0.01,
    seed: int = 0,
    show_progress: bool = True,
    source: str | list[str] | None = None,
    extra_meta: dict[str, Any] | None = None,
    tokenizer: Tokenizer | None = None,
) -> Path:
    """Tokenize already-read documents into a prepared data dir (see ``prepare_data``).

    ``tokenizer``: encode with this one (a warm start's, so the ids mean what the checkpoint
    learned) instead of training a BPE on the train split; ``vocab_size`` is then unused."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"vocab size {vocab_size} too small: byte-level BPE needs at least {MIN_VOCAB_SIZE}")
    texts = docs.texts
    if not texts:
        raise DataError("no text to prepare")
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not _is_replaceable_dir(out_dir):
        raise DataError(f"output exists and is not a prepared data dir, refusing to overwrite: {out_dir}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        n_docs = len(texts)
        if n_docs >= 2:
            is_val = _split_documents(n_docs, val_fraction, seed)
            train_texts = [t for t, v in zip(texts, is_val) if not v]
            val_texts = [t for t, v in zip(texts, is_val) if v]
        else:
            train_texts, val_texts = texts, []

        tok = tokenizer if tokenizer is not None else train_tokenizer(
            _tokenizer_sample(train_texts, TOKENIZER_SAMPLE_BYTES, seed), vocab_size, show_progress
        )
        tok.save(tmp / "tokenizer.json")
        vocab = tok.vocab_size

        from tqdm.auto import tqdm

        total_chars = sum(len(t) for t in texts)
        with tqdm(
            total=total_chars, unit="char", unit_scale=True, desc="tokenize", disable=not show_progress
        ) as bar:
            if val_texts:
                n_train = write_tokens(tmp / "train.bin", _encode_stream(tok, train_texts, bar.update), vocab)
                n_val = write_tokens(tmp / "val.bin", _encode_stream(tok, val_texts, bar.update), vocab)
                train_bytes = sum(len(t.encode("utf-8")) for t in train_texts)
                val_bytes = sum(len(t.encode("utf-8")) for t in val_texts)
                n_train_docs, n_val_docs = len(train_texts), len(val_texts)
            else:
                # One document: hold out the tail of its token stream.
                stream = np.concatenate(list(_encode_stream(tok, train_texts, bar.update)))
                if len(stream) < 3:
                    raise DataError(f"too little text to split into train and val ({len(stream)} tokens)")
                n_val_tok = min(len(stream) - 2, max(1, round(len(stream) * val_fraction)))
                cut = len(stream) - n_val_tok
                n_train = write_tokens(tmp / "train.bin", stream[:cut], vocab)
                n_val = write_tokens(tmp / "val.bin", stream[cut:], vocab)
                lengths = np.asarray(tok.token_byte_lengths(), dtype=np.int64)
                train_bytes = int(lengths[stream[:cut]].sum())
                val_bytes = int(lengths[stream[cut:]].sum())
                n_train_docs, n_val_docs = 1, 0

        meta: dict[str, Any] = {
            "source": source if source is not None else (docs.sources or None),
            "vocab_size": vocab,
            "n_docs": n_docs,
            "n_train_docs": n_train_docs,
            "n_val_docs": n_val_docs,
            "train_tokens": n_train,
            "val_tokens": n_val,
            "train_bytes": train_bytes,
            "val_bytes": val_bytes,
            "tokenizer": "tokenizer.json",
            "eot_id": tok.eot_id,
            "n_files": docs.n_files,
            "skipped_files": len(docs.skipped),
            "val_fraction": val_fraction,
            "seed": seed,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "format_version": PREPARED_FORMAT_VERSION,
        }
        if extra_meta:
            meta.update(extra_meta)
        _write_meta(tmp / "meta.json", meta)
        _install_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def prepare_data(
    inputs: Sequence[str | Path] | str | Path,
    out_dir: str | Path,
    vocab_size: int = 4096,
    val_fraction: float = 0.01,
    glob: str = "**/*",
    parquet_column: str = "text",
    seed: int = 0,
    show_progress: bool = True,
    exclude_dirs: Iterable[str] = (),
) -> Path:
    """Read text / code / parquet inputs and write a prepared data dir at ``out_dir``, in memory.

    The whole decoded corpus is held at once (RSS ~2.3 bytes per corpus byte), and an existing
    prepared ``out_dir`` is replaced atomically: for small corpora (the embedded datasets are made
    this way). For a corpus of any size use :func:`~.stream.prepare_stream` (what ``prepare-data``
    runs): streamed with bounded memory, sharded, resumable, never replacing a finished dir.

    Returns ``out_dir``. See ``collect_documents`` for what inputs may be and the module docstring
    for the layout. ``vocab_size`` is an upper bound: a small corpus can yield fewer BPE ids, and
    meta.json records the real size. Raises ``DataError`` for missing inputs, no matching files, no
    text, or an existing ``out_dir`` that holds anything other than a prepared dir.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    out = Path(out_dir).expanduser()
    docs = collect_documents(inputs, glob, parquet_column, exclude_dirs, skip_paths=[out])
    return prepare_documents(
        docs,
        out,
        vocab_size=vocab_size,
        val_fraction=val_fraction,
        seed=seed,
        show_progress=show_progress,
        extra_meta={"glob": glob, "parquet_column": parquet_column},
    )


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


@dataclass
class PreparedData:
    """Token streams ready for training. ``train`` / ``val`` are read-only memmaps (or views)."""

    dir: Path
    tokenizer_path: Path | None
    train: np.ndarray
    val: np.ndarray
    meta: dict[str, Any]
    vocab_size: int

    def load_tokenizer(self) -> Tokenizer | None:
        return load_tokenizer(self.tokenizer_path) if self.tokenizer_path else None

    def bytes_per_token(self, split: str = "val") -> float | None:
        """Average UTF-8 bytes behind one token of ``split``, or None if the bytes are unknown."""
        n_bytes = self.meta.get(f"{split}_bytes")
        n_tok = self.meta.get(f"{split}_tokens")
        if not n_bytes or not n_tok:
            return None
        return n_bytes / n_tok

    def bits_per_byte(self, loss_nats: float, split: str = "val") -> float | None:
        """Convert a mean per-token loss (nats) to bits per byte of text (tokenizer-independent)."""
        bpt = self.bytes_per_token(split)
        return None if bpt is None else loss_nats / (bpt * math.log(2))


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if not isinstance(meta, dict):
        raise DataError(f"{path} is not a JSON object")
    return meta


def _resolve_vocab(meta: dict[str, Any], bins: list[Path], arrays: list[np.ndarray]) -> int:
    """vocab from meta.json, else from the token-file header, else max id + 1."""
    v = meta.get("vocab_size")
    if isinstance(v, int) and v > 0:
        return v
    header_vocab = max(read_header(b)[2] for b in bins)
    if header_vocab > 0:
        return header_vocab
    return max(int(np.max(a)) for a in arrays if len(a)) + 1


def _tokenizer_in(path: Path, meta: dict[str, Any]) -> Path | None:
    """The tokenizer file meta.json names: a plain file name inside the dir, never a path elsewhere
    (a crafted meta.json must not get another file copied into checkpoints)."""
    name = meta.get("tokenizer", "tokenizer.json")
    if name is None:
        return None
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise DataError(f"{path / 'meta.json'}: 'tokenizer' must be a file name inside {path}, got {name!r}")
    p = path / name
    if not p.is_file():
        return None
    if p.is_symlink() or p.resolve().parent != path.resolve():
        raise DataError(f"{path / 'meta.json'}: tokenizer {name!r} must be a regular file inside {path}, not a link")
    return p


def _load_sharded(path: Path, meta: dict[str, Any]) -> PreparedData:
    """A dir written by ``prepare-data`` with shards (see ``shards``): each split one token array."""
    from .shards import INDEX_NAME, ShardedTokens, read_index, shard_paths

    if meta.get("layout") == "datatrove":  # written by HF datatrove's tokenizer (data/datatrove_io.py)
        from .datatrove_io import load_split

        train, val = (load_split(path, meta, sp) for sp in ("train", "val"))
    else:
        idx = read_index(path / INDEX_NAME)
        if not idx.get("complete"):
            raise DataError(f"{path / INDEX_NAME} is not marked complete: run the same prepare-data command to resume")
        train, val = (ShardedTokens(shard_paths(path, idx, sp)) for sp in ("train", "val"))
    vocab = meta.get("vocab_size")
    if not isinstance(vocab, int) or vocab <= 0:
        raise DataError(f"{path / 'meta.json'}: 'vocab_size' must be a positive integer, got {vocab!r}")
    for arr, sp in ((train, "train"), (val, "val")):
        check_token_range(arr, vocab, f"the {sp} shards of {path}")
    return PreparedData(path, _tokenizer_in(path, meta), train, val, meta, vocab)  # type: ignore[arg-type]


def load_prepared(path: str | Path, val_fraction: float = 0.01) -> PreparedData:
    """Load a prepared data dir, or a single ``.bin`` token file.

    A dir must hold ``train.bin`` and ``val.bin``; ``meta.json`` and ``tokenizer.json`` are used when
    present. A single file that is the ``train.bin`` of a prepared dir loads that dir. Any other lone
    ``.bin`` is split in place: its last ``val_fraction`` of tokens (at least one) is the val split
    (views, no copy). A lone ``.bin`` has no tokenizer; its vocab size comes from a ``meta.json``
    beside it, else from its header, else the largest id + 1. Every token id is checked against
    the vocab size.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    if path.is_file() and path.name == "train.bin" and (path.parent / "val.bin").is_file():
        path = path.parent
    if path.is_dir():
        meta = _read_meta(path / "meta.json") if (path / "meta.json").is_file() else {}
        if (path / "index.json").is_file() and not meta:
            raise DataError(f"{path} is an unfinished prepare-data output (index.json, no meta.json): run the "
                            "same prepare-data command again to resume it")
        if meta.get("layout") in ("shards", "datatrove"):
            return _load_sharded(path, meta)
        train_bin, val_bin = path / "train.bin", path / "val.bin"
        for b in (train_bin, val_bin):
            if not b.is_file():
                raise DataError(f"not a prepared data dir (no {b.name}): {path} — run prepare-data")
        train, val = read_tokens(train_bin), read_tokens(val_bin)
        vocab = _resolve_vocab(meta, [train_bin, val_bin], [train, val])
        for arr, b in ((train, train_bin), (val, val_bin)):
            check_token_range(arr, vocab, b)
        return PreparedData(path, _tokenizer_in(path, meta), train, val, meta, vocab)

    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    tokens = read_tokens(path)
    if len(tokens) < 2:
        raise DataError(f"token file too small to split into train and val ({len(tokens)} tokens): {path}")
    side_meta = path.parent / "meta.json"
    meta_src = _read_meta(side_meta) if side_meta.is_file() else {}
    vocab = _resolve_vocab(meta_src, [path], [tokens])
    check_token_range(tokens, vocab, path)
    n_val = min(len(tokens) - 1, max(1, round(len(tokens) * val_fraction)))
    cut = len(tokens) - n_val
    meta = {
        "source": str(path.resolve()),
        "vocab_size": vocab,
        "train_tokens": cut,
        "val_tokens": n_val,
        "val_split": f"last {val_fraction:g} of the token stream",
    }
    return PreparedData(path.parent, None, tokens[:cut], tokens[cut:], meta, vocab)
