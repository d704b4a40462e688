"""Read corpus inputs as a stream of text *units* in a deterministic order, with bounded memory.

A unit is a document, or a piece of a large one: plain text files bigger than ``piece_chars`` are
read block by block and cut into pieces at places where the cut cannot change the tokens (see
``_safe_cut``), so a multi-GB text file never has to be in memory at once. Only the last piece of
a document ends with the separator token; the val split is decided per document.

Inputs (``iter_units``):

* directories, searched recursively with a glob (hidden and excluded dirs skipped); each file is
  read by its kind below, in sorted relative-path order;
* plain text / code files: one document each;
* ``.jsonl`` / ``.ndjson``: one document per line, its ``text_field``;
* ``.parquet``: one document per non-empty value of the ``text_field`` column, row group by row
  group (``iter_batches``);
* any of the above compressed as ``.gz`` or ``.zst`` (parquet excepted: it compresses itself);
* Hugging Face ``datasets`` dirs written by ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``,
  every split in name order), the ``text_field`` column (needs ``datasets``).

Bad inputs never end in a traceback: an empty, binary (NUL bytes) or non-UTF-8 file, a truncated
or corrupt compressed file, a parquet / dataset without the column, a JSONL line that is not JSON,
not an object, or lacks a text field are recorded in ``Problems`` and skipped (or, with
``strict``, raise one ``DataError`` line at the first one). Reading is a pure function of the
files, so two passes over the same inputs yield the same units.

Each unit carries a ``key`` (its path relative to the input, plus ``#row`` for rows) that names
the document independently of what else is in the corpus: the split decided from it stays the
same when files are added.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ..errors import DataError
from .corpus import _walk_dir

#: Plain text files larger than this many characters are cut into pieces of about this size (the
#: tokenizer briefly needs ~40 bytes per character of a piece it encodes, so pieces stay small).
PIECE_CHARS = 1 << 18
_READ_BYTES = 1 << 20
JSONL_SUFFIXES = (".jsonl", ".ndjson")
COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")
_MAX_EXAMPLES = 5


@dataclass(frozen=True)
class Unit:
    """A document or a piece of one. ``last``: the document ends here (a separator follows)."""

    key: str
    text: str
    last: bool = True
    piece: int = 0


@dataclass
class Problems:
    """Inputs skipped as unreadable: counted by kind, the first few named."""

    strict: bool = False
    count: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def add(self, where: str, kind: str) -> None:
        if self.strict:
            raise DataError(f"{where}: {kind} (--strict stops at the first bad input; without it, it is skipped)")
        self.count += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{where} ({kind})")

    def summary(self) -> str | None:
        """One warning line, or None when nothing was skipped."""
        if not self.count:
            return None
        more = f", and {self.count - len(self.examples)} more" if self.count > len(self.examples) else ""
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.by_kind.items()))
        return f"warning: skipped {self.count} bad inputs ({kinds}): {'; '.join(self.examples)}{more}"


@dataclass(frozen=True)
class ReadOptions:
    glob: str = "**/*"
    text_field: str = "text"
    exclude_dirs: frozenset[str] = frozenset()
    skip_paths: frozenset[Path] = frozenset()
    piece_chars: int = PIECE_CHARS


def _inner_suffix(path: Path) -> tuple[str, str]:
    """(compression suffix or '', the suffix of the content) of a file name, lowercased."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        return suffixes[-1], (suffixes[-2] if len(suffixes) > 1 else "")
    return "", (suffixes[-1] if suffixes else "")


def _open_binary(path: Path, compression: str) -> IO[bytes]:
    if compression == ".gz":
        return gzip.open(path, "rb")
    raw = open(path, "rb")
    if compression in (".zst", ".zstd"):
        try:
            import zstandard
        except ImportError as e:
            raw.close()
            raise DataError(f"reading {path} needs zstandard: pip install zstandard") from e
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return raw


def _read_errors() -> tuple[type[BaseException], ...]:
    """What a truncated or corrupt compressed stream raises while being read."""
    errs: list[type[BaseException]] = [EOFError, OSError, zlib.error]
    try:
        import zstandard

        errs.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errs)


