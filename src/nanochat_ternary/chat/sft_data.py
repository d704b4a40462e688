"""Conversations for chat fine-tuning: JSONL files in the common shapes, and the embedded default set.

File shapes (one conversation per line, blank lines skipped)::

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}        OpenAI fine-tuning
    {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}          ShareGPT

Every problem (bad JSON, unknown role, empty conversation, no assistant turn) is one ``DataError``
line naming ``file:line``.

The default set (:func:`default_conversations`) is built here from local material only, so
``nanochat-train sft --init-from RUN`` works offline: questions about the Python standard library's
functions answered with the first paragraph of their docstrings (inspect, on this interpreter), and
generated arithmetic (``What is 37 + 48?`` -> ``85``), a few with a system message or two turns.
It is seeded; the held-out split is of whole functions (a held-out question asks about a function no
training conversation mentions), so it measures the format, not memorised answers.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
from collections.abc import Iterable
from pathlib import Path

from ..data.chat_template import ROLES
from ..errors import DataError

Conversation = list[dict[str, str]]

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


def parse_conversation(obj: object, where: str) -> Conversation:
    """One JSONL record -> ``[{"role", "content"}, ...]``, or a DataError starting with ``where``."""
    if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
        items, role_key, text_key, roles = obj["messages"], "role", "content", {r: r for r in ROLES}
    elif isinstance(obj, dict) and isinstance(obj.get("conversations"), list):
        items, role_key, text_key, roles = obj["conversations"], "from", "value", SHAREGPT_ROLES
    else:
        raise DataError(f'{where}: expected {{"messages": [...]}} (OpenAI) or {{"conversations": [...]}} (ShareGPT)')
    if not items:
        raise DataError(f"{where}: empty conversation")
    out: Conversation = []
    for i, m in enumerate(items):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {i}: expected an object with {role_key!r} and {text_key!r}")
        role = m.get(role_key)
        if role not in roles:
            raise DataError(f"{where}: message {i}: unknown role {role!r} (allowed: {', '.join(sorted(roles))})")
        content = m.get(text_key)
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i}: {text_key!r} must be a string")
        out.append({"role": roles[role], "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant turn (nothing to train on)")
    return out


def read_conversations(path: str | Path) -> list[Conversation]:
    """Every conversation of one JSONL file (OpenAI or ShareGPT records, mixed is fine)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file (--data takes JSONL files of conversations)")
    out = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read it as UTF-8 text ({e.__class__.__name__})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        out.append(parse_conversation(obj, f"{p}:{n}"))
    if not out:
        raise DataError(f"{p}: no conversations in it")
    return out


def split_conversations(convs: list[Conversation], val_fraction: float,
                        seed: int) -> tuple[list[Conversation], list[Conversation]]:
    """A seeded held-out split of a file's conversations (at least one on each side when possible)."""
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    n_val = min(len(convs) - 1, max(1, round(val_fraction * len(convs)))) if len(convs) > 1 else 0
    val = set(order[:n_val])
    return ([c for i, c in enumerate(convs) if i not in val], [c for i, c in enumerate(convs) if i in val]
            or list(convs[:1]))


# ----------------------------------------------------------------------------------------------
# The embedded default set

# Modules whose functions the stdlib questions ask about: common, documented, present everywhere.
STDLIB_MODULES = ("json", "os", "os.path", "math", "string", "re", "itertools", "functools", "collections",
                  "textwrap", "shutil", "random", "statistics", "heapq", "bisect", "base64", "hashlib",
                  "operator", "glob", "fnmatch", "copy", "pathlib", "time", "datetime", "difflib", "csv",
                  "zlib", "struct", "urllib.parse", "html", "keyword", "inspect", "tempfile", "uuid")
QUESTIONS = ("What does {name} do?", "What is {name} for?", "Explain {name}.", "Tell me what {name} does.",
             "In Python, what does {name} do?")
SYSTEMS = ("You are a helpful assistant.", "Answer briefly.", "You are an expert Python programmer.")
MAX_ANSWER_CHARS = 300


def _first_paragraph(doc: str) -> str:
    """The docstring's first paragraph on one line, cut at a sentence end under MAX_ANSWER_CHARS."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    if len(para) > MAX_ANSWER_CHARS:
        ends = [m.end() for m in re.finditer(r"[.!?](\s|$)", para[:MAX_ANSWER_CHARS])]
        para = para[:ends[-1]].strip() if ends else ""
    return para


def stdlib_functions() -> list[tuple[str, str]]:
    """``(qualified name, answer)`` for the public functions of :data:`STDLIB_MODULES` with a usable
    docstring, sorted by name (so the set does not depend on dict order)."""
    out = {}
    for mod_name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:  # a minimal Python build may lack one (zlib, hashlib...)
            continue
        for name, obj in vars(mod).items():
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            if getattr(obj, "__module__", None) not in (mod_name, None) and not mod_name.startswith("os"):
                continue  # re-exported from elsewhere: asked about where it lives
            doc = inspect.getdoc(obj) or ""
            answer = _first_paragraph(doc)
            # skip signature-only docs ("dumps(obj, ...)") and stubs
            if len(answer) < 20 or answer.startswith(name + "(") or "\ufffd" in answer:
                continue
            out[f"{mod_name}.{name}"] = answer
    return sorted(out.items())


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice("+-*")
    value = a + b if op == "+" else a - b if op == "-" else a * b
    q = rng.choice(("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?"))
    return q.format(a=a, op=op, b=b), str(value)


def _conversation(pairs: Iterable[tuple[str, str]], system: str) -> Conversation:
    msgs = [{"role": "system", "content": system}] if system else []
    for q, a in pairs:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs


def default_conversations(seed: int = 0, n_arithmetic: int = 1500,
                          val_fraction: float = 0.1) -> tuple[list[Conversation], list[Conversation]]:
    """``(train, held_out)``: the stdlib questions (held-out: ``val_fraction`` of the functions) and
    ``n_arithmetic`` arithmetic conversations (held-out: the same share), shuffled, seeded."""
    rng = random.Random(seed)
    funcs = stdlib_functions()
    if not funcs:
        raise DataError("the default sft set found no documented standard-library functions on this Python; "
                        "pass --data FILE.jsonl")
    names = [n for n, _ in funcs]
    rng.shuffle(names)
    held = set(names[:max(1, round(val_fraction * len(names)))])
    train: list[Conversation] = []
    val: list[Conversation] = []
    for name, answer in funcs:
        system = rng.choice(SYSTEMS) if rng.random() < 0.2 else ""
        conv = _conversation([(rng.choice(QUESTIONS).format(name=name), answer)], system)
        (val if name in held else train).append(conv)
    for i in range(n_arithmetic):
        pairs = [_arithmetic(rng) for _ in range(2 if rng.random() < 0.25 else 1)]
        system = rng.choice(SYSTEMS) if rng.random() < 0.2 else ""
        (val if i < round(val_fraction * n_arithmetic) else train).append(_conversation(pairs, system))
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val
