"""Sharded token files: fixed-size ``.bin`` shards plus ``index.json``, written resumably and read
back as one token stream.

Layout of a sharded prepared dir::

    tokenizer.json
    train-00000.bin ...   token files (see ``tokenfile``), each exactly ``shard_tokens`` tokens but
    val-00000.bin ...     the last of its split; a document may continue into the next shard
    index.json            the shards finished so far, and where the input stream stands for each
    meta.json             written last: its presence marks the dir complete

Why so: a 100B-token corpus is hundreds of GB; one file would have to be rewritten from the start
after any interruption. Each shard is written to a temp file, fsynced and renamed, and only then
entered in ``index.json`` (itself replaced atomically), so a crash or a full disk leaves every
listed shard whole. A split's record in the index names the unit (document piece) of the input
stream its next shard starts with and how many of that unit's tokens are already in the last
shard; encoding is deterministic, so a resumed prepare re-encodes that unit, drops those tokens
and writes exactly the shards an uninterrupted run would have.

``ShardedTokens`` presents a split's shards as one read-only 1-D token array (each shard a
``numpy.memmap``, nothing read until indexed), so the batch sampler, the data position kept in
checkpoints (a step number over the concatenated stream) and torchrun's disjoint windows work
unchanged across shard boundaries, and a 1B-token set costs the memory of a 1M one.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .tokenfile import _pack_header, check_token_range, dtype_for_vocab, read_header, read_tokens

INDEX_NAME = "index.json"
INDEX_FORMAT = "nanochat-ternary shards"
INDEX_VERSION = 1
#: Shard file names: "<split>-<5+ digits>.bin"; anything else named in an index is refused.
SHARD_NAME = re.compile(r"^(train|val)-\d{5,}\.bin$")
#: Byte views up to this size are materialised for whole-array hashing (= train/fingerprint.py's
#: FULL_HASH_BYTES: larger arrays are hashed by 64 KiB blocks, which slicing serves).
FULL_VIEW_BYTES = 64 * 2**20


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:05d}.bin"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp file beside ``path``, fsync, rename over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(obj, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def disk_error(e: OSError, what: Path) -> DataError:
    """One line for a write that failed (full disk, quota, I/O error)."""
    why = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
    return DataError(f"{why} while writing {what}; the finished shards are kept: free space and run the "
                     "same prepare-data command again to resume")


@dataclass
class SplitState:
    """A split's progress as recorded in the index (only finished shards count)."""

    shards: list[dict[str, Any]] = field(default_factory=list)  # {"file", "tokens"}
    next_unit: int = 0  # the unit the next shard starts in
    skip: int = 0  # tokens of that unit already in the last shard
    docs: int = 0  # documents, bytes and tokens written (the open shard excluded)
    bytes: int = 0
    tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"shards": self.shards, "next_unit": self.next_unit, "skip": self.skip, "docs": self.docs,
                "bytes": self.bytes, "tokens": self.tokens}

    @classmethod
    def from_json(cls, d: Any, where: Path) -> SplitState:
        try:
            st = cls(shards=list(d["shards"]), next_unit=int(d["next_unit"]), skip=int(d["skip"]),
                     docs=int(d["docs"]), bytes=int(d["bytes"]), tokens=int(d["tokens"]))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{where}: a split record is malformed ({e}); delete the dir and prepare again") from e
        for s in st.shards:
            if not isinstance(s, dict) or not isinstance(s.get("file"), str) or not isinstance(s.get("tokens"), int):
                raise DataError(f"{where}: a shard entry is malformed: {s!r}")
        return st


