"""The config reference (docs/config.md), generated from config.py so it cannot drift.

Every field of :class:`~.config.ModelConfig` and :class:`~.config.TrainConfig` with its type, default
and the comment written beside it in config.py; the section comments in the class become headings.
Regenerate with ``python -m nanochat_ternary.config_reference > docs/config.md``; a test fails when
the file is stale.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

from .config import ALIASES, VALUE_ALIASES, ModelConfig, TrainConfig

_FIELD = re.compile(r"^\s{4}(\w+):\s*[^=]+?=\s*.+?(?:#\s*(?P<comment>.*))?$")
_SECTION = re.compile(r"^\s{4}#\s*(?P<text>.+)$")


def _rows(cls: type) -> list[tuple[str, str]]:
    """``[("section", text) | ("field", name)]`` in source order, with each field's comment."""
    out: list[tuple[str, str]] = []
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        if m := _SECTION.match(line):
            pending.append(m.group("text"))
            continue
        if (m := _FIELD.match(line)) and not line.strip().startswith(("def ", "@", "return")):
            if pending:
                out.append(("section", " ".join(pending)))
                pending = []
            out.append(("field", m.group(1)))
            comments[m.group(1)] = (m.group("comment") or "").strip()
        elif line.strip() and not line.strip().startswith(("#", '"""')):
            pending = []
    _rows.comments = comments  # type: ignore[attr-defined]
    return out


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        v = f.default_factory()  # type: ignore[misc]
    else:
        return ""
    return f"`{v!r}`" if not isinstance(v, str) else (f'`"{v}"`' if v else '`""`')


def _table(cls: type, title: str, intro: str) -> list[str]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    rows = _rows(cls)
    comments: dict[str, str] = _rows.comments  # type: ignore[attr-defined]
    lines = [f"## {title}", "", intro, ""]
    head = ["| field | type | default | meaning |", "|---|---|---|---|"]
    lines += head
    for kind, val in rows:
        if kind == "section":
            lines += ["", f"**{val[0].upper() + val[1:]}**", ""] + head
        elif val in fields:
            f = fields[val]
            typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            lines.append(f"| `{val}` | `{typ}` | {_default(f)} | {comments.get(val, '').replace('|', '/')} |")
    return lines + [""]


def config_reference() -> str:
    lines = [
        "# Config reference",
        "",
        "Generated from `src/nanochat_ternary/config.py` by `python -m nanochat_ternary.config_reference > "
        "docs/config.md` (a test fails when this file is stale). Sources, later wins: preset (`--config NAME`) "
        "→ TOML (`--config FILE.toml` / `--config-file FILE.toml`, flat keys or `[model]` / `[training]` "
        "sections) → CLI flags → `--set key=value`. An unknown key is an error naming the closest valid one.",
        "",
    ]
    lines += _table(ModelConfig, "Model (`[model]`)", "The shape and quantization of the GPT; stored in every "
                    "checkpoint and fixed for its lifetime (resume and warm start check it).")
    lines += _table(TrainConfig, "Training (`[training]`)", "Optimizer, schedule, data, features, checkpoints and "
                    "the run.")
    if ALIASES:
        lines += ["## Aliases", "", "Older spellings, accepted and resolved at load:", "",
                  "| alias | canonical |", "|---|---|"]
        lines += [f"| `{a}` | `{c}` |" for a, c in sorted(ALIASES.items())]
        lines += [f'| `{a} = true` | `{c} = "{v}"` |' for a, (c, v) in sorted(VALUE_ALIASES.items())]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(config_reference(), end="")
