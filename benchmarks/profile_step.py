"""Where one training step's GPU time goes: torch.profiler over the trainer's own step.

Builds the trainer for a preset on random tokens (as ``nanochat-train memory`` does), runs
``--warmup`` steps (compiling included), then profiles ``--steps`` steps and prints the kernels and
operators by GPU time, plus the share of the wall time the GPU was busy. For finding the gap to
the peer in ``throughput.py --device cuda``; it measures nothing that a report quotes as a target.

    python benchmarks/profile_step.py --model nano-125m --set batch_size=32 --set seq_len=1024
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import kit  # benchmarks/kit.py: provenance
import torch
from torch.profiler import ProfilerActivity, profile

from nanochat_ternary.config import build_config
from nanochat_ternary.train.memory import random_token_trainer
from nanochat_ternary.train.runtime import setup_runtime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="nano-125m")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--trace", default="", help="write a Chrome trace here")
    args = ap.parse_args()
    cfg = build_config(args.model, overrides=["device=cuda", "warmup_steps=0", *args.set])
    rt = setup_runtime("cuda")
    kit.header("profile_step", model=args.model, sets=" ".join(args.set), warmup=args.warmup, steps=args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        tr = random_token_trainer(cfg, rt, Path(tmp), args.warmup + args.steps + 1)
        for s in range(args.warmup):
            tr.train_step(s)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for s in range(args.warmup, args.warmup + args.steps):
                tr.train_step(s)
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        tr.close()
    events = prof.key_averages()
    gpu_total = sum(e.self_device_time_total for e in events) / 1e3  # ms, kernels and memcpys
    print(f"{args.model} {' '.join(args.set)}: {args.steps} steps, wall {wall * 1e3 / args.steps:.1f} ms/step "
          f"(profiler on), GPU busy {gpu_total / args.steps:.1f} ms/step")
    print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=70))
    for name in ("Optimizer.step#Muon.step", "Optimizer.step#AdamW.step", "ChunkedLinearCE", "_BitLinearFn",
                 "CompiledFunction", "CompiledFunctionBackward", "aten::_foreach_norm"):
        hits = [e for e in events if e.key.startswith(name)]
        if hits:
            e = hits[0]
            print(f"  {e.key:<40} cpu total {e.cpu_time_total / 1e3 / args.steps:8.2f} ms/step  "
                  f"device total {e.device_time_total / 1e3 / args.steps:8.2f} ms/step  calls {e.count}")
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
