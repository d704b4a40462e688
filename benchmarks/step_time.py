"""Step time of config options side by side, interleaved A/B rounds in one process.

Option groups: ``low_memory`` (issue #10, docs/low_memory.md), ``act_quant`` (BitLinear's
activation formats, docs/roadmap.md), ``adamw_state`` (AdamW's moments).

Every option gets its own Trainer on the same model, data and seed; the rounds alternate the
options so that a change of machine load hits all of them alike. Reported: the median seconds per
optimizer step of each option over all rounds (the first step of each Trainer, which allocates the
optimizer state, is excluded) and its ratio to the baseline.

    python benchmarks/step_time.py                       # low_memory options, d20 on 4 x 128 tokens
    python benchmarks/step_time.py --group act_quant --batch-size 8 --seq-len 256
    python benchmarks/step_time.py --config nano-125m --batch-size 2 --seq-len 256
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import kit  # benchmarks/kit.py: provenance, interleaved timing
import torch

from nanochat_ternary.config import build_config
from nanochat_ternary.train.runtime import setup_runtime
from nanochat_ternary.train.trainer import Trainer

GROUPS: dict[str, dict[str, list[str]]] = {
    "low_memory": {
        "baseline": [],
        "in-backward": ["optimizer_in_backward=true"],
        "bf16-latents-sr": ["latent_dtype=bfloat16"],
        "adamw-8bit": ["use_8bit_adamw=true"],
        "all": ["optimizer_in_backward=true", "latent_dtype=bfloat16", "use_8bit_adamw=true"],
    },
    "act_quant": {
        "baseline": [],  # int8
        "int4": ["act_quant=int4"],
        "fp4": ["act_quant=fp4"],
        "a4.8": ["act_quant=a4.8"],
    },
    "adamw_state": {
        "baseline": [],  # fp32
        "8bit": ["adamw_state=8bit"],
        "foam": ["adamw_state=foam"],
    },
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="d20")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per option per round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--group", default="low_memory", choices=sorted(GROUPS))
    args = ap.parse_args()
    options = GROUPS[args.group]
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="lowmem-time-"))
    trainers = {}
    for name, sets in options.items():
        cfg = build_config(args.config, None, None, sets + [
            "dataset=synthetic", "n_samples=400", f"batch_size={args.batch_size}", f"seq_len={args.seq_len}",
            "sample_tokens=0", "device=cpu", f"checkpoint_dir={tmp / name}", "warmup_steps=0"])
        trainers[name] = Trainer(cfg, setup_runtime("cpu", args.threads), echo=lambda _m: None)
        trainers[name].train_step(0)  # allocates the optimizer state: not timed
    kit.header("step_time", config=args.config, batch=f"{args.batch_size}x{args.seq_len}", group=args.group,
               rounds=args.rounds, steps_per_round=args.steps)
    counter = {name: 1 for name in trainers}

    def steps(name: str) -> None:
        for _ in range(args.steps):
            trainers[name].train_step(counter[name])  # returns Python numbers: the step's work is done
            counter[name] += 1

    timings = kit.interleaved({name: (lambda n=name: steps(n)) for name in trainers}, reps=args.rounds, warmup=0)
    kit.print_ratios(timings, "baseline", unit=f"s/{args.steps} steps")

if __name__ == "__main__":
    main()
