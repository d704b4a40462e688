"""The ``.bin`` token file: a small self-describing header followed by raw little-endian token ids.

Why a header at all: a bare array of uint16 (the nanoGPT convention) cannot tell a reader its dtype,
whether the file was cut short by a full disk or an interrupted copy, or which vocabulary produced
it. Those mistakes otherwise surface as silently wrong training (uint32 data read as uint16 doubles
the token count and produces garbage ids). With a header every one of them becomes a one-line
``DataError`` at load time, while the payload stays a plain array that ``numpy.memmap`` maps without
copying, so a multi-GB corpus costs no RAM.

Layout (all integers little-endian), ``HEADER_SIZE`` = 64 bytes::

    offset  size  field
    0       8     magic        b"NCTOKENS"
    8       4     version      u32, currently 1
    12      4     dtype code   u32, 2 = uint16, 4 = uint32 (the item size in bytes)
    16      8     token count  u64
    24      8     vocab size   u64, the vocabulary the ids were checked against (0 = unknown)
    32      32    reserved     zero
    64      ...   tokens       count * itemsize bytes, nothing after them

The payload starts at a 64-byte offset so a memmap of either dtype is aligned.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import DataError

MAGIC = b"NCTOKENS"
FORMAT_VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sIIQQ")  # magic, version, dtype code, count, vocab size (32 bytes)
_DTYPES: dict[int, np.dtype] = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
#: Largest vocabulary whose ids fit in uint16.
UINT16_VOCAB_LIMIT = 65536
_CHECK_CHUNK = 1 << 24  # tokens per chunk when scanning for out-of-range ids (bounded memory)


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 halves the file (and page-cache footprint) whenever every id fits in 16 bits."""
    if vocab_size <= 0:
        raise DataError(f"vocab size must be positive, got {vocab_size}")
    if vocab_size > 2**32:
        raise DataError(f"vocab size {vocab_size} does not fit in uint32 token ids")
    return _DTYPES[2] if vocab_size <= UINT16_VOCAB_LIMIT else _DTYPES[4]


def check_token_range(tokens: np.ndarray, vocab_size: int, path: str | Path | None = None) -> None:
    """Raise ``DataError`` if any id is >= ``vocab_size`` (or negative).

    Scans in chunks so checking a memmapped multi-GB file does not materialise it. An id past the
    vocabulary would otherwise index past the embedding table: a CUDA device-side assert or, on CPU,
    an IndexError deep inside the model with no hint that the data is at fault.
    """
    where = f" in {path}" if path is not None else ""
    n = len(tokens)
    for start in range(0, n, _CHECK_CHUNK):
        chunk = np.asarray(tokens[start : start + _CHECK_CHUNK])
        if chunk.size == 0:
            continue
        hi = int(chunk.max())
        if hi >= vocab_size:
            raise DataError(f"token id {hi} >= vocab size {vocab_size}{where}")
        if chunk.dtype.kind == "i":
            lo = int(chunk.min())
            if lo < 0:
                raise DataError(f"negative token id {lo}{where}")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pack_header(dtype: np.dtype, count: int, vocab_size: int) -> bytes:
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, dtype.itemsize, count, vocab_size)
    return head.ljust(HEADER_SIZE, b"\0")


def write_tokens(
    path: str | Path,
    tokens: np.ndarray | Iterable[np.ndarray],
    vocab_size: int,
) -> int:
    """Write token ids to ``path`` atomically; return the number of tokens written.

    ``tokens`` is one array or any iterable of arrays (chunks are streamed, so a corpus never has
    to be in memory at once). Every chunk is range-checked against ``vocab_size`` before it is
    written. The data goes to a temporary file in the same directory, the count is patched into
    the header, the file is fsynced and only then renamed over ``path``: a crash or a bad chunk
    leaves either the old file or nothing, never a truncated file with a valid-looking name.
    """
    path = Path(path)
    dtype = dtype_for_vocab(vocab_size)
    chunks: Iterable[np.ndarray] = [tokens] if isinstance(tokens, np.ndarray) else tokens
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    count = 0
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_pack_header(dtype, 0, vocab_size))
            for chunk in chunks:
                arr = np.asarray(chunk)
                if arr.size == 0:
                    continue
                if arr.dtype.kind not in "iu":
                    raise DataError(f"token chunk has non-integer dtype {arr.dtype} for {path}")
                check_token_range(arr.reshape(-1), vocab_size, path)
                f.write(np.ascontiguousarray(arr.reshape(-1), dtype=dtype).tobytes())
                count += arr.size
            f.seek(0)
            f.write(_pack_header(dtype, count, vocab_size))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o666 & ~_current_umask())  # mkstemp makes 0600; use the usual mode
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        raise
    return count


def read_header(path: str | Path) -> tuple[np.dtype, int, int]:
    """Validate the header and the file size of a token file; return (dtype, count, vocab_size).

    ``vocab_size`` is 0 when the writer did not know it.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"token file not found: {path}")
    if not path.is_file():
        raise DataError(f"token file is not a regular file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"token file is empty: {path}")
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
    if head[: len(MAGIC)] != MAGIC:
        raise DataError(
            f"not a nanochat token file (bad magic, expected {MAGIC!r}): {path}"
            " — create one with `nanochat-train prepare-data`"
        )
    if len(head) < HEADER_SIZE:
        raise DataError(f"token file truncated inside its {HEADER_SIZE}-byte header: {path}")
    _, version, code, count, vocab_size = _HEADER.unpack(head[: _HEADER.size])
    if version != FORMAT_VERSION:
        raise DataError(
            f"unsupported token file version {version} (this build reads {FORMAT_VERSION}): {path}"
        )
    if code not in _DTYPES:
        raise DataError(f"unknown token dtype code {code} (expected 2 or 4) in {path}")
    dtype = _DTYPES[code]
    payload = size - HEADER_SIZE
    if payload != count * dtype.itemsize:
        held = payload / dtype.itemsize
        held_s = str(int(held)) if held == int(held) else f"{held:.1f}"
        kind = "truncated" if payload < count * dtype.itemsize else "has extra bytes"
        raise DataError(f"token file {kind}: header says {count} tokens, file holds {held_s}: {path}")
    if count == 0:
        raise DataError(f"token file holds no tokens: {path}")
    return dtype, int(count), int(vocab_size)


def read_tokens(path: str | Path) -> np.memmap:
    """Memory-map the tokens of a validated ``.bin`` file (read-only, no copy)."""
    dtype, count, _ = read_header(path)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(count,))
