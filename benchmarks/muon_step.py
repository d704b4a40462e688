"""Time one Muon step on CPU: the nano-125m matrix set, and one 1024x1024 matrix vs torch.optim.Muon.

    python benchmarks/muon_step.py [--threads 2] [--reps 3] [--torch-muon] [--tall-form]

``--torch-muon`` also times PyTorch's own Muon (bf16 Newton–Schulz: ~22 s per step on 2 CPU cores).
``--tall-form`` times the nano-125m step against the same step with the tall matrices orthogonalised
the earlier way (transposed to wide, iterated, transposed back: a strided view for the update to
read), interleaved step by step; it prints the ratio of the medians.
"""

from __future__ import annotations

import argparse

import kit  # benchmarks/kit.py: provenance, interleaved timing
import torch
from torch import nn

import nanochat_ternary.optim.muon as muon_mod
from nanochat_ternary.optim import Muon


def time_steps(opt: torch.optim.Optimizer, reps: int) -> list[float]:
    """Seconds of each of ``reps`` steps (no warm-up: the caller decides)."""
    return kit.interleaved({"step": opt.step}, reps=reps, warmup=0)["step"].samples


def params_with_grads(shapes: list[tuple[int, int]]) -> list[nn.Parameter]:
    ps = [nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    for p in ps:
        p.grad = torch.randn_like(p)
    return ps


def transposed_ns(G: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Newton–Schulz as it was up to commit 0d61b79: a tall ``G`` is transposed to wide, iterated
    with the same BLAS calls, and returned as a transposed view."""
    a, b, c = muon_mod.NS_COEFFICIENTS
    X = G.to(dtype or muon_mod.default_ns_dtype(G.device))
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + muon_mod.NS_EPS)
    mm, addmm = (torch.bmm, torch.baddbmm) if X.ndim == 3 else (torch.mm, torch.addmm)
    for _ in range(steps):
        A = mm(X, X.mT)
        B = addmm(A, A, A, beta=b, alpha=c)
        X = addmm(X, B, X, beta=a)
    return (X.mT if transposed else X).to(G.dtype)


def compare_tall_form(shapes: list[tuple[int, int]], reps: int) -> None:
    real = muon_mod.zeropower_via_newtonschulz5
    opts = {"right-multiplied (ours)": Muon(params_with_grads(shapes)),
            "transposed (before)": Muon(params_with_grads(shapes))}

    def step(name: str) -> None:
        muon_mod.zeropower_via_newtonschulz5 = real if name.startswith("right") else transposed_ns
        try:
            opts[name].step()
        finally:
            muon_mod.zeropower_via_newtonschulz5 = real

    timings = kit.interleaved({name: (lambda n=name: step(n)) for name in opts}, reps=reps, warmup=1)
    med = {k: t.median for k, t in timings.items()}
    for k, v in med.items():
        print(f"  {k:<24} median {v:.3f} s/step  (all: {', '.join(f'{t:.3f}' for t in timings[k].samples)})")
    print(f"  transposed / right-multiplied: {med['transposed (before)'] / med['right-multiplied (ours)']:.3f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--torch-muon", action="store_true")
    ap.add_argument("--tall-form", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kit.header("muon_step", reps=args.reps, torch_muon=args.torch_muon, tall_form=args.tall_form)

    shapes = [(768, 768)] * 4 + [(2176, 768)] * 2 + [(768, 2176)]
    ps = params_with_grads(shapes * 12)
    opt = Muon(ps)
    opt.step()  # state allocation, warm-up
    ts = time_steps(opt, args.reps)
    n = sum(p.numel() for p in ps)
    print(f"nano-125m matrices ({n / 1e6:.1f}M params, fp32 NS): min {min(ts):.2f} s/step, "
          f"mean {sum(ts) / len(ts):.2f}")

    if args.tall_form:
        print(f"nano-125m matrices, Newton–Schulz of the tall ones, {args.reps} interleaved steps each:")
        compare_tall_form(shapes * 12, args.reps)

    ts = time_steps(Muon(params_with_grads([(1024, 1024)])), args.reps + 2)
    print(f"1024x1024, ours (fp32 NS): min {min(ts):.3f} s/step")
    if args.torch_muon and hasattr(torch.optim, "Muon"):
        ts = time_steps(torch.optim.Muon(params_with_grads([(1024, 1024)]), lr=0.02), 1)
        print(f"1024x1024, torch.optim.Muon (bf16 NS): {ts[0]:.2f} s/step")


if __name__ == "__main__":
    main()
