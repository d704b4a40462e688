"""Built-in tasks made from local material.

``stdlib-next-line`` — "which of 4 lines really comes next", for the default model (trained on the
Python standard library). Chance is 25%.

* Material: the stdlib files the default model did **not** train on. The default corpus holds out
  1% of its documents, chosen by ``data.corpus._split_documents`` with seed 0 over the files
  ``data.datasets.stdlib_dataset`` reads (sorted, ``site-packages`` and ``__pycache__`` left
  out); the same call here gives the same held-out files. A model trained on anything else is
  scored all the same, with a warning in the notes.
* Item: a held-out file's line (16..100 bytes without its indentation, not a comment or a bare
  string/bracket, appearing once among the held-out lines, using a name — not a keyword, builtin
  or ``self`` — that the lines before it use too) after up to ``CONTEXT_LINES`` lines that
  precede it (fewer when the model's context is short). Lines are grouped in sets of 4 from
  4 different files with **the same indentation** and byte lengths within ``LENGTH_SLACK`` of
  each other, so neither layout nor length tells the answer. Each set makes 4 items: each line
  is the answer once (after its own context) and a distractor three times (after the others').
  That is what makes chance 25% for *any* model that ignores the context, whatever its prior
  over lines: it ranks a set's 4 lines the same way after every context, so it is right on
  exactly one of the set's 4 items. (Distractors drawn from the pool at large are not: they are
  typical stdlib lines — ``self.assertEqual(...)`` — that a stdlib model prefers to the often
  rarer true line; a naive draw scored 19% at step 100.) Only reading the context beats 25%.
  The order of the choices is drawn per item. Items of one set share lines, so the reported
  stderr (items taken as independent) is somewhat optimistic.
* Deterministic: everything is seeded (``seed``, default 0), so two models get the same items
  when they share a tokenizer and a context length.
"""

from __future__ import annotations

import builtins
import keyword
import random
import re
from dataclasses import dataclass

from ..data.corpus import _split_documents, collect_documents
from ..data.datasets import DEFAULT_VAL_FRACTION, STDLIB_EXCLUDE_DIRS, stdlib_path
from ..errors import UserError
from .choice import ChoiceItem, ChoiceTask, encode_pair

BUILTIN_TASKS = {"stdlib-next-line": "which of 4 lines comes next, on held-out Python stdlib files (chance 25%)"}
N_ITEMS = 500
CONTEXT_LINES = 12
MIN_BYTES, MAX_BYTES = 16, 100
LENGTH_SLACK = 0.15  # distractor length within 15% of the gold line's (stripped, in bytes)
N_CHOICES = 4
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_COMMON = frozenset(keyword.kwlist) | frozenset(dir(builtins)) | {"self", "cls"}
_SKIP = re.compile(r"""^\s*(#|\"\"\"|'''|[\"'][^\"']*[\"'],?$|[)\]}]+[,:]?$)""")


@dataclass(frozen=True)
class Line:
    doc: int
    no: int
    indent: str
    body: str  # the line without its indentation


def held_out_stdlib() -> list[str]:
    """The texts of the default corpus's val split (see the module docstring)."""
    root = stdlib_path()
    if not root.is_dir():
        raise UserError(f"stdlib-next-line: the Python standard library sources are not on disk at {root}")
    docs = collect_documents([root], glob="**/*.py", exclude_dirs=STDLIB_EXCLUDE_DIRS).texts
    is_val = _split_documents(len(docs), DEFAULT_VAL_FRACTION, 0)
    return [t for t, v in zip(docs, is_val) if v]


def _reuses_a_name(body: str, before: list[str]) -> bool:
    """Whether ``body`` uses a name (3+ characters, not a keyword or builtin) that the lines
    before it use too: the line is about its context, so reading the context can tell it."""
    names = {w for w in _NAME.findall(body) if len(w) >= 3 and w not in _COMMON}
    return bool(names) and any(w in names for b in before for w in _NAME.findall(b))


