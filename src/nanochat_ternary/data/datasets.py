"""Datasets by name (``--dataset``), each returning ``PreparedData``, prepared once and cached.

* ``stdlib``    the source code of the running interpreter's standard library: a real code corpus
                (~30 MB of Python) that exists on every machine with Python, so ``train`` works
                out of the box with no download. The default.
* ``text``      any file or directory (text, code, parquet), tokenized on the fly.
* ``synthetic`` generated, learnable patterns (counting, sums, repeated motifs) over a byte
                tokenizer: a loss that visibly falls within dozens of steps, for smoke tests and
                benchmarks that must not depend on a corpus.
* ``tokens``    an already prepared dir or ``.bin`` file (``--data-path``).

Validation split (``val_fraction``; None: each dataset's default): ``stdlib`` and ``text`` hold out
that fraction of their documents (default 0.01), a lone ``.bin`` its last fraction of tokens
(default 0.01), ``synthetic`` generates ``max(4, round(n_samples * val_fraction))`` val documents
from an independent stream (default ``max(4, n_samples // 50)``). A prepared dir's split was made by
``prepare-data --val-fraction``: asking for another one is an error, not a silent no-op.

Caching: prepared data lives under ``default_cache_dir()`` in a dir named by everything that
determines its content (Python version and stdlib path; input paths, sizes and mtimes; vocab
size; generator arguments; format version), so a second call costs only a memmap. Preparation is
serialised with a file lock, so ``torchrun`` ranks that all ask for the same dataset prepare it
once; the others wait and then load it. A cache entry that fails to load is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import random
import shutil
import sys
import sysconfig
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import DataError
from .corpus import (
    PREPARED_FORMAT_VERSION,
    PreparedData,
    _install_dir,
    _walk_dir,
    _write_meta,
    collect_documents,
    load_prepared,
    prepare_documents,
)
from .tokenfile import write_tokens
from .tokenizer import byte_tokenizer

DATASET_NAMES = ("stdlib", "text", "synthetic", "tokens")
DEFAULT_VAL_FRACTION = 0.01  # stdlib, text and lone .bin files when val_fraction is None
#: Directory names never read as corpus text (installed third-party packages are not the stdlib).
STDLIB_EXCLUDE_DIRS = ("site-packages", "dist-packages", "__pycache__")


def default_cache_dir() -> Path:
    """``$NANOCHAT_CACHE``, else ``$XDG_CACHE_HOME/nanochat-ternary``, else ``~/.cache/nanochat-ternary``."""
    env = os.environ.get("NANOCHAT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "nanochat-ternary"


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (POSIX flock; a no-op where fcntl does not exist)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: ranks may prepare twice; the atomic rename keeps it correct
        yield
        return
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _cached(cache_dir: Path | None, key: str, build: Callable[[Path], object]) -> PreparedData:
    """Load ``cache_dir/key``; if missing or unloadable, build it (under a lock) and load it."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / key
    if (target / "meta.json").is_file():
        with contextlib.suppress(DataError):
            return load_prepared(target)
    with _locked(root / f".{key}.lock"):
        if (target / "meta.json").is_file():  # another process finished it while we waited
            try:
                return load_prepared(target)
            except DataError:
                pass
        build(target)
    return load_prepared(target)


def _vf_key(val_fraction: float | None) -> str:
    """Cache-key suffix for a non-default split (empty for the default, so existing caches stay valid)."""
    if val_fraction is None or val_fraction == DEFAULT_VAL_FRACTION:
        return ""
    return f"-vf{val_fraction:g}"


def _short_hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# stdlib
# ----------------------------------------------------------------------------------------------


def stdlib_path() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_dataset(
    cache_dir: str | Path | None = None, vocab_size: int = 4096, show_progress: bool = True,
    val_fraction: float | None = None,
) -> PreparedData:
    """The running interpreter's standard library ``*.py`` sources (tests included, installed
    packages excluded), tokenized with a BPE of ``vocab_size`` and cached."""
    root = stdlib_path()
    if not root.is_dir():
        raise DataError(f"the Python standard library sources are not on disk at {root}; pass --data-path")
    impl = platform.python_implementation().lower()
    ver = "{}.{}.{}".format(*sys.version_info[:3])
    key = (f"stdlib-{impl}{ver}-v{vocab_size}-f{PREPARED_FORMAT_VERSION}-{_short_hash(str(root))[:8]}"
           + _vf_key(val_fraction))

    def build(target: Path) -> None:
        docs = collect_documents([root], glob="**/*.py", exclude_dirs=STDLIB_EXCLUDE_DIRS)
        prepare_documents(
            docs,
            target,
            vocab_size=vocab_size,
            val_fraction=val_fraction or DEFAULT_VAL_FRACTION,
            show_progress=show_progress,
            source=f"python-stdlib:{impl}-{ver}:{root}",
        )

    return _cached(Path(cache_dir) if cache_dir is not None else None, key, build)


