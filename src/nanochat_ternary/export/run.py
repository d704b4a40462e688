"""Run an exported model: ``generate --checkpoint model.safetensors`` (packed) or ``model.gguf``.

Packed files run on our own GPT (same code, same tokens as the checkpoint). GGUF files run on
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


def _stream(tokens: Iterator[int], decode, prompt: str) -> None:
    """Print the prompt, then the decoded continuation as whole UTF-8 characters arrive."""
    sys.stdout.write(prompt)
    sys.stdout.flush()
    out: list[int] = []
    printed = 0
    for tid in tokens:
        out.append(tid)
        text = decode(out)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
    sys.stdout.write(decode(out)[printed:] + "\n")


def generate_from_file(args: argparse.Namespace) -> int:
    """``generate`` for an exported file (flags as for a checkpoint)."""
    path = Path(args.checkpoint)
    if path.suffix == ".gguf":
        return _generate_gguf(args, path)
    from .packed import is_packed, load_packed

    if not is_packed(path):
        raise UserError(f"--checkpoint {path}: a file, but neither a packed export (.safetensors) nor a .gguf")
    import torch

    from ..data.tokenizer import Tokenizer
    from ..generate import generate

    pm = load_packed(path)
    if pm.tokenizer_json is None:
        raise UserError(f"{path} has no tokenizer (its checkpoint was trained on token ids without one)")
    from tokenizers import Tokenizer as HFTokenizer

    tok = Tokenizer(HFTokenizer.from_str(pm.tokenizer_json))
    ids = tok.encode(args.prompt) if args.prompt else [tok.eot_id]  # empty prompt: start a document
    with torch.inference_mode():
        _stream(generate(pm.model, ids, max_tokens=args.max_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed), tok.decode, args.prompt)
    return 0


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
    _stream(tokens(), lambda out: llm.detokenize(out).decode("utf-8", errors="replace"), args.prompt)
    return 0
