"""Training throughput: our ternary GPT + Muon vs a plain-PyTorch fp32 GPT + AdamW, same shape.

Both models run in the same process on the CPU (this script builds everything on the CPU device;
it measures no GPU), interleaved step by step (A, B, A, B, ...) so that machine noise hits both
alike; the reported figure is the ratio of median step times. MFU is a derived figure, not a
measurement: tok/s (measured) x FLOP/token from the 6N + 6LDT formula / this machine's fp32 matmul
peak (measured at start with a large square ``torch.mm``). The first line records the code's
provenance (package version, git commit, dirty flag); ``--json`` includes it.

Target (issue #2): ours >= 0.85x the reference's tok/s at >= 8K tokens per optimizer step.

    python benchmarks/throughput.py                       # d20 and nano-125m shapes, 8K tokens/step
    python benchmarks/throughput.py --models d20 --tokens-per-step 16384 --steps 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat_ternary.config import build_config
from nanochat_ternary.model.gpt import GPT
from nanochat_ternary.optim.factory import build_optimizers
from nanochat_ternary.provenance import describe, provenance


# ---------------------------------------------------------------------------------------------
# The reference: a plain fp32 GPT of the same shape, written here independently of the package.
class RefBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, hidden: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = n_heads, n_kv_heads, dim // n_heads
        self.norm1 = nn.RMSNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, n_kv_heads * self.hd, bias=False)
        self.v = nn.Linear(dim, n_kv_heads * self.hd, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.norm2 = nn.RMSNorm(dim)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        h = self.norm1(x)
        q = self.q(h).view(B, T, self.n_heads, self.hd).transpose(1, 2)
        k = self.k(h).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = self.v(h).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, D))
        h = self.norm2(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class RefGPT(nn.Module):
    def __init__(self, dim, n_layers, n_heads, n_kv_heads, hidden, vocab, max_seq, tied) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(RefBlock(dim, n_heads, n_kv_heads, hidden) for _ in range(n_layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight
        hd = dim // n_heads
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(max_seq).float(), inv)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.emb(idx)
        cos, sin = self.cos[:T], self.sin[:T]
        for b in self.blocks:
            x = b(x, cos, sin)
        logits = self.head(self.norm(x)).float()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


# ---------------------------------------------------------------------------------------------
def measure_matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """fp32 GFLOP/s of a large square matmul on this machine (best of ``reps``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def flops_per_token(n_matmul_params: int, n_layers: int, dim: int, seq: int) -> float:
    """6N for the weight matmuls (fwd + bwd) plus causal attention scores and mixing (~6 L D T)."""
    return 6 * n_matmul_params + 6 * n_layers * dim * seq


def make_step(model: nn.Module, optimizers: list, accum: int, batches: list, clip: float = 1.0):
    """One optimizer step as the trainer does it: forward/backward per micro-batch, clip, step."""
    ours = isinstance(model, GPT)
    opt_times: list[float] = []

    def step() -> float:
        t0 = time.perf_counter()
        for x, y in batches[:accum]:
            loss = model(x, targets=y) if ours else model(x, y)
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        t1 = time.perf_counter()
        for opt in optimizers:
            opt.step()
        opt_times.append(time.perf_counter() - t1)
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step.opt_times = opt_times  # type: ignore[attr-defined]
    return step


def bench_shape(preset: str, tokens_per_step: int, micro_batch: int, seq: int, steps: int) -> dict:
    cfg = build_config(preset, overrides=[f"seq_len={seq}", f"batch_size={micro_batch}"])
    m = cfg.model
    accum = max(1, tokens_per_step // (micro_batch * seq))
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, m.vocab_size, (micro_batch, seq), generator=gen),
                torch.randint(0, m.vocab_size, (micro_batch, seq), generator=gen)) for _ in range(accum)]

    torch.manual_seed(0)
    ours = GPT(m)
    ours_opts = build_optimizers(ours, cfg.training, torch.device("cpu"))
    ref = RefGPT(m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.hidden_dim, m.vocab_size, m.max_seq_len,
                 m.weight_tied)
    ref_opts = [torch.optim.AdamW(ref.parameters(), lr=1e-3)]
    run_ours = make_step(ours, ours_opts, accum, batches)
    run_ref = make_step(ref, ref_opts, accum, batches)

    run_ours(), run_ref()  # warm-up (allocations, optimizer state creation)
    t_ours, t_ref = [], []
    for _ in range(steps):
        t_ours.append(run_ours())
        t_ref.append(run_ref())
    tokens = accum * micro_batch * seq
    n_matmul = ours.num_params(non_embedding=True) + m.vocab_size * m.dim  # blocks + LM head
    return {
        "preset": preset,
        "tokens_per_step": tokens,
        "micro_batch": micro_batch,
        "seq_len": seq,
        "grad_accum": accum,
        "ours_step_s": statistics.median(t_ours),
        "ref_step_s": statistics.median(t_ref),
        "ours_tok_s": tokens / statistics.median(t_ours),
        "ref_tok_s": tokens / statistics.median(t_ref),
        "ratio": statistics.median(t_ref) / statistics.median(t_ours),
        "ours_opt_step_s": statistics.median(run_ours.opt_times[1:]),  # Muon (Newton-Schulz) + AdamW
        "ref_opt_step_s": statistics.median(run_ref.opt_times[1:]),
        "flops_per_token": flops_per_token(n_matmul, m.n_layers, m.dim, seq),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="d20,nano-125m")
    ap.add_argument("--tokens-per-step", type=int, default=8192)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per model (after one warm-up)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prov = provenance()
    print(f"# code: {describe(prov)}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    peak = measure_matmul_peak()
    load = ", load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}{load}; fp32 matmul peak "
          f"{peak:.1f} GFLOP/s (MFU = measured tok/s x formula FLOP/token / this peak)")
    print(f"{'shape':<10} {'tok/step':>8} {'ours tok/s':>11} {'ref tok/s':>10} {'ratio':>6} "
          f"{'ours MFU':>8} {'ref MFU':>8} {'ours opt s':>10} {'ref opt s':>9}  target >= 0.85")
    results = []
    for preset in args.models.split(","):
        r = bench_shape(preset.strip(), args.tokens_per_step, args.micro_batch, args.seq_len, args.steps)
        r["ours_mfu"] = r["ours_tok_s"] * r["flops_per_token"] / (peak * 1e9)
        r["ref_mfu"] = r["ref_tok_s"] * r["flops_per_token"] / (peak * 1e9)
        r["peak_gflops"] = peak
        results.append(r)
        print(f"{r['preset']:<10} {r['tokens_per_step']:>8} {r['ours_tok_s']:>11.1f} {r['ref_tok_s']:>10.1f} "
              f"{r['ratio']:>6.3f} {r['ours_mfu']:>8.1%} {r['ref_mfu']:>8.1%} {r['ours_opt_step_s']:>10.2f} "
              f"{r['ref_opt_step_s']:>9.2f}  "
              f"{'PASS' if r['ratio'] >= 0.85 else 'MISS'}")
    if args.json:
        print(json.dumps({"provenance": prov, "results": results}, indent=2))


if __name__ == "__main__":
    main()