class ShardWriter:
    """Appends a split's tokens to fixed-size shards in ``out``; calls ``on_shard`` after each one is
    safely on disk (the caller records the index). ``shard_tokens == 0``: one file, ``<split>.bin``."""

    def __init__(self, out: Path, split: str, vocab_size: int, shard_tokens: int, state: SplitState,
                 on_shard: Any) -> None:
        self.out, self.split, self.vocab = out, split, vocab_size
        self.dtype = dtype_for_vocab(vocab_size)
        self.shard_tokens = shard_tokens
        self.state = state
        self.on_shard = on_shard
        self._f: Any = None
        self._tmp: str | None = None
        self._count = 0  # tokens in the open shard
        self._pending = [state.docs, state.bytes]  # counters including the open shard's units

    def _path(self) -> Path:
        if self.shard_tokens == 0:
            return self.out / f"{self.split}.bin"
        return self.out / shard_name(self.split, len(self.state.shards))

    def _open(self) -> None:
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self._path().name}.", suffix=".tmp", dir=self.out)
        self._f = os.fdopen(fd, "wb")
        self._f.write(_pack_header(self.dtype, 0, self.vocab))
        self._count = 0

    def add_unit(self, unit_index: int, tokens: np.ndarray, n_bytes: int, ends_doc: bool, skip: int = 0) -> None:
        """Append ``tokens[skip:]`` of unit ``unit_index``. ``skip > 0`` only for the unit a resumed
        shard starts in, whose bytes and document were counted before the interruption."""
        if skip == 0:
            self._pending[0] += int(ends_doc)
            self._pending[1] += n_bytes
        pos = skip
        n = len(tokens)
        while pos < n:
            if self._f is None:
                self._open()
            room = n - pos if self.shard_tokens == 0 else min(n - pos, self.shard_tokens - self._count)
            self._write(tokens[pos:pos + room])
            pos += room
            if self.shard_tokens and self._count == self.shard_tokens:
                nxt, sk = (unit_index + 1, 0) if pos == n else (unit_index, pos)
                self._close(nxt, sk)

    def _write(self, chunk: np.ndarray) -> None:
        check_token_range(chunk, self.vocab, self._path())
        try:
            self._f.write(np.ascontiguousarray(chunk, dtype=self.dtype).tobytes())
        except OSError as e:
            self.abort()
            raise disk_error(e, self._path()) from e
        self._count += len(chunk)

    def _close(self, next_unit: int, skip: int) -> None:
        path = self._path()
        try:
            self._f.seek(0)
            self._f.write(_pack_header(self.dtype, self._count, self.vocab))
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.chmod(self._tmp, 0o644)
            os.replace(self._tmp, path)
        except OSError as e:
            self.abort()
            raise disk_error(e, path) from e
        self._f, self._tmp = None, None
        st = self.state
        st.shards.append({"file": path.name, "tokens": self._count})
        st.next_unit, st.skip = next_unit, skip
        st.docs, st.bytes = self._pending
        st.tokens += self._count
        self.on_shard()

    def finish(self, n_units: int) -> None:
        """Close the last, partial shard (if it holds tokens)."""
        if self._f is not None and self._count > 0:
            self._close(n_units, 0)
        elif self._f is not None:
            self.abort()
        self.state.docs, self.state.bytes = self._pending
        self.state.next_unit, self.state.skip = n_units, 0

    def abort(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass
        if self._tmp is not None:
            _unlink(self._tmp)
        self._f, self._tmp = None, None


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


class _Flags:
    c_contiguous = True


class _ByteView:
    """The bytes of a ``ShardedTokens`` without reading them: ``size`` and slices (block hashing)."""

    def __init__(self, tokens: ShardedTokens) -> None:
        self.tokens = tokens
        self.itemsize = tokens.dtype.itemsize
        self.size = len(tokens) * self.itemsize

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(self.size)
        if step != 1:
            raise IndexError("byte views of a shard set take contiguous slices only")
        t0, t1 = start // self.itemsize, -(-stop // self.itemsize)
        raw = np.ascontiguousarray(self.tokens[t0:t1]).view(np.uint8)
        return raw[start - t0 * self.itemsize: stop - t0 * self.itemsize]


class ShardedTokens:
    """The shards of a split as one read-only 1-D token array (see the module docstring).

    Indexing with an int, a slice or an integer array of any shape returns what the same index
    returns on the concatenated array (a copy, as fancy indexing does); ``np.asarray`` reads all."""

    ndim = 1
    flags = _Flags()

    def __init__(self, paths: list[Path], raw_dtype: str | None = None) -> None:
        """``raw_dtype``: the files are bare little-endian arrays of that dtype (datatrove's ``.ds``
        files) instead of token files with a header."""
        if not paths:
            raise DataError("a shard set needs at least one shard")
        self.paths = list(paths)
        self.raw_dtype = raw_dtype
        self.arrays = [read_tokens(p) for p in self.paths] if raw_dtype is None else [_raw(p, raw_dtype) for p in paths]
        # plain ndarray views of the maps: indexing a np.memmap subclass costs more than the copy
        self.plain = [np.asarray(a) for a in self.arrays]
        dtypes = {a.dtype for a in self.arrays}
        if len(dtypes) != 1:
            raise DataError(f"shards of {self.paths[0].parent} mix token dtypes {sorted(map(str, dtypes))}")
        self.dtype = self.arrays[0].dtype
        lengths = np.array([len(a) for a in self.arrays], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths)])  # [n_shards + 1]
        self._fixed = int(lengths[0]) if len(lengths) > 1 and (lengths[:-1] == lengths[0]).all() else 0
        self.size = int(self.starts[-1])
        self.shape = (self.size,)
        self.nbytes = self.size * self.dtype.itemsize

    def __reduce__(self) -> tuple[Any, ...]:  # a worker process reopens the files, copies nothing
        return (ShardedTokens, (self.paths, self.raw_dtype))

    def __len__(self) -> int:
        return self.size

    def _slice(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        first = int(np.searchsorted(self.starts, start, side="right") - 1)
        last = int(np.searchsorted(self.starts, stop - 1, side="right") - 1)
        parts = [self.arrays[s][max(start, self.starts[s]) - self.starts[s]: min(stop, self.starts[s + 1])
                                - self.starts[s]] for s in range(first, last + 1)]
        return np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.size)
            if step == 1:
                return self._slice(start, stop)
            return self[np.arange(start, stop, step, dtype=np.int64)]
        if isinstance(key, (int, np.integer)):
            i = int(key) + (self.size if key < 0 else 0)
            if not 0 <= i < self.size:
                raise IndexError(f"index {key} out of range for {self.size} tokens")
            s = int(np.searchsorted(self.starts, i, side="right") - 1)
            return self.arrays[s][i - self.starts[s]]
        idx = np.asarray(key)
        if idx.dtype.kind not in "iu":
            raise IndexError(f"shard sets take int, slice or integer-array indices, not {idx.dtype}")
        if len(self.plain) == 1:
            return self.plain[0][idx]
        if idx.ndim == 2 and idx.shape[1] > 1:
            rows = self._windows(idx)
            if rows is not None:
                return rows
        flat = idx.reshape(-1).astype(np.int64, copy=False)
        flat = np.where(flat < 0, flat + self.size, flat)
        if flat.size and (flat.min() < 0 or flat.max() >= self.size):
            raise IndexError(f"index out of range for {self.size} tokens")
        if len(self.plain) == 1:
            return self.plain[0][flat].reshape(idx.shape)
        if self._fixed:  # all shards but the last hold the same count: a division finds the shard
            shard = np.minimum(flat // self._fixed, len(self.plain) - 1)
        else:
            shard = np.searchsorted(self.starts, flat, side="right") - 1
        local = flat - self.starts[shard]
        counts = np.bincount(shard, minlength=len(self.plain))
        hit = np.flatnonzero(counts)
        if len(hit) == 1:
            return self.plain[hit[0]][local].reshape(idx.shape)
        order = np.argsort(shard, kind="stable")  # group the positions by shard
        out = np.empty(flat.shape, dtype=self.dtype)
        ends = np.cumsum(counts)
        for s in hit:  # a batch touches a few shards
            pos = order[ends[s] - counts[s]:ends[s]]
            out[pos] = self.plain[s][local[pos]]
        return out.reshape(idx.shape)

    def _windows(self, idx: np.ndarray) -> np.ndarray | None:
        """Fast path for what the batch sampler asks: rows of consecutive positions (windows).
        Each row inside one shard is one slice copy; None when the rows are not windows."""
        n = idx.shape[1]
        first = idx[:, 0].astype(np.int64)
        if (first < 0).any() or (first + n > self.size).any() or not (idx == first[:, None] + np.arange(n)).all():
            return None
        out = np.empty(idx.shape, dtype=self.dtype)
        for r, a in enumerate(first.tolist()):
            s = min(a // self._fixed, len(self.plain) - 1) if self._fixed else \
                int(np.searchsorted(self.starts, a, side="right") - 1)
            lo = a - int(self.starts[s])
            if lo + n <= len(self.plain[s]):
                out[r] = self.plain[s][lo:lo + n]
            else:  # the window straddles a shard boundary
                out[r] = self._slice(a, a + n)
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self._slice(0, self.size)
        return whole if dtype is None else whole.astype(dtype)

    # The trainer's data fingerprint hashes the token bytes through ndarray's interface
    # (``reshape(-1).view(np.uint8)``); these give the concatenated array's digest.
    def reshape(self, *shape: Any) -> ShardedTokens:
        if shape not in ((-1,), ((-1,),), (self.size,), ((self.size,),)):
            raise ValueError("a shard set reshapes only to 1-D")
        return self

    def view(self, dtype: Any) -> Any:
        if np.dtype(dtype) != np.uint8:
            raise TypeError("a shard set has byte views only")
        if self.nbytes <= FULL_VIEW_BYTES:
            return np.asarray(self).view(np.uint8)
        return _ByteView(self)

    def __repr__(self) -> str:
        return f"ShardedTokens({len(self.paths)} shards, {self.size:,} tokens, {self.dtype})"


def _raw(path: Path, dtype: str) -> np.memmap:
    """A bare token array file, checked for size."""
    dt = np.dtype(dtype)
    size = path.stat().st_size
    if size == 0 or size % dt.itemsize:
        raise DataError(f"{path}: {size} bytes is not a whole, non-zero number of {dt} tokens")
    return np.memmap(path, dtype=dt, mode="r", shape=(size // dt.itemsize,))


def read_index(path: Path) -> dict[str, Any]:
    """``index.json`` of a sharded dir, checked for type and version."""
    try:
        idx = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if not isinstance(idx, dict) or idx.get("format") != INDEX_FORMAT:
        raise DataError(f"{path} is not a shard index (format {INDEX_FORMAT!r})")
    if idx.get("version") != INDEX_VERSION:
        raise DataError(f"{path}: shard index version {idx.get('version')!r}, this build reads {INDEX_VERSION}")
    for split in ("train", "val"):
        if not isinstance(idx.get(split), dict):
            raise DataError(f"{path}: no {split!r} record")
    return idx


def shard_paths(dir: Path, idx: dict[str, Any], split: str) -> list[Path]:
    """The files of ``split``, each a plain shard name inside ``dir`` (never a path elsewhere)."""
    st = SplitState.from_json(idx[split], dir / INDEX_NAME)
    paths = []
    root = dir.resolve()
    for s in st.shards:
        name = s["file"]
        if not SHARD_NAME.match(name) or not name.startswith(split + "-"):
            raise DataError(f"{dir / INDEX_NAME}: shard name {name!r} is not a {split} shard name")
        p = dir / name
        if p.is_symlink() or p.resolve().parent != root:
            raise DataError(f"{dir / INDEX_NAME}: shard {name} must be a regular file inside {dir}")
        count = read_header(p)[1]
        if count != s["tokens"]:
            raise DataError(f"{p}: holds {count} tokens, the index says {s['tokens']}")
        paths.append(p)
    if not paths:
        raise DataError(f"{dir / INDEX_NAME}: the {split} split has no shards")
    return paths
