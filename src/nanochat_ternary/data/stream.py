"""``prepare-data``: inputs -> tokenizer -> token shards on disk, streamed with bounded memory,
resumable after an interruption.

Two passes over the inputs (``sources.iter_units``, deterministic):

1. **Scan.** Counts documents and bytes (the progress bar's total), decides the val split and
   keeps the tokenizer's training sample: the units with the smallest seeded hashes that fit in
   ``tokenizer_sample_bytes``, a sample that does not depend on the order or size of the corpus.
   Bad inputs are reported here, once, before anything is encoded.
2. **Encode.** Units are read ahead by a thread, encoded in batches of about ``batch_chars``
   characters by ``Tokenizer.encode_arrays`` (HF tokenizers' Rust code, parallel over all cores,
   without the GIL) and appended to the split's ``ShardWriter``.

Memory: the tokenizer sample (at most ``tokenizer_sample_bytes`` of text, 48 MiB by default, plus
what BPE training needs for it), a few encode batches and one unit (``sources.PIECE_CHARS``) —
the corpus size does not enter. The file listing of a directory input (~200 bytes per file) is
kept too.

Validation split, per document: a document is in val when ``blake2b(seed, key) < val_fraction``
(key: its path inside the input, plus its row), so the choice does not move when documents are
added. At least one document is in val and one in train (the smallest / largest hash is moved if
the draw gave none). A corpus of one document is split by its pieces (each then ends with a
separator), or, if it is a single piece, by the tail of its token stream as before.

Output: the dir must not exist or be empty; a dir left by an interrupted prepare of the same inputs
and settings is resumed (``shards``), anything else is refused. ``meta.json`` is written last.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .corpus import PREPARED_FORMAT_VERSION, TOKENIZER_SAMPLE_BYTES, _write_meta
from .shards import INDEX_FORMAT, INDEX_NAME, INDEX_VERSION, ShardWriter, SplitState, disk_error, write_json_atomic
from .sources import PIECE_CHARS, Problems, ReadOptions, Unit, input_fingerprint, iter_units, list_inputs
from .tokenizer import MIN_VOCAB_SIZE, Tokenizer, load_tokenizer, train_tokenizer

DEFAULT_SHARD_TOKENS = 100_000_000
BATCH_CHARS = 1 << 20
_OURS = re.compile(r"^(\.prepare\.lock|\..+\.tmp)$")  # lock and temp files this module leaves behind


@dataclass(frozen=True)
class PrepareSettings:
    vocab_size: int = 4096
    val_fraction: float = 0.01
    seed: int = 0
    glob: str = "**/*"
    text_field: str = "text"
    shard_tokens: int = DEFAULT_SHARD_TOKENS  # 0: one train.bin and one val.bin
    tokenizer_sample_bytes: int = TOKENIZER_SAMPLE_BYTES
    piece_chars: int = PIECE_CHARS
    batch_chars: int = BATCH_CHARS
    strict: bool = False
    exclude_dirs: tuple[str, ...] = ()

    def check(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise DataError(f"--val-fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise DataError(f"--vocab-size {self.vocab_size} too small: byte-level BPE needs at least {MIN_VOCAB_SIZE}")
        if self.shard_tokens < 0:
            raise DataError(f"--shard-tokens must be >= 0 (0: one file per split), got {self.shard_tokens}")
        if self.seed < 0 or self.tokenizer_sample_bytes < 1 or self.piece_chars < 16 or self.batch_chars < 1:
            raise DataError("--seed must be >= 0 and the sample, piece and batch sizes positive")

    def job(self) -> dict[str, Any]:
        """The settings that decide the output (a resume must match them)."""
        return {k: getattr(self, k) for k in ("vocab_size", "val_fraction", "seed", "glob", "text_field",
                                               "shard_tokens", "tokenizer_sample_bytes", "piece_chars")}


@dataclass
class PrepareSummary:
    out: Path
    meta: dict[str, Any]
    resumed: bool = False
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        m = self.meta
        kind = "shards" if m["layout"] == "shards" else "files"
        tokens = m["train_tokens"] + m["val_tokens"]
        mb = (m["train_bytes"] + m["val_bytes"]) / 1e6
        rate = f", {mb / self.seconds:.2f} MB/s" if self.seconds > 0 else ""
        return [f"wrote {self.out}{' (resumed)' if self.resumed else ''}: vocab {m['vocab_size']}, "
                f"{m['n_docs']:,} documents, {tokens:,} tokens, {mb:,.2f} MB of text, "
                f"{m['train_shards']} train + {m['val_shards']} val {kind}, "
                f"val share {m['val_tokens'] / max(tokens, 1):.2%} of tokens ({m['n_val_docs']:,} documents)"
                f"; {self.seconds:.0f} s{rate}"]


def _unit_hash(seed: int, key: str) -> float:
    """A seeded, uniform [0, 1) draw from a document's key."""
    d = hashlib.blake2b(f"{seed}\0{key}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(d, "little") / 2**64


@dataclass
class _Extremes:
    """Counts of val draws and the keys with the smallest / largest hash (the fix-ups)."""

    n: int = 0
    n_val: int = 0
    lo: tuple[float, str] = (2.0, "")
    hi: tuple[float, str] = (-1.0, "")

    def add(self, h: float, key: str, vf: float) -> None:
        self.n += 1
        self.n_val += h < vf
        self.lo = min(self.lo, (h, key))
        self.hi = max(self.hi, (h, key))

    def forced(self) -> dict[str, str]:
        if self.n_val == 0:
            return {self.lo[1]: "val"}
        if self.n_val == self.n:
            return {self.hi[1]: "train"}
        return {}


@dataclass
class _Plan:
    """What the scan decided: the split rule and the totals."""

    mode: str  # "docs" | "pieces" | "tail"
    forced: dict[str, str]
    n_units: int
    n_docs: int
    n_bytes: int
    seed: int
    vf: float

    def key(self, u: Unit) -> str:
        return u.key if self.mode == "docs" else f"{u.key}@{u.piece}"

    def split(self, u: Unit) -> str:
        k = self.key(u)
        if k in self.forced:
            return self.forced[k]
        return "val" if _unit_hash(self.seed, k) < self.vf else "train"

    def ends_doc(self, u: Unit) -> bool:
        return u.last or self.mode == "pieces"


def _scan(listing: list, opts: ReadOptions, s: PrepareSettings, want_sample: bool,
          show_progress: bool) -> tuple[_Plan, list[str], Problems]:
    """Pass 1 (see the module docstring): the plan, the tokenizer sample (train units, corpus
    order) and the problems found."""
    from tqdm.auto import tqdm

    problems = Problems(strict=s.strict)
    docs, pieces = _Extremes(), _Extremes()
    heap: list[tuple[float, int, Unit]] = []  # max-heap on the hash via negation: (-hash, unit index, unit)
    heap_chars = n_units = n_bytes = 0
    with tqdm(desc="scan", unit="B", unit_scale=True, disable=not show_progress, file=sys.stderr) as bar:
        for u in iter_units(listing, opts, problems):
            nb = len(u.text.encode("utf-8", "surrogatepass"))
            n_units += 1
            n_bytes += nb
            bar.update(nb)
            pieces.add(_unit_hash(s.seed, f"{u.key}@{u.piece}"), f"{u.key}@{u.piece}", s.val_fraction)
            if u.last:
                docs.add(_unit_hash(s.seed, u.key), u.key, s.val_fraction)
            if want_sample:  # characters: a cheap, close-enough proxy for bytes
                h = _unit_hash(s.seed + 1, f"{u.key}@{u.piece}")
                if heap_chars < s.tokenizer_sample_bytes or h < -heap[0][0]:
                    heapq.heappush(heap, (-h, n_units - 1, u))
                    heap_chars += len(u.text)
                    while len(heap) > 1 and heap_chars - len(heap[0][2].text) >= s.tokenizer_sample_bytes:
                        heap_chars -= len(heapq.heappop(heap)[2].text)
    if n_units == 0:
        raise DataError(f"no text found in the inputs ({problems.count} bad inputs skipped)")
    if docs.n >= 2:
        plan = _Plan("docs", docs.forced(), n_units, docs.n, n_bytes, s.seed, s.val_fraction)
    elif n_units >= 2:
        plan = _Plan("pieces", pieces.forced(), n_units, n_units, n_bytes, s.seed, s.val_fraction)
    else:
        plan = _Plan("tail", {}, 1, 1, n_bytes, s.seed, s.val_fraction)
    # the tokenizer learns from the train split only (the whole text when it is one piece)
    chosen = sorted((i, u) for _, i, u in heap if plan.mode == "tail" or plan.split(u) == "train")
    return plan, [u.text for _, u in chosen], problems


def _prefetch(it: Iterator[Any], depth: int = 4) -> Iterator[Any]:
    """Run ``it`` in a thread, ``depth`` items ahead (reading and decompressing overlap encoding,
    which releases the GIL). An exception in the thread is re-raised here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    t = threading.Thread(target=work, name="prepare-read", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _batches(listing: list, opts: ReadOptions, plan: _Plan, batch_chars: int) -> Iterator[list[tuple[int, Unit, str]]]:
    """(unit index, unit, split) in groups of about ``batch_chars`` characters."""
    group: list[tuple[int, Unit, str]] = []
    size = 0
    for i, u in enumerate(iter_units(listing, opts, Problems())):  # problems were reported by the scan
        group.append((i, u, plan.split(u)))
        size += len(u.text)
        if size >= batch_chars:
            yield group
            group, size = [], 0
    if group:
        yield group


def _encode_pass(listing: list, opts: ReadOptions, plan: _Plan, tok: Tokenizer, writers: dict[str, ShardWriter],
                 resume: dict[str, tuple[int, int]], s: PrepareSettings, show_progress: bool) -> None:
    """Pass 2: encode every unit not yet in a finished shard and append it to its split."""
    from tqdm.auto import tqdm

    eot = np.array([tok.eot_id], dtype=np.uint32)
    t0, n_tok = time.monotonic(), 0
    with tqdm(total=plan.n_bytes, desc="tokenize", unit="B", unit_scale=True, disable=not show_progress,
              file=sys.stderr) as bar:
        for group in _prefetch(_batches(listing, opts, plan, s.batch_chars)):
            todo = [(i, u, sp) for i, u, sp in group if i >= resume[sp][0]]
            done_bytes = sum(len(u.text.encode("utf-8", "surrogatepass")) for i, u, sp in group)
            if todo:
                for (i, u, sp), ids in zip(todo, tok.encode_arrays([u.text for _, u, _ in todo])):
                    ends = plan.ends_doc(u)
                    toks = np.concatenate([ids, eot]) if ends else ids
                    skip = resume[sp][1] if i == resume[sp][0] else 0
                    writers[sp].add_unit(i, toks, len(u.text.encode("utf-8", "surrogatepass")), ends, skip)
                    n_tok += len(toks) - skip
            bar.update(done_bytes)
            bar.set_postfix_str(f"{n_tok / max(time.monotonic() - t0, 1e-9) / 1e3:,.0f}k tok/s", refresh=False)


def _tail_pass(listing: list, opts: ReadOptions, tok: Tokenizer, writers: dict[str, ShardWriter], vf: float) -> None:
    """A corpus of one short document: its last ``vf`` of tokens (at least one) is the val split."""
    (u,) = list(iter_units(listing, opts, Problems()))
    stream = np.concatenate([tok.encode_arrays([u.text])[0], np.array([tok.eot_id], dtype=np.uint32)])
    if len(stream) < 3:
        raise DataError(f"too little text to split into train and val ({len(stream)} tokens)")
    n_val = min(len(stream) - 2, max(1, round(len(stream) * vf)))
    cut = len(stream) - n_val
    lengths = np.asarray(tok.token_byte_lengths(), dtype=np.int64)
    writers["train"].add_unit(0, stream[:cut], int(lengths[stream[:cut]].sum()), True)
    writers["val"].add_unit(0, stream[cut:], int(lengths[stream[cut:]].sum()), False)


# ----------------------------------------------------------------------------------------------
# The output dir
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked_out(out: Path) -> Iterator[None]:
    """One prepare at a time per output dir (flock on a lock file that is never followed if a link)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        fd = os.open(out / ".prepare.lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        raise DataError(f"cannot create the lock file in {out}: {e.strerror}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise DataError(f"another prepare-data is writing {out}; wait for it or choose another --out") from e
        yield
    finally:
        os.close(fd)


def _claim_out(out: Path, job: dict[str, Any]) -> dict[str, Any] | None:
    """The index to resume from, None for a fresh dir; refuses anything else (one line)."""
    names = [p.name for p in out.iterdir() if not _OURS.match(p.name)]
    if not names:
        return None
    if "meta.json" in names or INDEX_NAME not in names:
        raise DataError(f"--out {out} exists and is not empty (it holds {', '.join(sorted(names)[:3])}"
                        f"{', ...' if len(names) > 3 else ''}); prepare-data never replaces a dir: "
                        "choose a new --out or delete this one")
    from .shards import read_index

    idx = read_index(out / INDEX_NAME)
    if idx.get("job") != job:
        raise DataError(f"--out {out} holds an unfinished prepare of other inputs or settings (or the inputs "
                        "changed since); re-run it with the same inputs and flags, or choose a new --out")
    for p in out.iterdir():  # temp files of the interrupted run
        if p.name.endswith(".tmp") and p.name.startswith("."):
            p.unlink()
    return idx


def _tokenizer_for(out: Path, idx: dict[str, Any] | None, given: Tokenizer | None, sample: list[str],
                   s: PrepareSettings, show_progress: bool) -> Tokenizer:
    """The resumed run's tokenizer, the given one, or a BPE trained on the train units of the sample."""
    path = out / "tokenizer.json"
    if idx is not None and path.is_file():
        return load_tokenizer(path)
    if given is None:
        if not sample:
            raise DataError("no train text to learn a tokenizer from")
        given = train_tokenizer(sample, s.vocab_size, show_progress)
    tmp = out / ".tokenizer.json.tmp"
    try:
        given.save(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise disk_error(e, path) from e
    return given


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _job(listing: list, s: PrepareSettings, tokenizer: str | Path | None) -> dict[str, Any]:
    """What decides the output: the inputs (paths, sizes, mtimes, hashed), the settings, the tokenizer."""
    fp = hashlib.sha256(repr(input_fingerprint(listing)).encode("utf-8", "surrogatepass")).hexdigest()
    return {"inputs": [str(p.resolve()) for p, _ in listing], "inputs_sha256": fp, "settings": s.job(),
            "tokenizer_sha256": _file_sha(Path(tokenizer)) if tokenizer is not None else None}


def _meta(plan: _Plan, states: dict[str, SplitState], tok: Tokenizer, listing: list, problems: Problems,
          s: PrepareSettings) -> dict[str, Any]:
    tr, va = states["train"], states["val"]
    return {
        "source": [str(p.resolve()) for p, _ in listing],
        "vocab_size": tok.vocab_size,
        "n_docs": plan.n_docs,
        "n_train_docs": tr.docs,
        "n_val_docs": va.docs,
        "train_tokens": tr.tokens,
        "val_tokens": va.tokens,
        "train_bytes": tr.bytes,
        "val_bytes": va.bytes,
        "tokenizer": "tokenizer.json",
        "eot_id": tok.eot_id,
        "n_files": sum(1 if files is None else len(files) for _, files in listing),
        "skipped_files": problems.count,
        "skipped_examples": problems.examples,
        "val_fraction": s.val_fraction,
        "split_rule": {"docs": "per document, seeded hash of its key", "pieces": "per piece of the one document",
                      "tail": "the tail of the one document's tokens"}[plan.mode],
        "seed": s.seed,
        "glob": s.glob,
        "text_field": s.text_field,
        "layout": "shards" if s.shard_tokens else "single",
        "shard_tokens": s.shard_tokens,
        "train_shards": len(tr.shards),
        "val_shards": len(va.shards),
        "index": INDEX_NAME,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "format_version": PREPARED_FORMAT_VERSION,
    }


def prepare_stream(inputs: Sequence[str | Path], out_dir: str | Path, settings: PrepareSettings | None = None,
                   tokenizer: str | Path | None = None, show_progress: bool = True) -> PrepareSummary:
    """Prepare ``inputs`` into ``out_dir`` (see the module docstring); resume an interrupted one.

    ``tokenizer``: encode with this ``tokenizer.json`` instead of training a BPE. Warnings (bad
    inputs skipped) go to stderr and into the summary."""
    s = settings or PrepareSettings()
    s.check()
    t0 = time.monotonic()
    out = Path(out_dir).expanduser()
    opts = ReadOptions(s.glob, s.text_field, frozenset(s.exclude_dirs), frozenset({out.resolve()}), s.piece_chars)
    listing = list_inputs(list(inputs), opts)
    given = load_tokenizer(tokenizer) if tokenizer is not None else None
    job = _job(listing, s, tokenizer)
    try:
        if out.exists() and not out.is_dir():
            raise DataError(f"--out {out} exists and is not a directory")
        if not out.exists():
            out.mkdir(parents=True)
    except OSError as e:  # a name too long, no permission, a read-only file system
        raise DataError(f"cannot create --out {out}: {e.strerror or e}") from e
    with _locked_out(out):
        idx = _claim_out(out, job)
        try:
            return _run(out, listing, opts, s, job, idx, given, show_progress, t0)
        except OSError as e:  # anything the writers did not already turn into one line
            where = f" ({e.filename})" if e.filename else ""
            raise DataError(f"{e.strerror or e}{where}; the finished shards in {out} are kept: fix it and run "
                            "the same prepare-data command again to resume") from e


def _run(out: Path, listing: list, opts: ReadOptions, s: PrepareSettings, job: dict[str, Any],
         idx: dict[str, Any] | None, given: Tokenizer | None, show_progress: bool, t0: float) -> PrepareSummary:
    states = {sp: SplitState() for sp in ("train", "val")}
    if idx is not None and s.shard_tokens:
        states = {sp: SplitState.from_json(idx[sp], out / INDEX_NAME) for sp in states}
    have_tok = idx is not None and (out / "tokenizer.json").is_file()
    tok_sha = idx.get("tokenizer_sha256") if idx is not None else None

    def save_index(complete: bool = False) -> None:
        try:
            write_json_atomic(out / INDEX_NAME, {"format": INDEX_FORMAT, "version": INDEX_VERSION, "job": job,
                                                 "tokenizer_sha256": tok_sha, "complete": complete,
                                                 **{sp: st.to_json() for sp, st in states.items()}})
        except OSError as e:
            raise disk_error(e, out / INDEX_NAME) from e

    plan, sample, problems = _scan(listing, opts, s, want_sample=given is None and not have_tok,
                                   show_progress=show_progress)
    if idx is None:  # after the scan: a bad input under --strict leaves the dir empty, not claimed
        save_index()  # from here on the dir is an unfinished prepare of this job, resumable
    warning = problems.summary()
    if warning:
        print(warning, file=sys.stderr)
    if have_tok and tok_sha is not None and _file_sha(out / "tokenizer.json") != tok_sha:
        raise DataError(f"{out / 'tokenizer.json'} changed since the interrupted prepare; "
                        f"delete {out} and prepare again")
    tok = _tokenizer_for(out, idx, given, sample, s, show_progress)
    del sample
    if tok_sha is None:
        tok_sha = _file_sha(out / "tokenizer.json")
        save_index()
    if plan.mode == "tail":  # one short document: nothing worth resuming
        states = {sp: SplitState() for sp in states}
    resume = {sp: (st.next_unit, st.skip) for sp, st in states.items()}
    writers = {sp: ShardWriter(out, sp, tok.vocab_size, s.shard_tokens, st, save_index) for sp, st in states.items()}
    try:
        if plan.mode == "tail":
            _tail_pass(listing, opts, tok, writers, s.val_fraction)
        else:
            _encode_pass(listing, opts, plan, tok, writers, resume, s, show_progress)
        for w in writers.values():
            w.finish(plan.n_units)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    meta = _meta(plan, states, tok, listing, problems, s)
    save_index(complete=True)
    try:
        _write_meta(out / ".meta.json.tmp", meta)
        os.replace(out / ".meta.json.tmp", out / "meta.json")
    except OSError as e:
        raise disk_error(e, out / "meta.json") from e
    with contextlib.suppress(OSError):
        (out / ".prepare.lock").unlink()
    return PrepareSummary(out, meta, resumed=idx is not None, seconds=time.monotonic() - t0,
                          warnings=[warning] if warning else [])