# ----------------------------------------------------------------------------------------------
# text
# ----------------------------------------------------------------------------------------------


def _fingerprint(path: Path, glob: str) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every file the corpus reader would consider."""
    files = _walk_dir(path, glob, frozenset(), set()) if path.is_dir() else [path]
    out = []
    for f in files:
        st = f.stat()
        out.append((f.relative_to(path).as_posix() if path.is_dir() else f.name, st.st_size, st.st_mtime_ns))
    return out


def text_dataset(
    path: str | Path,
    cache_dir: str | Path | None = None,
    vocab_size: int = 4096,
    glob: str = "**/*",
    parquet_column: str = "text",
    show_progress: bool = True,
    val_fraction: float | None = None,
) -> PreparedData:
    """A text/code/parquet file or directory, prepared on first use and cached by a fingerprint
    of its files (paths, sizes, mtimes), so editing the corpus re-prepares it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data path not found: {p}")
    p = p.resolve()
    fp = {
        "path": str(p),
        "files": _fingerprint(p, glob),
        "vocab": vocab_size,
        "glob": glob,
        "column": parquet_column,
        "format": PREPARED_FORMAT_VERSION,
    }
    if not fp["files"]:
        raise DataError(f"no input files matched {glob!r} in {p}")
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in p.stem)[:40] or "data"
    key = f"text-{stem}-v{vocab_size}-{_short_hash(fp)}{_vf_key(val_fraction)}"

    def build(target: Path) -> None:
        docs = collect_documents([p], glob=glob, parquet_column=parquet_column)
        prepare_documents(
            docs,
            target,
            vocab_size=vocab_size,
            val_fraction=val_fraction or DEFAULT_VAL_FRACTION,
            show_progress=show_progress,
            extra_meta={"glob": glob, "parquet_column": parquet_column},
        )

    return _cached(Path(cache_dir) if cache_dir is not None else None, key, build)


# ----------------------------------------------------------------------------------------------
# synthetic
# ----------------------------------------------------------------------------------------------

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _synthetic_line(rng: random.Random) -> str:
    """One line of a learnable pattern; each kind is predictable from its own prefix."""
    kind = rng.randrange(4)
    if kind == 0:  # counting with a fixed step: "12 15 18 21 24 27"
        start, step, n = rng.randrange(100), rng.choice((1, 2, 3, 5, 10)), rng.randrange(5, 12)
        return " ".join(str(start + step * k) for k in range(n))
    if kind == 1:  # addition: "17+25=42"
        a, b = rng.randrange(50), rng.randrange(50)
        return f"{a}+{b}={a + b}"
    if kind == 2:  # a short motif repeated: "xqrxqrxqrxqr"
        motif = "".join(rng.choice(_LETTERS) for _ in range(rng.randrange(2, 6)))
        return motif * rng.randrange(3, 7)
    start, n = rng.randrange(26), rng.randrange(5, 16)  # an alphabet run, wrapping: "wxyzabc"
    return "".join(_LETTERS[(start + k) % 26] for k in range(n))


def synthetic_documents(n_docs: int, doc_chars: int, seed: int, stream: int = 0) -> list[str]:
    """``n_docs`` ASCII documents of whole pattern lines, each at most ``doc_chars`` characters.

    Pure function of its arguments (Python's ``random.Random`` with an integer seed produces the
    same sequence on every platform and version), so the same seed gives the same data.
    """
    rng = random.Random(seed * 2 + stream)
    docs = []
    for _ in range(n_docs):
        parts: list[str] = []
        size = 0
        while True:
            line = _synthetic_line(rng) + "\n"
            if size + len(line) > doc_chars:
                break
            parts.append(line)
            size += len(line)
        # Whole lines only (a cut line would teach a wrong sum); a tiny doc_chars still gets text.
        docs.append("".join(parts) if parts else line[:doc_chars])
    return docs


def _byte_chunks(docs: list[str], eot_id: int) -> Iterator[np.ndarray]:
    """Byte-tokenizer ids of ASCII documents, each followed by the separator. Equal to
    ``byte_tokenizer().encode`` (id b is byte b) without the per-call overhead."""
    eot = np.array([eot_id], dtype=np.uint16)
    for d in docs:
        yield np.frombuffer(d.encode("ascii"), dtype=np.uint8).astype(np.uint16)
        yield eot


