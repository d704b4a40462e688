"""Multiple choice by log-likelihood, the way lm-eval-harness scores HellaSwag, ARC or PIQA.

Each item is a context and N continuations; the model's answer is the continuation with the
highest log-likelihood given the context:

* ``acc``: argmax of ``sum log p(continuation tokens | context)``;
* ``acc_norm``: argmax of that sum divided by the continuation's length in UTF-8 bytes (lm-eval's
  ``acc_norm`` divides by its length in characters: the same for ASCII), so long answers are not
  penalised for having more tokens.

Context and continuation are tokenized as lm-eval's ``_encode_pair`` does, so token ids agree
with an lm-eval run on our HF export: trailing whitespace of the context moves to the front of
the continuation, the pair is encoded whole, and the continuation is what follows the
context's own tokens. An empty context is the end-of-text separator alone. A pair longer than
the model's context is an error naming the item (lm-eval would silently cut the context).

Local JSONL: one ``{"query": str, "choices": [str, ...], "gold": int}`` per line; the choice is
appended to the query as is (put any separating space in the choices). lm-eval task YAMLs are
read by :mod:`.taskfile`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data.tokenizer import Tokenizer
from ..errors import UserError
from ..model.gpt import GPT
from .result import Result, mean_stderr
from .score import Request, Scorer, as_scorer, check_request, score_requests


@dataclass
class ChoiceItem:
    context: str
    continuations: list[str]  # what is scored after the context (delimiter + choice)
    gold: int
    where: str  # "file:line", for error messages
    choices: list[str] | None = None  # the bare choices (acc_norm's lengths); default: continuations

    def norm_lengths(self) -> list[int]:
        return [len(c.encode("utf-8")) for c in (self.choices or self.continuations)]


@dataclass
class ChoiceTask:
    name: str
    items: list[ChoiceItem]
    chance: float | None = None  # expected acc of a uniform guess (mean of 1 / n_choices)
    source: str = ""

    def __post_init__(self) -> None:
        if self.chance is None and self.items:
            self.chance = float(np.mean([1.0 / len(it.continuations) for it in self.items]))


def check_choices(where: str, choices: object, gold: object, choices_field: str = "choices",
                  gold_field: str = "gold") -> None:
    """One UserError line naming ``where`` and the field for a bad choices list or gold index."""
    if not isinstance(choices, list) or len(choices) < 2:
        raise UserError(f"{where}: field '{choices_field}' must be a list of at least 2 strings")
    for k, c in enumerate(choices):
        if not isinstance(c, str):
            raise UserError(f"{where}: field '{choices_field}[{k}]' is not a string")
        if not c:
            raise UserError(f"{where}: field '{choices_field}[{k}]' is empty")
    if isinstance(gold, bool) or not isinstance(gold, int):
        raise UserError(f"{where}: field '{gold_field}' must be an integer index into the choices")
    if not 0 <= gold < len(choices):
        raise UserError(f"{where}: field '{gold_field}' = {gold} is out of range for {len(choices)} choices")


def read_jsonl(path: str | Path, limit: int | None = None) -> ChoiceTask:
    """A local task file: ``{"query", "choices", "gold"}`` per line (blank lines skipped)."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--tasks {p}: cannot read it ({e.__class__.__name__}: {e})") from None
    items = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{p}:{no}"
        try:
            doc = json.loads(line)
        except ValueError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(doc, dict):
            raise UserError(f"{where}: expected a JSON object with fields query, choices, gold")
        for key in ("query", "choices", "gold"):
            if key not in doc:
                raise UserError(f"{where}: missing field '{key}'")
        if not isinstance(doc["query"], str):
            raise UserError(f"{where}: field 'query' must be a string")
        check_choices(where, doc["choices"], doc["gold"])
        items.append(ChoiceItem(doc["query"], list(doc["choices"]), doc["gold"], where))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise UserError(f"--tasks {p}: no items in it")
    return ChoiceTask(p.stem, items, source=str(p))


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval-harness's ``_encode_pair``: (context ids, continuation ids)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context) if context else []
    cont = whole[len(ctx):]
    if not ctx:
        ctx = [tok.eot_id]
    return ctx, cont


def item_requests(tok: Tokenizer, item: ChoiceItem, max_seq_len: int) -> list[Request]:
    """One request per continuation; a UserError naming the item if the model cannot score it."""
    reqs = []
    for k, c in enumerate(item.continuations):
        ctx, cont = encode_pair(tok, item.context, c)
        if not cont:
            raise UserError(f"{item.where}: field 'choices[{k}]' encodes to no tokens")
        if len(ctx) + len(cont) - 1 > max_seq_len:  # the last token is only a target
            field = "query" if len(ctx) >= max_seq_len else f"choices[{k}]"
            raise UserError(f"{item.where}: field '{field}': {len(ctx)} + {len(cont)} tokens do not fit the "
                            f"model's context of {max_seq_len} (+1); shorten the item")
        req = Request(ctx + cont, len(cont))
        check_request(req, max_seq_len)
        reqs.append(req)
    return reqs


def score_choice_task(model: GPT | Scorer, tok: Tokenizer, task: ChoiceTask, batch_size: int = 16,
                      sink: list[tuple[float, float]] | None = None,
                      bar: Any = None) -> list[Result]:
    """acc and acc_norm of ``task``; ``sink`` gets ``(correct, correct_norm)`` per finished item
    (0.0 or 1.0), for the figures of an interrupted run. Ties go to the first choice (argmax)."""
    model = as_scorer(model)  # our GPT, or a GGUF / HF export's scorer
    reqs: list[Request] = []
    owner: list[tuple[int, int]] = []  # request -> (item, choice)
    for i, it in enumerate(task.items):
        for k, r in enumerate(item_requests(tok, it, model.max_seq_len)):
            reqs.append(r)
            owner.append((i, k))
    ll = [np.full(len(it.continuations), np.nan) for it in task.items]
    left = [len(it.continuations) for it in task.items]
    sink = sink if sink is not None else []
    if bar is not None:  # a tqdm bar: its total is known now
        bar.reset(total=len(reqs))
    for j, lp in score_requests(model, reqs, batch_size, bar.update if bar is not None else None):
        i, k = owner[j]
        ll[i][k] = lp.sum()
        left[i] -= 1
        if left[i] == 0:
            sink.append(item_correct(ll[i], task.items[i]))
    return choice_results(task, sink)


def item_correct(ll: np.ndarray, item: ChoiceItem) -> tuple[float, float]:
    norm = ll / np.asarray(item.norm_lengths(), dtype=np.float64)
    return float(int(np.argmax(ll)) == item.gold), float(int(np.argmax(norm)) == item.gold)


def choice_results(task: ChoiceTask, sink: list[tuple[float, float]]) -> list[Result]:
    """acc and acc_norm over the items in ``sink`` (all of the task's, or those scored so far)."""
    n = len(sink)
    partial = n < len(task.items)
    notes = {"chance": task.chance, "choices": "log-likelihood", "source": task.source}
    out = []
    for m, metric in enumerate(("acc", "acc_norm")):
        vals = [s[m] for s in sink]
        out.append(Result(task.name, metric, float(np.mean(vals)) if vals else float("nan"),
                          mean_stderr(vals), n, partial, dict(notes)))
    return out