def _candidates(docs: list[list[str]]) -> list[Line]:
    count: dict[str, int] = {}
    for lines in docs:
        for s in lines:
            count[s.strip()] = count.get(s.strip(), 0) + 1
    out = []
    for d, lines in enumerate(docs):
        for no, s in enumerate(lines):
            body = s.lstrip(" \t")
            n = len(body.encode("utf-8"))
            if MIN_BYTES <= n <= MAX_BYTES and not _SKIP.match(body) and count[body.strip()] == 1 and no >= 2 \
                    and _reuses_a_name(body, lines[max(0, no - CONTEXT_LINES):no]):
                out.append(Line(d, no, s[: len(s) - len(body)], body))
    return out


def _groups(cands: list[Line], rng: random.Random) -> list[list[Line]]:
    """Sets of ``N_CHOICES`` lines with one indentation, from distinct files, lengths within
    ``LENGTH_SLACK`` of the set's shortest: neighbours in length order, greedily."""
    by_indent: dict[str, list[Line]] = {}
    for c in cands:
        by_indent.setdefault(c.indent, []).append(c)
    groups = []
    for indent in sorted(by_indent):
        pool = sorted(by_indent[indent], key=lambda c: (len(c.body.encode("utf-8")), rng.random()))
        used = [False] * len(pool)
        for i, first in enumerate(pool):
            if used[i]:
                continue
            n0 = len(first.body.encode("utf-8"))
            group, docs = [i], {first.doc}
            for j in range(i + 1, len(pool)):
                if len(group) == N_CHOICES or len(pool[j].body.encode("utf-8")) > n0 * (1 + LENGTH_SLACK):
                    break
                if not used[j] and pool[j].doc not in docs:
                    group.append(j)
                    docs.add(pool[j].doc)
            if len(group) == N_CHOICES:
                for j in group:
                    used[j] = True
                groups.append([pool[j] for j in group])
    return groups


def next_line_items(texts: list[str], n_items: int = N_ITEMS, seed: int = 0, fits=None) -> list[ChoiceItem]:
    """Build the items from ``texts`` (see the module docstring). ``fits(context, choices)`` says
    whether an item fits the model; lines are dropped from the front of the context until it
    does (an item that never fits is skipped)."""
    docs = [t.splitlines() for t in texts]
    rng = random.Random(seed)
    groups = _groups(_candidates(docs), rng)
    rng.shuffle(groups)
    items: list[ChoiceItem] = []
    for g, group in enumerate(groups):
        for gold_line in group:  # each line of the set is the answer once and a distractor 3 times
            if len(items) >= n_items:
                return items
            choices = [c.indent + c.body for c in group]
            rng.shuffle(choices)
            gold = choices.index(gold_line.indent + gold_line.body)
            lines = docs[gold_line.doc]
            for start in range(max(0, gold_line.no - CONTEXT_LINES), gold_line.no):
                context = "\n".join(lines[start:gold_line.no]) + "\n"
                if fits is None or fits(context, choices):
                    where = (f"stdlib-next-line item {len(items)} (set {g}, held-out file {gold_line.doc}, "
                             f"line {gold_line.no + 1})")
                    items.append(ChoiceItem(context, choices, gold, where))
                    break
    return items


def builtin_task(name: str, limit: int | None, opened) -> ChoiceTask:
    """A built-in task for ``opened`` (an EvalModel or an OpenedModel: its tokenizer and context
    length bound each item)."""
    if name != "stdlib-next-line":
        raise UserError(f"--tasks {name}: no such built-in task ({', '.join(BUILTIN_TASKS)})")
    tok = opened.require_tokenizer()
    max_len = opened.max_seq_len if hasattr(opened, "max_seq_len") else opened.config.model.max_seq_len

    def fits(context: str, choices: list[str]) -> bool:
        return all(sum(map(len, encode_pair(tok, context, c))) - 1 <= max_len for c in choices)

    items = next_line_items(held_out_stdlib(), limit or N_ITEMS, 0, fits)
    task = ChoiceTask(name, items, chance=1.0 / N_CHOICES, source="python stdlib, the default corpus's val split")
    trained_on = (opened.meta.get("config", {}).get("training", {}) or {}).get("dataset")
    if trained_on not in (None, "", "stdlib"):
        task.source += f" (warning: this model trained on {trained_on!r}, not stdlib)"
    return task