def synthetic_dataset(
    n_samples: int = 10_000,
    seq_len: int = 256,
    seed: int = 0,
    out_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    val_fraction: float | None = None,
) -> PreparedData:
    """``n_samples`` training documents of up to ``seq_len`` bytes (each plus a separator, so
    about ``n_samples`` windows of ``seq_len`` tokens) and ``max(4, n_samples // 50)`` val documents
    (``max(4, round(n_samples * val_fraction))`` when given) from an independent stream, tokenized
    with the byte tokenizer (vocab 257).

    Written to ``out_dir`` if given (replacing a prepared dir there), else cached.
    """
    if n_samples < 1 or seq_len < 1 or seed < 0:
        raise DataError(
            "synthetic data needs n_samples >= 1, seq_len >= 1, seed >= 0;"
            f" got {n_samples}, {seq_len}, {seed}"
        )
    if val_fraction is not None and not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    n_val = max(4, n_samples // 50 if val_fraction is None else round(n_samples * val_fraction))

    def build(target: Path) -> None:
        tok = byte_tokenizer()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            counts: dict[str, tuple[int, int]] = {}
            for split, n, stream in (("train", n_samples, 0), ("val", n_val, 1)):
                docs = synthetic_documents(n, seq_len, seed, stream)
                n_tok = write_tokens(tmp / f"{split}.bin", _byte_chunks(docs, tok.eot_id), tok.vocab_size)
                counts[split] = (n_tok, sum(len(d) for d in docs))  # ASCII: one byte per character
            tok.save(tmp / "tokenizer.json")
            _write_meta(
                tmp / "meta.json",
                {
                    "source": f"synthetic:n_samples={n_samples},seq_len={seq_len},seed={seed}",
                    "vocab_size": tok.vocab_size,
                    "n_docs": n_samples + n_val,
                    "n_train_docs": n_samples,
                    "n_val_docs": n_val,
                    "train_tokens": counts["train"][0],
                    "val_tokens": counts["val"][0],
                    "train_bytes": counts["train"][1],
                    "val_bytes": counts["val"][1],
                    "tokenizer": "tokenizer.json",
                    "eot_id": tok.eot_id,
                    "seed": seed,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "format_version": PREPARED_FORMAT_VERSION,
                },
            )
            _install_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    if out_dir is not None:
        target = Path(out_dir).expanduser()
        build(target)
        return load_prepared(target)
    key = f"synthetic-n{n_samples}-t{seq_len}-s{seed}-f{PREPARED_FORMAT_VERSION}" + (
        f"-vf{val_fraction:g}" if val_fraction is not None else "")
    return _cached(Path(cache_dir) if cache_dir is not None else None, key, build)


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------


def _looks_prepared(p: Path) -> bool:
    return p.suffix == ".bin" or (p.is_dir() and (p / "train.bin").is_file())


def load_dataset(
    name: str | None = None,
    data_path: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    vocab_size: int = 4096,
    n_samples: int = 10_000,
    seq_len: int = 256,
    seed: int = 0,
    glob: str = "**/*",
    parquet_column: str = "text",
    show_progress: bool = True,
    val_fraction: float | None = None,
) -> PreparedData:
    """Resolve ``--dataset`` / ``--data-path`` to prepared data.

    No name and no path: ``stdlib``. No name with a path: ``tokens`` if the path is a ``.bin`` or a
    prepared dir, else ``text``. ``text`` and ``tokens`` need a path; ``stdlib`` and ``synthetic``
    refuse one (a silently ignored flag would be worse than an error).
    """
    path = Path(data_path).expanduser() if data_path is not None else None
    if name is None:
        name = "stdlib" if path is None else ("tokens" if _looks_prepared(path) else "text")
    if name not in DATASET_NAMES:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")
    if name in ("text", "tokens") and path is None:
        raise DataError(f"dataset {name!r} needs --data-path")
    if name in ("stdlib", "synthetic") and path is not None:
        raise DataError(f"dataset {name!r} takes no --data-path (got {path})")
    if name == "stdlib":
        return stdlib_dataset(cache_dir, vocab_size, show_progress, val_fraction)
    if name == "synthetic":
        return synthetic_dataset(n_samples, seq_len, seed, cache_dir=cache_dir, val_fraction=val_fraction)
    assert path is not None
    if name == "tokens":
        pd = load_prepared(path, val_fraction or DEFAULT_VAL_FRACTION)
        made = pd.meta.get("val_fraction")
        if val_fraction is not None and "val_split" not in pd.meta and made != val_fraction:
            # a prepared dir: its val.bin was cut at prepare time; a different request cannot apply
            raise DataError(f"val_fraction = {val_fraction:g} cannot apply to {path}: its train/val split was made "
                            f"by prepare-data (val_fraction {made if made is not None else 'unknown'}); "
                            f"re-run prepare-data --val-fraction {val_fraction:g}, or leave val_fraction unset")
        return pd
    return text_dataset(path, cache_dir, vocab_size, glob, parquet_column, show_progress, val_fraction)


__all__ = [
    "DATASET_NAMES",
    "default_cache_dir",
    "load_dataset",
    "stdlib_dataset",
    "synthetic_dataset",
    "synthetic_documents",
    "text_dataset",
]