def _safe_cut(buf: str, lo: int) -> int:
    """The last index ``i > lo`` where cutting ``buf`` into ``buf[:i]`` and ``buf[i:]`` leaves the
    byte-level BPE tokens unchanged, or -1.

    The GPT-2 pre-tokenizer regex never joins across "X\\nY" or "X| Y" (X, Y not whitespace): the
    pre-token before the cut ends at X, and the newline / the space-led word after it starts a new
    one in both the cut and the uncut text. BPE merges stay inside pre-tokens, so the ids of the
    pieces concatenated equal the ids of the whole (tests/test_data_stream.py checks it).
    """
    i = len(buf) - 1
    while True:
        i = buf.rfind("\n", lo, i)
        if i <= lo:
            break
        if not buf[i - 1].isspace() and i + 1 < len(buf) and not buf[i + 1].isspace():
            return i + 1
    i = len(buf) - 1
    while True:
        i = buf.rfind(" ", lo, i)
        if i <= lo:
            return -1
        if not buf[i - 1].isspace() and i + 1 < len(buf) and not buf[i + 1].isspace():
            return i


def _text_units(path: Path, key: str, compression: str, opts: ReadOptions, problems: Problems) -> Iterator[Unit]:
    """A text file as one document, in pieces if it is large (read block by block)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    buf, piece, offset, seen_any = "", 0, 0, False
    try:
        with _open_binary(path, compression) as f:
            while True:
                block = f.read(_READ_BYTES)
                final = not block
                if b"\0" in block:  # text never holds NUL; images, archives and .pyc do
                    problems.add(str(path), "binary")
                    return
                seen_any = seen_any or bool(block)
                try:
                    buf += decoder.decode(block, final=final)
                except UnicodeDecodeError as e:
                    problems.add(f"{path} at byte {offset + e.start}", "not UTF-8")
                    return
                offset += len(block)
                while len(buf) >= 2 * opts.piece_chars or (final and len(buf) > opts.piece_chars):
                    cut = _safe_cut(buf[: 2 * opts.piece_chars], opts.piece_chars // 2)
                    if cut < 0:  # no safe place (one huge line of one word): cut anyway
                        cut = opts.piece_chars
                    yield Unit(key, buf[:cut], last=False, piece=piece)
                    buf, piece = buf[cut:], piece + 1
                if final:
                    break
    except _read_errors() as e:
        problems.add(str(path), f"truncated or corrupt {compression or 'file'}: {_first_line(e)}")
        return
    if not seen_any:
        problems.add(str(path), "empty")
        return
    if buf or piece:
        yield Unit(key, buf, last=True, piece=piece)


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return msg[0] if msg else type(e).__name__


def _jsonl_units(path: Path, key: str, compression: str, opts: ReadOptions, problems: Problems) -> Iterator[Unit]:
    """One document per line: the line's ``text_field``."""
    fld, n = opts.text_field, 0
    try:
        with _open_binary(path, compression) as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except (ValueError, UnicodeDecodeError):
                    problems.add(f"{path}:{n}", "not JSON")
                    continue
                if not isinstance(obj, dict) or fld not in obj:
                    problems.add(f"{path}:{n}", f"no {fld!r} field")
                    continue
                text = obj[fld]
                if not isinstance(text, str):
                    problems.add(f"{path}:{n}", f"{fld!r} is not a string")
                    continue
                if text:
                    yield Unit(f"{key}#{n}", text)
    except _read_errors() as e:
        problems.add(f"{path}:{n + 1}", f"truncated or corrupt {compression or 'file'}: {_first_line(e)}")
    if n == 0:
        problems.add(str(path), "empty")


def _parquet_units(path: Path, key: str, opts: ReadOptions, problems: Problems) -> Iterator[Unit]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"reading {path} needs pyarrow: pip install 'nanochat-ternary[parquet]'") from e
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # ArrowInvalid / OSError subclasses
        problems.add(str(path), f"not a readable parquet file: {_first_line(e)}")
        return
    names = pf.schema_arrow.names
    if opts.text_field not in names:
        problems.add(str(path), f"no column {opts.text_field!r} (columns: {', '.join(names)})")
        return
    ctype = pf.schema_arrow.field(opts.text_field).type
    if not (pa.types.is_string(ctype) or pa.types.is_large_string(ctype)):
        problems.add(str(path), f"column {opts.text_field!r} is {ctype}, not text")
        return
    row = 0
    try:
        for batch in pf.iter_batches(columns=[opts.text_field], batch_size=4096):
            for value in batch.column(0).to_pylist():
                if value:
                    yield Unit(f"{key}#{row}", value)
                row += 1
    except Exception as e:  # a corrupt row group: what came before it is kept
        problems.add(f"{path} row {row}", f"corrupt parquet: {_first_line(e)}")


