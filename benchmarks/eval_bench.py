"""Eval throughput against the model's plain forward on the same batch shape (issue target: >= 0.8x).

Side by side, interleaved in each round (so a change of machine load hits both alike), on one
model (default: tiny-cpu, ternary, random weights; weights do not change the cost):

* **plain**: ``model(x)`` on ``[B, T]`` token ids — all ``T`` positions' logits, nothing else;
* **eval, all scored**: ``score_requests`` on ``B`` requests of ``T + 1`` tokens scoring ``T`` each
  (bits per byte with ``stride = context``): batching, padding, gathering, float64 log-softmax;
* **eval, multiple choice**: the same shape scoring the last ``--choice-tokens`` of each (a
  multiple-choice continuation after a long context).

Tokens/s counts the ``B * T`` input positions in every case. Median over ``--rounds``.

    python benchmarks/eval_bench.py --threads 1            # tiny-cpu, B=16, T=256
"""

from __future__ import annotations

import argparse

import kit  # benchmarks/kit.py: provenance, interleaved timing
import torch

from nanochat_ternary.config import build_config
from nanochat_ternary.eval.score import Request, score_requests
from nanochat_ternary.model.gpt import GPT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="tiny-cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=0, help="T (default: the model's max_seq_len)")
    ap.add_argument("--choice-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = build_config(args.config)
    torch.manual_seed(0)
    model = GPT(cfg.model).eval()
    B, T = args.batch_size, args.seq_len or cfg.model.max_seq_len
    ids = torch.randint(0, cfg.model.vocab_size, (B, T + 1))
    rows = ids.tolist()
    cases = {
        "plain forward": lambda: model(ids[:, :-1]),
        "eval, all scored": lambda: list(score_requests(model, [Request(r, T) for r in rows], batch_size=B)),
        f"eval, last {args.choice_tokens} scored": lambda: list(
            score_requests(model, [Request(r, args.choice_tokens) for r in rows], batch_size=B)),
    }
    with torch.inference_mode():
        times = kit.interleaved(cases, reps=args.rounds, warmup=1)
    base = times["plain forward"].median
    kit.header("eval_bench", config=args.config, batch=f"{B}x{T}", choice_tokens=args.choice_tokens,
               rounds=args.rounds)
    print(f"model {args.config} ({cfg.model.quantization}), batch {B} x {T} tokens, median of {args.rounds} rounds")
    print(f"{'case':<24} {'s/batch':>8} {'tok/s':>9} {'vs plain':>9} {'spread':>7}")
    for name, t in times.items():
        med = t.median
        print(f"{name:<24} {med:8.3f} {B * T / med:9.0f} {base / med:8.2f}x {t.spread:>6.0%}")


if __name__ == "__main__":
    main()
