"""Time one Muon step on CPU: the nano-125m matrix set, and one 1024x1024 matrix vs torch.optim.Muon.

    python benchmarks/muon_step.py [--threads 2] [--reps 3] [--torch-muon]

``--torch-muon`` also times PyTorch's own Muon (bf16 Newton–Schulz: ~22 s per step on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from nanochat_ternary.optim import Muon
from nanochat_ternary.provenance import describe


def time_steps(opt: torch.optim.Optimizer, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        opt.step()
        out.append(time.perf_counter() - t)
    return out


def params_with_grads(shapes: list[tuple[int, int]]) -> list[nn.Parameter]:
    ps = [nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    for p in ps:
        p.grad = torch.randn_like(p)
    return ps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--torch-muon", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# muon_step: {describe()}; torch {torch.__version__}, {args.threads} threads on the CPU, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")

    shapes = [(768, 768)] * 4 + [(2176, 768)] * 2 + [(768, 2176)]
    ps = params_with_grads(shapes * 12)
    opt = Muon(ps)
    opt.step()  # state allocation, warm-up
    ts = time_steps(opt, args.reps)
    n = sum(p.numel() for p in ps)
    print(f"nano-125m matrices ({n / 1e6:.1f}M params, fp32 NS): min {min(ts):.2f} s/step, "
          f"mean {sum(ts) / len(ts):.2f}")

    ts = time_steps(Muon(params_with_grads([(1024, 1024)])), args.reps + 2)
    print(f"1024x1024, ours (fp32 NS): min {min(ts):.3f} s/step")
    if args.torch_muon and hasattr(torch.optim, "Muon"):
        ts = time_steps(torch.optim.Muon(params_with_grads([(1024, 1024)]), lr=0.02), 1)
        print(f"1024x1024, torch.optim.Muon (bf16 NS): {ts[0]:.2f} s/step")


if __name__ == "__main__":
    main()