def is_hf_dataset_dir(path: Path) -> bool:
    """A dir written by ``datasets``' ``save_to_disk`` (Dataset or DatasetDict)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _hf_units(path: Path, opts: ReadOptions, problems: Problems) -> Iterator[Unit]:
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"reading the datasets dir {path} needs the `datasets` package: pip install datasets") from e
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError / ValueError / arrow errors
        problems.add(str(path), f"not a readable datasets dir: {_first_line(e)}")
        return
    splits = [(name, ds[name]) for name in sorted(ds)] if isinstance(ds, datasets.DatasetDict) else [("", ds)]
    for name, split in splits:
        where = f"{path}[{name}]" if name else str(path)
        if opts.text_field not in split.column_names:
            problems.add(where, f"no column {opts.text_field!r} (columns: {', '.join(split.column_names)})")
            continue
        row = 0
        for batch in split.select_columns([opts.text_field]).iter(batch_size=1024):
            for value in batch[opts.text_field]:
                if isinstance(value, str) and value:
                    yield Unit(f"{name}#{row}", value)
                elif value is not None and not isinstance(value, str):
                    problems.add(f"{where} row {row}", f"{opts.text_field!r} is not a string")
                row += 1


def _file_units(path: Path, key: str, opts: ReadOptions, problems: Problems) -> Iterator[Unit]:
    compression, kind = _inner_suffix(path)
    if kind == ".parquet":
        if compression:
            problems.add(str(path), "compressed parquet (parquet compresses itself; store it plain)")
            return
        yield from _parquet_units(path, key, opts, problems)
    elif kind in JSONL_SUFFIXES:
        yield from _jsonl_units(path, key, compression, opts, problems)
    else:
        yield from _text_units(path, key, compression, opts, problems)


def list_inputs(inputs: Sequence[str | Path], opts: ReadOptions) -> list[tuple[Path, list[tuple[Path, str]] | None]]:
    """Each input with its files and their keys (None for a datasets dir, read as a whole).

    Raises one line for a missing input, a special file, or no files at all."""
    if not inputs:
        raise DataError("no input paths given")
    out: list[tuple[Path, list[tuple[Path, str]] | None]] = []
    n_files = 0
    for raw in inputs:
        path = Path(raw).expanduser()
        if not path.exists():
            raise DataError(f"input not found: {path}")
        if is_hf_dataset_dir(path):
            out.append((path, None))
            n_files += 1
        elif path.is_dir():
            files = _walk_dir(path, opts.glob, opts.exclude_dirs, set(opts.skip_paths))
            out.append((path, [(f, f.relative_to(path).as_posix()) for f in files]))
            n_files += len(files)
        elif path.is_file():
            out.append((path, [(path, path.name)]))
            n_files += 1
        else:  # a FIFO would block forever, a device file never ends
            raise DataError(f"input is not a regular file or a directory: {path}")
    if n_files == 0:
        where = ", ".join(str(Path(p)) for p in inputs)
        raise DataError(f"no input files matched {opts.glob!r} in {where}")
    return out


def iter_units(listing: Iterable[tuple[Path, list[tuple[Path, str]] | None]], opts: ReadOptions,
               problems: Problems) -> Iterator[Unit]:
    """Every unit of the listed inputs, in order (see the module docstring)."""
    for path, files in listing:
        if files is None:
            yield from _hf_units(path, opts, problems)
            continue
        for f, key in files:
            try:
                yield from _file_units(f, key, opts, problems)
            except PermissionError as e:
                problems.add(str(f), f"cannot read: {e.strerror}")


def input_fingerprint(listing: Iterable[tuple[Path, list[tuple[Path, str]] | None]]) -> list[list]:
    """(input, [relative path, size, mtime_ns] per file) — what a resume must find unchanged."""
    out: list[list] = []
    for path, files in listing:
        if files is None:
            entries = sorted(p for p in path.rglob("*") if p.is_file())
            stats = [[p.relative_to(path).as_posix(), *_stat(p)] for p in entries]
        else:
            stats = [[key, *_stat(f)] for f, key in files]
        out.append([str(path.resolve()), stats])
    return out


def _stat(p: Path) -> list[int]:
    st = os.stat(p)
    return [st.st_size, st.st_mtime_ns]
