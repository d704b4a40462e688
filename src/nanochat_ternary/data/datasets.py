"""Datasets by name (``--dataset``), each returning ``PreparedData``, prepared once and cached.

* ``stdlib``    the source code of the running interpreter's standard library: a real code corpus
                (~30 MB of Python) that exists on every machine with Python, so ``train`` works
                out of the box with no download. The default.
* ``pkgdocs``   English prose from the installed Python distributions (READMEs, shipped docs,
                module docstrings; data/pkgdocs.py): ~1.8 MB, offline, a second corpus unlike
                the first (continual training, FIRE). Holds out 5% of its documents by default.
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

Warm start (``init_from``): ``tokenizer=`` names the checkpoint's ``tokenizer.json``, and the
corpora tokenized on the fly (stdlib, pkgdocs, text) are encoded with it instead of a BPE trained on
them (cached under a key that adds the tokenizer's hash; the corpus's own cache entry is used when it
already holds that very tokenizer). ``synthetic`` and ``tokens`` come with their own ids: theirs
must be the same tokenizer file, else a one-line DataError (ids would silently mean other strings).

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
from .tokenizer import Tokenizer, byte_tokenizer, load_tokenizer

DATASET_NAMES = ("stdlib", "pkgdocs", "text", "synthetic", "tokens")
DEFAULT_VAL_FRACTION = 0.01  # stdlib, text and lone .bin files when val_fraction is None
PKGDOCS_VAL_FRACTION = 0.05  # pkgdocs: ~860 documents, 1% would leave too few val tokens for a stable loss
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


def tokenizer_digest(path: str | Path) -> str:
    """sha256 of a ``tokenizer.json``'s bytes: a checkpoint copies its data's file as is, so equal
    digests mean the same tokenizer (as in train/fingerprint.py)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _cached_corpus(cache_dir: Path | None, key: str, build: Callable[[Path, Tokenizer | None], object],
                   tokenizer: str | Path | None) -> PreparedData:
    """``_cached`` for a corpus tokenized here: with its own BPE, or with ``tokenizer`` (see the
    module docstring: the own entry when it already holds that tokenizer, else a key with its hash)."""
    if tokenizer is None:
        return _cached(cache_dir, key, lambda target: build(target, None))
    digest = tokenizer_digest(tokenizer)
    own = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / key
    if (own / "tokenizer.json").is_file() and tokenizer_digest(own / "tokenizer.json") == digest:
        with contextlib.suppress(DataError):
            return load_prepared(own)
    tok = load_tokenizer(tokenizer)
    return _cached(cache_dir, f"{key}-tok{digest[:12]}", lambda target: build(target, tok))


def _check_same_tokenizer(pd: PreparedData, tokenizer: str | Path, what: str) -> None:
    """``synthetic`` / ``tokens`` data come with their own ids: refuse them unless their tokenizer is
    the warm start's (ids that mean other strings would train silently)."""
    if pd.tokenizer_path is None:
        raise DataError(f"{what} has no tokenizer.json, so its ids cannot be checked against the checkpoint's "
                        f"tokenizer {tokenizer}; warm-start on stdlib, pkgdocs or text data (tokenized with it)")
    if tokenizer_digest(pd.tokenizer_path) != tokenizer_digest(tokenizer):
        raise DataError(f"{what} was tokenized with another tokenizer than the checkpoint's ({tokenizer}); "
                        f"warm-start on stdlib, pkgdocs or text data, which are tokenized with the checkpoint's")


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
    val_fraction: float | None = None, tokenizer: str | Path | None = None,
) -> PreparedData:
    """The running interpreter's standard library ``*.py`` sources (tests included, installed
    packages excluded), tokenized with a BPE of ``vocab_size`` (or ``tokenizer``) and cached."""
    root = stdlib_path()
    if not root.is_dir():
        raise DataError(f"the Python standard library sources are not on disk at {root}; pass --data-path")
    impl = platform.python_implementation().lower()
    ver = "{}.{}.{}".format(*sys.version_info[:3])
    key = (f"stdlib-{impl}{ver}-v{vocab_size}-f{PREPARED_FORMAT_VERSION}-{_short_hash(str(root))[:8]}"
           + _vf_key(val_fraction))

    def build(target: Path, tok: Tokenizer | None) -> None:
        docs = collect_documents([root], glob="**/*.py", exclude_dirs=STDLIB_EXCLUDE_DIRS)
        prepare_documents(
            docs,
            target,
            vocab_size=vocab_size,
            val_fraction=val_fraction or DEFAULT_VAL_FRACTION,
            show_progress=show_progress,
            source=f"python-stdlib:{impl}-{ver}:{root}",
            tokenizer=tok,
            extra_meta=_tokenizer_meta(tokenizer),
        )

    return _cached_corpus(Path(cache_dir) if cache_dir is not None else None, key, build, tokenizer)


def _tokenizer_meta(tokenizer: str | Path | None) -> dict[str, str] | None:
    """meta.json's record of where a given tokenizer came from (None: trained on the corpus)."""
    return None if tokenizer is None else {"tokenizer_from": str(tokenizer)}


# ----------------------------------------------------------------------------------------------
# pkgdocs
# ----------------------------------------------------------------------------------------------


