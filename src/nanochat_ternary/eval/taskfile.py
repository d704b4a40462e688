"""lm-eval-harness task YAMLs over local files, read into a :class:`~.choice.ChoiceTask`.

The keys read are lm-eval's own, so a user's existing task definition works unchanged::

    task: my_task
    dataset_path: json                 # the only loader supported: local JSON / JSON Lines
    dataset_kwargs:
      data_files: {test: items.jsonl}  # or a path / list of paths (HF's split "train")
    test_split: test                   # else validation_split, else the only split given
    output_type: multiple_choice
    doc_to_text: "{{question}}"        # a field name, or a Jinja template over the doc
    doc_to_choice: "{{choices}}"       # a field name, a YAML list, or a template giving a list
    doc_to_target: label               # a field name, an int, or a template (digits: an index)
    target_delimiter: " "              # put between context and each choice (lm-eval's default)
    include: base.yaml                 # merged under this file's keys

Resolution follows lm-eval's ``ConfigurableTask``: a string naming a field of the doc is that
field, anything else is rendered as a Jinja template (``StrictUndefined``, trailing newline
kept, the ``regex_replace`` filter); a choice template's output is read with
``ast.literal_eval``; a string target is looked up among the choices. Relative data files are
looked up next to the YAML first, then from the working directory (lm-eval's only place).

Not supported, each a one-line error naming the key: other ``output_type``s, ``num_fewshot``
above 0, a ``description``, ``process_docs`` and any ``!function``, other ``dataset_path``s.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

from ..errors import UserError
from .choice import ChoiceItem, ChoiceTask, check_choices

_UNSUPPORTED = {"process_docs": "a !function over the dataset", "description": "a description before each query",
                "doc_to_image": "images", "doc_to_audio": "audio", "use_prompt": "promptsource prompts"}


class _FunctionTag:
    def __init__(self, name: str) -> None:
        self.name = name


def _yaml_load(path: Path) -> dict[str, Any]:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: _FunctionTag(loader.construct_scalar(node)))
    try:
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 (a SafeLoader)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--tasks {path}: cannot read it ({e})") from None
    except yaml.YAMLError as e:
        raise UserError(f"--tasks {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise UserError(f"--tasks {path}: not a YAML mapping of task keys")
    return doc


def load_config(path: Path, depth: int = 0) -> dict[str, Any]:
    """The YAML's keys, with an ``include``'d base file's keys under them."""
    cfg = _yaml_load(path)
    inc = cfg.pop("include", None)
    if inc is not None:
        if depth > 8:
            raise UserError(f"{path}: 'include' nests more than 8 deep (a cycle?)")
        base = Path(inc) if Path(inc).is_absolute() else path.parent / inc
        if not base.is_file():
            raise UserError(f"{path}: field 'include': no such file {base}")
        cfg = {**load_config(base, depth + 1), **cfg}
    for key, val in cfg.items():
        if isinstance(val, _FunctionTag):
            raise UserError(f"{path}: field '{key}': !function {val.name} is not supported (Python task code); "
                            f"write it as a field name or a Jinja template")
    return cfg


def _template_env():
    from jinja2 import BaseLoader, Environment, StrictUndefined

    env = Environment(loader=BaseLoader, undefined=StrictUndefined, keep_trailing_newline=True)  # noqa: S701 (text, not HTML)
    env.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(pattern, repl, s, count=count)
    return env


def _data_files(path: Path, cfg: dict[str, Any]) -> tuple[list[Path], str]:
    if cfg.get("dataset_path") != "json":
        raise UserError(f"{path}: field 'dataset_path' = {cfg.get('dataset_path')!r}: only 'json' (local JSON / "
                        f"JSON Lines files via dataset_kwargs.data_files) is supported")
    kw = cfg.get("dataset_kwargs") or {}
    files = kw.get("data_files") if isinstance(kw, dict) else None
    if files is None:
        raise UserError(f"{path}: field 'dataset_kwargs.data_files' is missing (the local file(s) to read)")
    split = cfg.get("test_split") or cfg.get("validation_split")
    if isinstance(files, dict):
        split = split or (next(iter(files)) if len(files) == 1 else None)
        if split not in files:
            raise UserError(f"{path}: field 'test_split' = {split!r} is not a key of dataset_kwargs.data_files "
                            f"({', '.join(map(str, files))})")
        files = files[split]
    else:
        split = split or "train"
    names = [files] if isinstance(files, str) else files
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f"{path}: field 'dataset_kwargs.data_files' must be a path, a list of paths or a mapping")
    out = []
    for n in names:
        p = Path(n).expanduser()
        cand = p if p.is_absolute() else (path.parent / p if (path.parent / p).is_file() else p)
        if not cand.is_file():
            raise UserError(f"{path}: field 'dataset_kwargs.data_files': no such file {n}")
        out.append(cand)
    return out, split


