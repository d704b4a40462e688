"""A chosen evaluation next to the val loss, at every evaluation of the run (``eval_tasks``).

Off by default (``eval_tasks = ""``): the trainer builds nothing and the loop runs no extra code.
On, ``eval_tasks`` is a comma-separated list of what ``nanochat-train eval`` scores (eval/):

* a built-in task name (``stdlib-next-line``, eval/tasks.py), a ``.jsonl`` task file or an
  lm-eval ``.yaml`` task: multiple choice by log-likelihood, logged as ``task_<name>_acc`` and
  ``task_<name>_acc_norm`` (``<name>``: the built-in name, or the file's stem);
* ``bpb:PATH``: bits per byte on a text file, dir or glob, logged as ``task_<stem>_bpb``.

Each task keeps its first ``eval_task_limit`` items (documents for bpb), built once when the run
starts, so a bad file fails before the first step and every evaluation scores the same items.
The time it takes is logged as ``task_eval_s`` and kept out of the next record's ``tok_per_s``
(policies.py). Every rank scores the same items on its whole model (no collective), so it is
refused under ``parallelism = 'fsdp'``, whose ranks hold shards. HumanEval (generation and a
sandbox) is for ``nanochat-train eval`` on a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..data.tokenizer import Tokenizer, load_tokenizer
from ..errors import UserError
from ..eval.bpb import bits_per_byte, read_texts
from ..eval.choice import ChoiceTask, read_jsonl, score_choice_task
from ..eval.result import Result
from ..eval.taskfile import read_task_yaml
from ..eval.tasks import BUILTIN_TASKS, builtin_task
from .dataset import LoadedData
from .runtime import Runtime


@dataclass
class _TrainingModel:
    """What eval/tasks.builtin_task reads of an opened checkpoint, for the model being trained."""

    tok: Tokenizer
    config: Config
    meta: dict[str, Any] = field(default_factory=dict)

    def require_tokenizer(self) -> Tokenizer:
        return self.tok


def _key(name: str) -> str:
    return name.replace(" ", "_")


class TaskEval:
    """``run()`` scores every chosen task on ``model`` and returns ``{task_<name>_<metric>: value}``."""

    def __init__(self, model: torch.nn.Module, jobs: list[tuple[str, Callable[[], list[Result]]]],
                 autocast: Callable[[], Any]) -> None:
        self.model, self.jobs, self.autocast = model, jobs, autocast

    @classmethod
    def from_config(cls, cfg: Config, model: torch.nn.Module, data: LoadedData, rt: Runtime) -> TaskEval:
        t = cfg.training
        specs = [s.strip() for s in t.eval_tasks.split(",") if s.strip()]
        if not specs:
            raise UserError(f"eval_tasks = {t.eval_tasks!r}: names no task (give a built-in task, a .jsonl / "
                            f".yaml task file or bpb:PATH, comma-separated)")
        if t.parallelism == "fsdp" and rt.distributed:
            raise UserError("eval_tasks is not supported under parallelism = 'fsdp' (each rank holds a shard of the "
                            "weights): evaluate the checkpoints with nanochat-train eval, or use parallelism = 'ddp'")
        if data.tokenizer_path is None:
            raise UserError("eval_tasks needs a tokenizer to encode the tasks, and this run's data is bare token "
                            "ids (no tokenizer.json): train on text data, or unset eval_tasks")
        tok = load_tokenizer(data.tokenizer_path)
        jobs = [_job(spec, model, tok, cfg) for spec in specs]
        return cls(model, jobs, rt.autocast)

    def run(self) -> dict[str, float]:
        out: dict[str, float] = {}
        with self.autocast():
            for name, job in self.jobs:
                for r in job():
                    out[f"task_{name}_{r.metric}"] = r.value
        return out


def _job(spec: str, model: Any, tok: Tokenizer, cfg: Config) -> tuple[str, Callable[[], list[Result]]]:
    """One task: its log name and how to score it (built here: a bad file fails now)."""
    limit, bs = cfg.training.eval_task_limit, cfg.training.batch_size
    low = spec.lower()
    if low.startswith("bpb:"):
        path = spec[4:]
        texts = read_texts(path)[:limit]
        return _key(Path(path).stem or path), lambda: [bits_per_byte(model, tok, texts, path, None, bs)]
    if low == "humaneval":
        raise UserError("eval_tasks = humaneval: generation with a sandbox is too slow inside training; run "
                        "nanochat-train eval --checkpoint RUN --tasks humaneval on a checkpoint")
    task: ChoiceTask
    if low.endswith((".yaml", ".yml")):
        task = read_task_yaml(spec, limit)
    elif low.endswith((".jsonl", ".json")):
        task = read_jsonl(spec, limit)
    elif spec in BUILTIN_TASKS:
        task = builtin_task(spec, limit, _TrainingModel(tok, cfg, {"config": cfg.to_dict()}))
    else:
        raise UserError(f"eval_tasks: {spec!r} is not a .jsonl / .yaml task file, bpb:PATH or a built-in task "
                        f"({', '.join(BUILTIN_TASKS)})")
    return _key(task.name), lambda: score_choice_task(model, tok, task, bs)