def pkgdocs_dataset(
    cache_dir: str | Path | None = None, vocab_size: int = 4096, show_progress: bool = True,
    val_fraction: float | None = None, tokenizer: str | Path | None = None,
) -> PreparedData:
    """English prose of the installed distributions (data/pkgdocs.py), tokenized with a BPE of
    ``vocab_size`` (or ``tokenizer``) and cached by the sorted (name, version) list of what is installed."""
    from .pkgdocs import collect_pkgdocs, installed_fingerprint

    installed = installed_fingerprint()
    vf = val_fraction or PKGDOCS_VAL_FRACTION
    key = (f"pkgdocs-{len(installed)}d-v{vocab_size}-f{PREPARED_FORMAT_VERSION}-{_short_hash(installed)[:12]}"
           + ("" if vf == PKGDOCS_VAL_FRACTION else f"-vf{vf:g}"))

    def build(target: Path, tok: Tokenizer | None) -> None:
        docs = collect_pkgdocs()
        prepare_documents(
            docs,
            target,
            vocab_size=vocab_size,
            val_fraction=vf,
            show_progress=show_progress,
            source=f"pkgdocs:{len(installed)} installed distributions ({docs.n_bytes:,} bytes of text)",
            tokenizer=tok,
            extra_meta={"distributions": docs.sources, "text_bytes": docs.n_bytes,
                        **(_tokenizer_meta(tokenizer) or {})},
        )

    return _cached_corpus(Path(cache_dir) if cache_dir is not None else None, key, build, tokenizer)


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
    tokenizer: str | Path | None = None,
) -> PreparedData:
    """A text/code/parquet file or directory, prepared on first use and cached by a fingerprint
    of its files (paths, sizes, mtimes), so editing the corpus re-prepares it. Tokenized with a
    BPE trained on it, or with ``tokenizer``."""
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

    def build(target: Path, tok: Tokenizer | None) -> None:
        docs = collect_documents([p], glob=glob, parquet_column=parquet_column)
        prepare_documents(
            docs,
            target,
            vocab_size=vocab_size,
            val_fraction=val_fraction or DEFAULT_VAL_FRACTION,
            show_progress=show_progress,
            extra_meta={"glob": glob, "parquet_column": parquet_column, **(_tokenizer_meta(tokenizer) or {})},
            tokenizer=tok,
        )

    return _cached_corpus(Path(cache_dir) if cache_dir is not None else None, key, build, tokenizer)


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
    if p.suffix == ".bin":
        return True
    if not p.is_dir():
        return False
    datatrove_out = (p / "meta.json").is_file() and (p / "train").is_dir() and (p / "val").is_dir()
    return (p / "train.bin").is_file() or (p / "index.json").is_file() or datatrove_out


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
    tokenizer: str | Path | None = None,
) -> PreparedData:
    """Resolve ``--dataset`` / ``--data-path`` to prepared data.

    No name and no path: ``stdlib``. No name with a path: ``tokens`` if the path is a ``.bin`` or a
    prepared dir, else ``text``. ``text`` and ``tokens`` need a path; ``stdlib`` and ``synthetic``
    refuse one (a silently ignored flag would be worse than an error). ``tokenizer``: a warm start's
    (see the module docstring).
    """
    path = Path(data_path).expanduser() if data_path is not None else None
    if name is None:
        name = "stdlib" if path is None else ("tokens" if _looks_prepared(path) else "text")
    if name not in DATASET_NAMES:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")
    if name in ("text", "tokens") and path is None:
        raise DataError(f"dataset {name!r} needs --data-path")
    if name in ("stdlib", "pkgdocs", "synthetic") and path is not None:
        raise DataError(f"dataset {name!r} takes no --data-path (got {path})")
    if name == "stdlib":
        return stdlib_dataset(cache_dir, vocab_size, show_progress, val_fraction, tokenizer)
    if name == "pkgdocs":
        return pkgdocs_dataset(cache_dir, vocab_size, show_progress, val_fraction, tokenizer)
    if name == "synthetic":
        pd = synthetic_dataset(n_samples, seq_len, seed, cache_dir=cache_dir, val_fraction=val_fraction)
        if tokenizer is not None:
            _check_same_tokenizer(pd, tokenizer, "the synthetic dataset (byte tokenizer)")
        return pd
    assert path is not None
    if name == "tokens" and tokenizer is not None:
        pd = load_dataset("tokens", path, val_fraction=val_fraction)
        _check_same_tokenizer(pd, tokenizer, f"the prepared data {path}")
        return pd
    if name == "tokens":
        pd = load_prepared(path, val_fraction or DEFAULT_VAL_FRACTION)
        made = pd.meta.get("val_fraction")
        if val_fraction is not None and "val_split" not in pd.meta and made != val_fraction:
            # a prepared dir: its val.bin was cut at prepare time; a different request cannot apply
            raise DataError(f"val_fraction = {val_fraction:g} cannot apply to {path}: its train/val split was made "
                            f"by prepare-data (val_fraction {made if made is not None else 'unknown'}); "
                            f"re-run prepare-data --val-fraction {val_fraction:g}, or leave val_fraction unset")
        return pd
    return text_dataset(path, cache_dir, vocab_size, glob, parquet_column, show_progress, val_fraction, tokenizer)


__all__ = [
    "DATASET_NAMES",
    "default_cache_dir",
    "load_dataset",
    "pkgdocs_dataset",
    "stdlib_dataset",
    "synthetic_dataset",
    "synthetic_documents",
    "text_dataset",
    "tokenizer_digest",
]
