"""Run a ``.gguf`` export: ``generate --checkpoint model.gguf``.

(Packed files run on our own GPT through ``checkpoint.open_checkpoint``, like checkpoints.) GGUF files run on
llama.cpp through ``llama-cpp-python`` (an optional extra), so a user can try the exported model
without learning another CLI.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..generate import stream_text


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise UserError("running a .gguf needs llama-cpp-python: pip install 'nanochat-ternary[llamacpp]' "
                        "(it builds llama.cpp from source, ~17 min on 2 cores)") from None
    return llama_cpp


def open_gguf(path: str | Path, n_ctx: int = 0, threads: int = 0, logits_all: bool = False):
    """A ``llama_cpp.Llama`` for ``path`` (quiet; ``n_ctx`` 0: the model's context length)."""
    llama_cpp = _llama_cpp()
    kw = {"n_threads": threads} if threads > 0 else {}
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False, **kw)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"llama.cpp cannot load {path}: {str(e).splitlines()[0] if str(e) else e}") from None


def llamacpp_logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's fp32 logits ``[len(ids), vocab]`` for a fresh context fed ``ids``."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def generate_gguf(args: argparse.Namespace, path: Path) -> int:
    """``generate`` for a ``.gguf`` file, on llama.cpp (CPU; ``--device`` other than auto/cpu is refused)."""
    if args.device not in ("auto", "cpu"):
        raise UserError(f"--device {args.device}: a .gguf runs on llama.cpp's CPU backend here; use --device cpu")
    return _generate_gguf(args, path)


def _generate_gguf(args: argparse.Namespace, path: Path) -> int:
    llm = open_gguf(path, threads=getattr(args, "threads", 0) or 0)
    eot = llm.token_eos()
    ids = llm.tokenize(args.prompt.encode(), add_bos=False, special=False) if args.prompt else [eot]
    budget = max(0, min(args.max_tokens, llm.n_ctx() - len(ids)))

    def tokens() -> Iterator[int]:
        for i, t in enumerate(llm.generate(ids, top_k=args.top_k, top_p=args.top_p, temp=args.temperature,
                                           min_p=0.0, reset=True)):
            if i >= budget or t == eot:
                return
            yield int(t)

    llm.set_seed(args.seed)
    sys.stdout.write(args.prompt)
    stream_text(tokens(), lambda out: llm.detokenize(out).decode("utf-8", errors="replace"))
    sys.stdout.write("\n")
    return 0
