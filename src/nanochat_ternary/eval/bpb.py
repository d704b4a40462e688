"""Bits per byte on any text: files, directories, globs, or a prepared data dir's val split.

``bpb = sum over scored tokens of -ln p(token | left context) / (ln 2 * UTF-8 bytes of the text)``.
Dividing by bytes of the text, not by tokens, makes the figure independent of the tokenizer, so
two models with different vocabularies compare on the same text.

Each document is scored on its own, starting after the end-of-text separator the training data
puts between documents (``[eot] + tokens``); the separator itself is not scored (it has no bytes).
A document longer than the model's context is scored in strided windows: the first window scores
its first ``context`` tokens, then each window moves ``stride`` tokens on and scores only the
tokens it newly covers, each with ``context - stride`` or more tokens of left context. Every
token is scored exactly once. ``stride = context`` gives disjoint windows (cheapest, least
context); the default ``context // 2`` doubles the work for at least half a window of context.

A prepared data dir (``val.bin`` + ``tokenizer.json``) is decoded back to text with its own
tokenizer and split at its separators, then re-encoded with the model's: the same bytes for any
model. (The trainer's val bpb scores the concatenated stream in fixed batches, separators
included, so it differs slightly from this figure.)
"""

from __future__ import annotations

import glob
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data.corpus import collect_documents, load_prepared
from ..data.tokenizer import Tokenizer
from ..errors import UserError
from ..model.gpt import GPT
from .result import Result, ratio_stderr
from .score import Request, Scorer, as_scorer, score_requests


@dataclass
class Document:
    text: str
    n_bytes: int


def _is_prepared(p: Path) -> bool:
    return p.is_dir() and (p / "val.bin").is_file() and (p / "train.bin").is_file()


def _prepared_documents(p: Path) -> list[str]:
    pd = load_prepared(p)
    tok = pd.load_tokenizer()
    if tok is None:
        raise UserError(f"--text {p}: a prepared dir without tokenizer.json; its tokens cannot be read back as text")
    val = np.asarray(pd.val, dtype=np.int64)
    cuts = np.flatnonzero(val == tok.eot_id)
    docs, start = [], 0
    for c in [*cuts.tolist(), len(val)]:
        if c > start:
            docs.append(tok.decode(val[start:c].tolist()))
        start = c + 1
    return [d for d in docs if d]


def read_texts(spec: str) -> list[str]:
    """The documents one ``--text`` argument names: a prepared data dir (its val split), a
    directory (every UTF-8 text file below it; binaries skipped), a glob, or a file."""
    p = Path(spec).expanduser()
    if _is_prepared(p):
        return _prepared_documents(p)
    if any(ch in spec for ch in "*?["):
        paths = sorted(glob.glob(str(p), recursive=True))
        files = [Path(f) for f in paths if Path(f).is_file()]
        if not files:
            raise UserError(f"--text {spec}: the glob matches no files")
        return collect_documents(files).texts
    if not p.exists():
        raise UserError(f"--text {spec}: no such file or directory")
    return collect_documents([p]).texts


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int]]:
    """Windows over ``seq = [eot] + tokens`` (positions ``0 .. n_tokens``): ``(lo, hi)`` means the
    model reads ``seq[lo:hi]`` and scores the targets ``seq[prev_hi + 1 : hi + 1]``, where
    ``prev_hi`` is the previous window's ``hi`` (0 for the first)."""
    if context < 1 or not 1 <= stride <= context:
        raise ValueError(f"need 1 <= stride <= context, got stride {stride}, context {context}")
    out = []
    hi = min(context, n_tokens)
    out.append((0, hi))
    while hi < n_tokens:
        hi = min(hi + stride, n_tokens)
        out.append((max(0, hi - context), hi))
    return out


def document_requests(ids: list[int], eot_id: int, context: int, stride: int) -> list[Request]:
    """One request per window of a document's tokens (see :func:`windows`)."""
    seq = [eot_id, *ids]
    reqs, prev = [], 0
    for lo, hi in windows(len(ids), context, stride):
        reqs.append(Request(seq[lo:hi + 1], hi - prev))
        prev = hi
    return reqs


def bits_per_byte(model: GPT | Scorer, tok: Tokenizer, texts: list[str], name: str, stride: int | None = None,
                  batch_size: int = 16, sink: list[tuple[float, int]] | None = None,
                  bar: Any = None) -> Result:
    """Score ``texts`` (see the module docstring); ``sink`` collects ``(nats, bytes)`` per finished
    document, so an interrupted run can still report what it scored."""
    model = as_scorer(model)  # our GPT, or a GGUF / HF export's scorer
    context = model.max_seq_len
    stride = stride or max(1, context // 2)
    if not 1 <= stride <= context:
        raise UserError(f"--stride {stride}: must be between 1 and the model's context ({context})")
    texts = [t for t in texts if t]
    if not texts:
        raise UserError(f"--text {name}: no text to score")
    reqs: list[Request] = []
    owner: list[int] = []  # request -> document
    for d, ids in enumerate(tok.encode_batch(texts)):
        for r in document_requests(ids, tok.eot_id, context, stride):
            reqs.append(r)
            owner.append(d)
    left = np.bincount(owner, minlength=len(texts))  # windows still to score, per document
    nats = np.zeros(len(texts))
    sink = sink if sink is not None else []
    n_bytes = [len(t.encode("utf-8")) for t in texts]
    if bar is not None:  # a tqdm bar: its total is known now
        bar.reset(total=len(reqs))
    for i, lp in score_requests(model, reqs, batch_size, bar.update if bar is not None else None):
        d = owner[i]
        nats[d] -= lp.sum()
        left[d] -= 1
        if left[d] == 0:
            sink.append((float(nats[d]), n_bytes[d]))
    return bpb_result(name, sink, len(texts), stride, context, n_tokens=sum(r.n_score for r in reqs))


def bpb_result(name: str, sink: list[tuple[float, int]], n_docs: int, stride: int, context: int,
               n_tokens: int | None = None) -> Result:
    """The Result for the documents in ``sink`` (all of them, or those scored before an interrupt)."""
    num = np.array([s[0] for s in sink], dtype=np.float64)
    den = np.array([s[1] for s in sink], dtype=np.float64)
    total_bytes = int(den.sum())
    value = float(num.sum() / (math.log(2) * total_bytes)) if total_bytes else float("nan")
    se = ratio_stderr(num, den)
    notes = {"scored_bytes": total_bytes, "documents": len(sink), "context": context, "stride": stride}
    if n_tokens is not None and len(sink) == n_docs:
        notes["scored_tokens"] = n_tokens
    return Result(f"bpb:{name}", "bpb", value, se / math.log(2) if se is not None else None, len(sink),
                  partial=len(sink) < n_docs, notes=notes)
