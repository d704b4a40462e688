"""Format following before and after chat fine-tuning, on the default set's held-out conversations.

Fine-tunes ``--init-from`` with ``nanochat-train sft`` (the embedded default set, ``--steps``), then
replies greedily to every held-out conversation (cut before its last assistant turn) with the base
model (its vocab resized as sft does: step 0 of the fine-tune) and with the fine-tuned one, and
reports how many replies answer and end their turn with ``<|end|>``, and how many are exact.

    python benchmarks/sft_format.py --init-from runs/BASE [--steps 200] [--batch-size 8] [--seq-len 64]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import kit  # noqa: E402  (benchmarks/kit.py: provenance)

from nanochat_ternary.chat.format_eval import format_following  # noqa: E402
from nanochat_ternary.chat.sft_data import default_conversations  # noqa: E402
from nanochat_ternary.checkpoint import open_checkpoint  # noqa: E402
from nanochat_ternary.cli import main as cli  # noqa: E402
from nanochat_ternary.data.chat_template import ChatTemplate  # noqa: E402
from nanochat_ternary.model.gpt import GPT  # noqa: E402
from nanochat_ternary.train.warm_start import WarmStart  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init-from", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    kit.header("sft_format", base=a.init_from, sft_steps=f"{a.steps} of {a.batch_size}x{a.seq_len}",
               max_tokens=a.max_tokens, decoding="greedy")
    with tempfile.TemporaryDirectory() as tmp:
        rc = cli(["sft", "--init-from", a.init_from, "--total-steps", str(a.steps), "--batch-size", str(a.batch_size),
                  "--seq-len", str(a.seq_len), "--device", "cpu", "--threads", str(a.threads), "--eval-interval", "0",
                  "--checkpoint-dir", f"{tmp}/sft"])
        assert rc == 0
        ft = open_checkpoint(f"{tmp}/sft")
    t = ChatTemplate(ft.require_tokenizer())
    base = GPT(copy.deepcopy(ft.config.model))
    WarmStart.open(a.init_from).load_weights(base, new_rows_from=t.tok.vocab_size - 4)
    _, val = default_conversations(seed=0)
    for name, model in (("base", base.eval()), ("fine-tuned", ft.model)):
        print(f"{name:>10}: {format_following(model, t, val, max_tokens=a.max_tokens).line()}")


if __name__ == "__main__":
    main()
