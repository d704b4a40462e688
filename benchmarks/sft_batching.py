"""SFT batching: conversations packed into fixed-length rows vs one conversation per row, padded.

Both modes train the same model from the same base on the same conversations (the embedded default
set); their optimizer steps are timed interleaved in one process (pack, pad, pack, pad, ...) so
machine load hits both alike, each the real ``Trainer`` step (forward, masked loss, backward,
Muon + AdamW). The figure of merit is assistant tokens (the only tokens with a loss) per second:
a padded row holds one short conversation and many pad positions; a packed row is full.

    python benchmarks/sft_batching.py --init-from runs/BASE [--steps 30] [--batch-size 16] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import kit  # noqa: E402  (benchmarks/kit.py: interleaved timing)

from nanochat_ternary.chat.finetune import conversations, sft_config  # noqa: E402
from nanochat_ternary.checkpoint.files import resolve_checkpoint  # noqa: E402
from nanochat_ternary.train.runtime import setup_runtime  # noqa: E402
from nanochat_ternary.train.sft import SFTTask  # noqa: E402
from nanochat_ternary.train.trainer import Trainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init-from", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    rt = setup_runtime("cpu", a.threads)
    kit.header("sft_batching", batch=f"{a.batch_size}x{a.seq_len}", steps_each=a.steps, base=a.init_from)
    tok = resolve_checkpoint(a.init_from) / "tokenizer.json"
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("pack", "pad"):
            cli = {"init_from": a.init_from, "batch_size": a.batch_size, "seq_len": a.seq_len,
                   "total_steps": a.steps, "device": "cpu", "threads": a.threads, "sample_tokens": 0,
                   "checkpoint_dir": f"{tmp}/{mode}"}
            cfg = sft_config(None, None, cli, [f"sft_batching={mode}"], None)
            train, val, source = conversations(cfg)
            tr = Trainer(cfg, rt, echo=lambda _m: None, task=SFTTask(train, val, source, tok, fresh=True))
            tr.model.train()
            trainers[mode] = tr
        trained: dict[str, int] = {m: 0 for m in trainers}
        positions: dict[str, int] = {m: 0 for m in trainers}
        steps = {m: 0 for m in trainers}

        def one_step(mode: str) -> float:
            """The trainer's step, timed; the batch's counts read before it, untimed."""
            tr, step = trainers[mode], steps[mode]
            x, y = tr.batches.get(step)
            trained[mode] += int((y >= 0).sum())
            positions[mode] += y.numel()
            t0 = time.perf_counter()
            tr.train_step(step)
            steps[mode] += 1
            return time.perf_counter() - t0

        # pack, pad, pack, pad, ...: the first step of each warms up (counted, not timed)
        times = kit.interleaved({m: (lambda m=m: one_step(m)) for m in trainers}, reps=a.steps - 1, warmup=1,
                                self_timed=True)
        for tr in trainers.values():
            tr.close()
    print("| batching | median s/step | positions/step | assistant tokens/step | assistant tokens/s |")
    print("|---|---|---|---|---|")
    rate = {}
    for mode in trainers:
        med = times[mode].median
        per = trained[mode] / a.steps
        rate[mode] = per / med
        print(f"| {mode} | {med:.3f} | {positions[mode] / a.steps:.0f} | {per:.0f} | {rate[mode]:.0f} |")
    print(f"pack / pad assistant tokens per second: {rate['pack'] / rate['pad']:.2f}x")


if __name__ == "__main__":
    main()
