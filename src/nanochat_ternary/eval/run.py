"""``nanochat-train eval``: open a model once, score each ``--text`` and ``--tasks``, print a table,
write JSON with provenance. Ctrl-C prints what was scored so far (marked partial) and exits 130."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..provenance import provenance
from .engines import EvalModel, open_eval_model
from .result import Result

INTERRUPTED = 130


@dataclass
class EvalOptions:
    checkpoint: str
    texts: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    json_path: str | None = None
    batch_size: int = 16
    device: str = "auto"
    limit: int | None = None
    stride: int | None = None
    threads: int = 0
    seed: int = 0
    samples: int = 1  # humaneval: completions per problem
    pass_k: list[int] = field(default_factory=lambda: [1])
    max_tokens: int = 256  # humaneval: new tokens per completion
    temperature: float = 0.2
    timeout: float = 10.0  # humaneval: seconds per program
    command: str = ""
    progress: bool = True


@dataclass
class Job:
    """One thing to score. ``run(sink, bar)`` fills ``sink`` per finished item and returns the
    results; ``partial(sink)`` gives the results of what ``sink`` holds after an interrupt."""

    name: str
    run: Callable[[list, Any], list[Result]]
    partial: Callable[[list], list[Result]]


def _check(opts: EvalOptions) -> None:
    if not opts.texts and not opts.tasks:
        raise UserError("eval: nothing to score; give --text PATH and/or --tasks FILE.jsonl|TASK.yaml|NAME")
    if opts.batch_size < 1:
        raise UserError(f"--batch-size {opts.batch_size}: must be >= 1")
    if opts.limit is not None and opts.limit < 1:
        raise UserError(f"--limit {opts.limit}: must be >= 1")
    if opts.stride is not None and opts.stride < 1:
        raise UserError(f"--stride {opts.stride}: must be >= 1")
    if opts.threads < 0:
        raise UserError(f"--threads {opts.threads}: must be >= 0 (0: torch's default)")
    if opts.json_path and Path(opts.json_path).is_dir():
        raise UserError(f"--json {opts.json_path}: is a directory; give a file name")
    if opts.json_path and not Path(opts.json_path).expanduser().resolve().parent.is_dir():
        raise UserError(f"--json {opts.json_path}: its directory does not exist")


def _text_job(opened: EvalModel, spec: str, opts: EvalOptions) -> Job:
    from .bpb import bits_per_byte, bpb_result, read_texts

    tok = opened.require_tokenizer()
    texts = read_texts(spec)[: opts.limit] if opts.limit else read_texts(spec)
    ctx = opened.max_seq_len
    stride = opts.stride or max(1, ctx // 2)
    return Job(f"bpb:{spec}",
               lambda sink, bar: [bits_per_byte(opened.scorer, tok, texts, spec, stride, opts.batch_size, sink, bar)],
               lambda sink: [bpb_result(spec, sink, len(texts), stride, ctx)])


def _task_job(opened: EvalModel, spec: str, opts: EvalOptions) -> Job:
    from .choice import choice_results, read_jsonl, score_choice_task
    from .tasks import BUILTIN_TASKS, builtin_task

    low = spec.lower()
    if low == "humaneval":
        from .humaneval import humaneval_job

        return humaneval_job(opened, opts)
    if low.endswith((".yaml", ".yml")):
        from .taskfile import read_task_yaml

        task = read_task_yaml(spec, opts.limit)
    elif low.endswith((".jsonl", ".json")):
        task = read_jsonl(spec, opts.limit)
    elif spec in BUILTIN_TASKS:
        task = builtin_task(spec, opts.limit, opened)
    else:
        raise UserError(f"--tasks {spec}: not a .jsonl / .yaml task file, 'humaneval' or a built-in task "
                        f"({', '.join(BUILTIN_TASKS)})")
    tok = opened.require_tokenizer()
    return Job(task.name, lambda sink, bar: score_choice_task(opened.scorer, tok, task, opts.batch_size, sink, bar),
               lambda sink: choice_results(task, sink))


def format_table(results: list[Result]) -> str:
    rows = [("task", "metric", "value", "stderr", "n")]
    for r in results:
        se = f"{r.stderr:.4f}" if r.stderr is not None else "-"
        rows.append((r.task, r.metric, f"{r.value:.4f}", se, f"{r.n}{' (partial)' if r.partial else ''}"))
    widths = [max(len(row[c]) for row in rows) for c in range(5)]
    lines = ["  ".join(v.ljust(w) if c < 2 else v.rjust(w) for c, (v, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _notes_line(r: Result) -> str:
    keys = [k for k in ("scored_bytes", "scored_tokens", "context", "stride", "chance", "samples", "sandbox")
            if k in r.notes]
    return f"  {r.task} {r.metric}: " + ", ".join(f"{k} {r.notes[k]}" for k in keys) if keys else ""


def run_eval(opts: EvalOptions) -> int:
    """The eval command; returns its exit status (0, or 130 when interrupted)."""
    import torch
    from tqdm.auto import tqdm

    _check(opts)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    opened = open_eval_model(opts.checkpoint, device=opts.device, threads=opts.threads)
    # build every job first: a bad task file fails before any scoring time is spent
    jobs = [_text_job(opened, s, opts) for s in opts.texts] + [_task_job(opened, s, opts) for s in opts.tasks]
    results: list[Result] = []
    interrupted = False
    t0 = time.time()
    for job in jobs:
        sink: list = []
        with tqdm(total=None, desc=job.name[-40:], unit="req", disable=not opts.progress,
                  file=sys.stderr, leave=False) as bar:
            try:
                results += job.run(sink, bar)
            except KeyboardInterrupt:
                interrupted = True
                if sink:
                    results += job.partial(sink)
        if interrupted:
            break
    elapsed = time.time() - t0
    what = ", ".join(str(v) for v in (f"step {opened.step}" if opened.step is not None else None,
                                         opened.info.get("quantization"), opened.info.get("engine")) if v)
    print(f"model {opened.name} ({what}), {elapsed:.1f}s"
          + (" — interrupted: partial results" if interrupted else ""))
    print(format_table(results) if results else "(nothing scored)")
    for r in results:
        line = _notes_line(r)
        if line:
            print(line)
    if opts.json_path:
        out = {"provenance": provenance(), "command": opts.command, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                          time.gmtime()),
               "model": opened.info, "interrupted": interrupted, "elapsed_s": round(elapsed, 2),
               "results": [r.to_dict() for r in results]}
        Path(opts.json_path).expanduser().write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {opts.json_path}")
    if interrupted:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    return 0
