"""Run a ``.gguf`` export: ``generate --checkpoint model.gguf``.

(Packed files run on our own GPT through ``checkpoint.open_checkpoint``, like checkpoints.) GGUF files
run on llama.cpp through :mod:`..checkpoint.llamacpp` (the ``llamacpp`` extra), so a user can try the
exported model without learning another CLI. Sampling means what it means for a checkpoint
(temperature, top-k, top-p as in :func:`~..generate.sample_next`), drawn from llama.cpp's seeded RNG.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..checkpoint.llamacpp import LlamaCpp, open_gguf
from ..errors import UserError
from ..generate import stream_text

__all__ = ["LlamaCpp", "generate_gguf", "open_gguf"]


def generate_gguf(args: argparse.Namespace, path: Path) -> int:
    """``generate`` for a ``.gguf`` file, on llama.cpp (CPU; ``--device`` other than auto/cpu is refused)."""
    if args.device not in ("auto", "cpu"):
        raise UserError(f"--device {args.device}: a .gguf runs on llama.cpp's CPU backend here; use --device cpu")
    llm = open_gguf(path, threads=getattr(args, "threads", 0) or 0)
    ids = llm.tokenize(args.prompt) if args.prompt else [llm.eos]  # no prompt: start a document, as ours
    ids = ids[-(llm.n_ctx - 1):]  # as ours: a prompt longer than the context keeps its end
    tokens = llm.generate(ids, args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed, stop=[llm.eos])
    sys.stdout.write(args.prompt)
    stream_text(tokens, llm.detokenize)
    sys.stdout.write("\n")
    return 0
