"""The BitLinear forward product alone, interleaved in one run: fake-quant fp32 and bf16 GEMMs vs
the exact grouped int8 forward (model/int8_linear.py), its exact float fallback, and a single int8
GEMM with one scale per output row (the per-row variant: what the grouped one would cost without
group scales inside the reduction; a different quantizer, whose quality is not measured here).

    python benchmarks/int8_kernels.py --threads 1                 # 2048 x 768 -> 2176 (nano-125m's w1)
    python benchmarks/int8_kernels.py --n 1 --layers 24           # batch-1 decode, weights cold in cache

``--layers L`` cycles through L distinct weight matrices per timing so that, for large L, weights
come from memory (decode) rather than cache; each figure is the best of ``--reps`` per matrix.
"""

from __future__ import annotations

import argparse

import kit  # benchmarks/kit.py: provenance, interleaved timing
import torch
import torch.nn.functional as F

from nanochat_ternary.model import int8_linear as i8
from nanochat_ternary.model.bitlinear import _fake_quant_act, _fake_quant_weight


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048, help="tokens")
    ap.add_argument("--k", type=int, default=768)
    ap.add_argument("--m", type=int, default=2176)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    N, K, M, gs, L = args.n, args.k, args.m, args.group_size, args.layers
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, K, generator=g)
    ws = [torch.randn(M, K, generator=g) * 0.02 for _ in range(L)]
    wq = [_fake_quant_weight(w, gs) for w in ws]  # cached fake-quant weights (fp32)
    wq16 = [w.bfloat16() for w in wq]
    packs = [i8.pack_ternary(w, gs, "int8", None) for w in ws] if i8.cpu_has_int8_dot() else []
    fpacks = [i8.pack_ternary(w, gs, "float", None) for w in ws]
    rows = [p.codes.reshape(K, M) for p in packs]  # [K, M] int8 for the single GEMM
    row_scale = [p.scales.mean(0) for p in packs]  # one scale per output row (stand-in values)

    def fq32(i):
        return F.linear(_fake_quant_act(x), wq[i])

    def fq16(i):
        return F.linear(_fake_quant_act(x).bfloat16(), wq16[i])

    def int8_grouped(i):
        q, c = i8.quantize_act_codes(x, torch.int8)
        return i8.int8_matmul(q, c, packs[i])

    def float_grouped(i):
        q, c = i8.quantize_act_codes(x, torch.float32)
        return i8.int8_matmul(q, c, fpacks[i])

    def int8_per_row(i):
        q, c = i8.quantize_act_codes(x, torch.int8)
        return torch._int_mm(q, rows[i]).float().mul_(row_scale[i]).mul_(c)

    sides = {"fake-quant fp32": fq32, "fake-quant bf16": fq16, "float exact (fallback)": float_grouped}
    if packs:
        sides |= {"int8 grouped (exact)": int8_grouped, "int8 per-row scale (1 GEMM)": int8_per_row}
    # interleaved: every side once per repetition, each call cycling through the L matrices
    timings = kit.interleaved({k: (lambda f=f: [f(i) for i in range(L)]) for k, f in sides.items()},
                              reps=args.reps, warmup=0)
    best = {k: t.best / L for k, t in timings.items()}
    kit.header("int8_kernels", x=f"[{N}, {K}] -> [{N}, {M}]", group=gs, layers=L, reps=args.reps,
               int8_dot_products=i8.cpu_has_int8_dot())
    print(f"# x [{N}, {K}] -> [{N}, {M}], group {gs}, {L} weight matrices cycled, best of {args.reps} per matrix")
    base = best["fake-quant fp32"]
    for k, t in best.items():
        print(f"  {k:<30} {t * 1e3:9.3f} ms  {base / t:6.2f}x fake-quant fp32")


if __name__ == "__main__":
    main()