def _read_docs(p: Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, doc) for each record of a JSON Lines file, or of a JSON file holding a list."""
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: cannot read it ({e})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            docs = json.loads(text)
        except ValueError as e:
            raise UserError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
        pairs = [(f"{p}[{i}]", d) for i, d in enumerate(docs)]
    else:
        pairs = []
        for no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    pairs.append((f"{p}:{no}", json.loads(line)))
                except ValueError as e:
                    raise UserError(f"{p}:{no}: not valid JSON ({e.msg} at column {e.colno})") from None
    for where, d in pairs:
        if not isinstance(d, dict):
            raise UserError(f"{where}: expected a JSON object (a doc with named fields)")
    return pairs


def _resolve(spec: Any, doc: dict[str, Any], env, key: str, where: str) -> Any:
    if isinstance(spec, (int, list)):
        return spec
    if not isinstance(spec, str):
        raise UserError(f"{where}: field '{key}' must be a field name or a template, got {type(spec).__name__}")
    if spec in doc:
        return doc[spec]
    from jinja2 import TemplateError

    try:
        return env.from_string(spec).render(**doc)
    except TemplateError as e:
        raise UserError(f"{where}: field '{key}': the template fails on this doc ({e})") from None


def _item(cfg: dict[str, Any], doc: dict[str, Any], env, where: str) -> ChoiceItem:
    text = _resolve(cfg.get("doc_to_text", ""), doc, env, "doc_to_text", where)
    if not isinstance(text, str):
        raise UserError(f"{where}: field 'doc_to_text' gives {type(text).__name__}, not text")
    choices = _resolve(cfg.get("doc_to_choice"), doc, env, "doc_to_choice", where)
    if isinstance(choices, str) and cfg.get("doc_to_choice") not in doc:
        try:
            choices = ast.literal_eval(choices)
        except (ValueError, SyntaxError):
            raise UserError(f"{where}: field 'doc_to_choice' renders to {choices[:60]!r}, not a list") from None
    if isinstance(choices, dict):
        choices = list(choices.values())
    target = _resolve(cfg.get("doc_to_target"), doc, env, "doc_to_target", where)
    if isinstance(target, str) and target.isdigit():
        target = int(target)
    if isinstance(target, str) and isinstance(choices, list):
        if target not in choices:
            raise UserError(f"{where}: field 'doc_to_target' = {target[:60]!r} is not one of the choices")
        target = choices.index(target)
    check_choices(where, choices, target, "doc_to_choice", "doc_to_target")
    delim = cfg.get("target_delimiter", " ")
    return ChoiceItem(text, [f"{delim}{c}" for c in choices], target, where, choices=list(choices))


def read_task_yaml(path: str | Path, limit: int | None = None) -> ChoiceTask:
    """An lm-eval multiple-choice task YAML over local files (see the module docstring)."""
    p = Path(path)
    cfg = load_config(p)
    if cfg.get("output_type", "generate_until") != "multiple_choice":
        raise UserError(f"{p}: field 'output_type' = {cfg.get('output_type')!r}: only multiple_choice is supported")
    if int(cfg.get("num_fewshot") or 0) > 0:
        raise UserError(f"{p}: field 'num_fewshot' = {cfg['num_fewshot']}: only zero-shot is supported")
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise UserError(f"{p}: field '{key}' ({what}) is not supported")
    for key in ("doc_to_choice", "doc_to_target"):
        if cfg.get(key) is None:
            raise UserError(f"{p}: field '{key}' is missing")
    if not isinstance(cfg.get("target_delimiter", " "), str):
        raise UserError(f"{p}: field 'target_delimiter' must be a string")
    files, split = _data_files(p, cfg)
    env = _template_env()
    items = []
    for f in files:
        for where, doc in _read_docs(f):
            items.append(_item(cfg, doc, env, where))
    if limit is not None:
        items = items[:limit]
    if not items:
        raise UserError(f"{p}: its data files hold no docs")
    return ChoiceTask(str(cfg.get("task") or p.stem), items, source=f"{p} ({split})")
