"""Training throughput: our ternary GPT + Muon vs a plain-PyTorch GPT + AdamW, same shape.

CPU (default): both models run in the same process on the CPU in fp32, interleaved step by step
(A, B, A, B, ...) so that machine noise hits both alike; the reported figure is the ratio of
median step times. MFU is a derived figure, not a measurement: tok/s (measured) x FLOP/token from
the 6N + 6LDT formula / this machine's fp32 matmul peak (measured at start with a large square
``torch.mm``). The first line records the code's provenance (package version, git commit, dirty
flag); ``--json`` includes it.

Target (issue #2): ours >= 0.85x the reference's tok/s at >= 8K tokens per optimizer step.

CUDA (``--device cuda``, issue #9): ours exactly as ``nanochat-train train`` runs it (the
trainer's own step on random tokens: compile per the config's ``compile`` field, bf16 autocast,
the chunked loss head, Muon + AdamW, clipping, the finite check) against the peer in bf16 autocast
with fused AdamW, eager and under ``torch.compile`` (one model and optimizer, two call paths),
interleaved step by step; optionally ours with ``compile=false`` too. Each side reports the median
step time, tok/s, MFU against the bf16 matmul peak measured at the start of the same run, and its
peak memory: ``max_memory_allocated`` during its step minus what the other sides keep resident
(their weights and optimizer state), i.e. what it would peak at alone.

    python benchmarks/throughput.py                       # d20 and nano-125m shapes, 8K tokens/step
    python benchmarks/throughput.py --models d20 --tokens-per-step 16384 --steps 3
    python benchmarks/throughput.py --device cuda --models d20,nano-125m --tokens-per-step 32768 \
        --micro-batch 32 --seq-len 1024 --steps 10 --warmup 3 --json-out results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import kit  # benchmarks/kit.py: provenance, interleaved timing, peak memory
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat_ternary.config import build_config
from nanochat_ternary.model.gpt import GPT
from nanochat_ternary.optim.factory import build_optimizers


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
    best = kit.interleaved({"mm": lambda: torch.mm(a, b)}, reps=reps, warmup=1)["mm"].best
    return 2 * n**3 / best / 1e9


def flops_per_token(n_matmul_params: int, n_layers: int, dim: int, seq: int) -> float:
    """6N for the weight matmuls (fwd + bwd) plus causal attention scores and mixing (~6 L D T)."""
    return 6 * n_matmul_params + 6 * n_layers * dim * seq


def make_step(model: nn.Module, optimizers: list, accum: int, batches: list, clip: float = 1.0,
              autocast_bf16: bool = False):
    """One optimizer step as the trainer does it: forward/backward per micro-batch, clip, step.
    ``autocast_bf16``: the forward under CPU bf16 autocast (the plain peer's fast CPU mode)."""
    ours = isinstance(model, GPT)
    opt_times: list[float] = []

    def step() -> float:
        t0 = time.perf_counter()
        for x, y in batches[:accum]:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
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


def bench_shape(preset: str, tokens_per_step: int, micro_batch: int, seq: int, steps: int,
                compiled: bool = False, extra_sides: tuple[str, ...] = ()) -> dict:
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

    # more sides (issue #26), interleaved with the two above: ours with the exact int8 forward,
    # and the plain peer at its best on a CPU (bf16 autocast, torch.compile); the peer's sides
    # share one model and optimizer (only their call paths differ)
    extra: dict[str, object] = {}
    for name in extra_sides:
        if name == "ours-int8":
            c8 = build_config(preset, overrides=[f"seq_len={seq}", f"batch_size={micro_batch}", "ternary_matmul=int8"])
            torch.manual_seed(0)
            o8 = GPT(c8.model)
            extra[name] = make_step(o8, build_optimizers(o8, c8.training, torch.device("cpu")), accum, batches)
        elif name == "ref-bf16":
            extra[name] = make_step(ref, ref_opts, accum, batches, autocast_bf16=True)
        elif name in ("ref-compiled", "ref-compiled-bf16"):
            extra[name] = make_step(torch.compile(ref), ref_opts, accum, batches,
                                    autocast_bf16=name.endswith("bf16"))
        else:
            raise SystemExit(f"--cpu-sides: unknown side {name!r} "
                             "(ours-int8, ref-bf16, ref-compiled, ref-compiled-bf16)")
    first_extra = {name: f() for name, f in extra.items()}  # warm-up; compiling included

    run_comp = None
    if compiled:  # ours again, same init, with the blocks under torch.compile (compile = true)
        torch.manual_seed(0)
        ours_c = GPT(m)
        ours_c.compile_blocks()
        run_comp = make_step(ours_c, build_optimizers(ours_c, cfg.training, torch.device("cpu")), accum, batches)
    run_ours(), run_ref()  # warm-up (allocations, optimizer state creation)
    first_compiled = run_comp() if run_comp else None  # compiling included
    # interleaved: ours, [ours compiled], ref, [extra sides], ...; each step times itself (make_step)
    order = {"ours": run_ours, **({"compiled": run_comp} if run_comp else {}), "ref": run_ref, **extra}
    timed = kit.interleaved(order, reps=steps, warmup=0, self_timed=True)  # type: ignore[arg-type]
    t_ours, t_ref = timed["ours"].samples, timed["ref"].samples
    t_comp = timed["compiled"].samples if run_comp else []
    t_extra = {name: timed[name].samples for name in extra}
    tokens = accum * micro_batch * seq
    sides = {name: {"step_s": statistics.median(v), "tok_s": tokens / statistics.median(v),
                    "vs_ref": statistics.median(t_ref) / statistics.median(v), "first_step_s": first_extra[name]}
             for name, v in t_extra.items()}
    extra = {"sides": sides}
    if run_comp:
        extra |= {"compiled_step_s": statistics.median(t_comp), "compiled_tok_s": tokens / statistics.median(t_comp),
                 "compiled_ratio": statistics.median(t_ref) / statistics.median(t_comp),
                 "compiled_first_step_s": first_compiled}
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
        **extra,
    }


# ---------------------------------------------------------------------------------------------
# CUDA


def measure_bf16_peak(n: int = 8192, reps: int = 10) -> float:
    """bf16 TFLOP/s of a large square matmul on the current GPU (best of ``reps``, CUDA events)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):  # CUDA events, not the host clock: a 1.5 ms kernel would carry the sync's cost
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * n**3 / best / 1e12


class _Side:
    """One contender on the GPU: a step function, its resident bytes, and what its steps measured."""

    def __init__(self, name: str, step, resident: int, first_s: float) -> None:
        self.name, self.step, self.resident, self.first_s = name, step, resident, first_s
        self.times: list[float] = []
        self.peaks: list[int] = []


def bench_shape_cuda(preset: str, tokens_per_step: int, micro_batch: int, seq: int, steps: int, warmup: int,
                     sides: list[str], extra: list[str]) -> dict:
    import tempfile
    from pathlib import Path

    from nanochat_ternary.train.memory import random_token_trainer
    from nanochat_ternary.train.runtime import setup_runtime

    accum = max(1, tokens_per_step // (micro_batch * seq))
    overrides = [f"seq_len={seq}", f"batch_size={micro_batch}", f"grad_accum_steps={accum}", "device=cuda",
                 "warmup_steps=0"] + extra
    cfg = build_config(preset, overrides=overrides)
    m = cfg.model
    rt = setup_runtime("cuda")
    total = warmup + steps + 1
    tmp = tempfile.TemporaryDirectory(prefix="throughput-")
    built: dict[str, _Side] = {}
    trainers = []

    def resident_now() -> int:
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    def add_trainer(name: str, compile_setting: str) -> None:
        c = build_config(preset, overrides=overrides + [f"compile={compile_setting}"])
        before = resident_now()
        torch.manual_seed(0)
        tr = random_token_trainer(c, rt, Path(tmp.name) / name, total)
        trainers.append(tr)
        counter = iter(range(10**9))
        step = lambda: tr.train_step(next(counter))  # noqa: E731 - the trainer's own step
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        for _ in range(warmup - 1):
            step()
        built[name] = _Side(name, step, resident_now() - before, first)

    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, m.vocab_size, (micro_batch, seq), generator=gen).cuda(),
                torch.randint(0, m.vocab_size, (micro_batch, seq), generator=gen).cuda()) for _ in range(accum)]
    if "ours" in sides:
        add_trainer("ours", cfg.training.compile)
    if "ours-eager" in sides:
        add_trainer("ours-eager", "false")
    if "peer-eager" in sides or "peer-compiled" in sides:
        before = resident_now()
        torch.manual_seed(0)
        ref = RefGPT(m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.hidden_dim, m.vocab_size, m.max_seq_len,
                     m.weight_tied).cuda()
        opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, fused=True)
        compiled_ref = torch.compile(ref)

        def peer_step(model) -> None:
            for x, y in batches:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(x, y)
                (loss / accum).backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
            opt.step()
            ref.zero_grad(set_to_none=True)

        peer_names = [n for n in ("peer-eager", "peer-compiled") if n in sides]
        firsts = {}
        for name in peer_names:
            model = ref if name == "peer-eager" else compiled_ref
            t0 = time.perf_counter()
            peer_step(model)
            torch.cuda.synchronize()
            firsts[name] = time.perf_counter() - t0
            for _ in range(warmup - 1):
                peer_step(model)
        res = resident_now() - before
        for name in peer_names:
            model = ref if name == "peer-eager" else compiled_ref
            built[name] = _Side(name, (lambda mm=model: peer_step(mm)), res, firsts[name])
    # resident bytes per owner (the peer's two paths share one model and optimizer)
    owner = {name: ("peer" if name.startswith("peer") else name) for name in built}
    resident = {owner[name]: side.resident for name, side in built.items()}

    def measured(side: _Side) -> None:  # one step; its allocator high-water mark, less the others' resident
        peak = kit.peak_memory(side.step, "cuda", relative=False) or 0
        side.peaks.append(peak - sum(v for k, v in resident.items() if k != owner[side.name]))

    timed = kit.interleaved({name: (lambda s=side: measured(s)) for name, side in built.items()}, reps=steps,
                            warmup=0, sync=torch.cuda.synchronize)  # interleaved: A, B, C, A, B, C, ...
    for name, side in built.items():
        side.times = timed[name].samples
    for tr in trainers:
        tr.close()
    tmp.cleanup()
    n_matmul = GPT(m).num_params(non_embedding=True) + m.vocab_size * m.dim
    tokens = accum * micro_batch * seq
    out = {"preset": preset, "tokens_per_step": tokens, "micro_batch": micro_batch, "seq_len": seq,
           "grad_accum": accum, "flops_per_token": flops_per_token(n_matmul, m.n_layers, m.dim, seq),
           "overrides": extra, "sides": {}}
    for side in built.values():
        med = statistics.median(side.times)
        out["sides"][side.name] = {"step_s": med, "tok_s": tokens / med, "step_s_all": side.times,
                                   "peak_bytes": max(side.peaks), "resident_bytes": side.resident,
                                   "first_step_s": side.first_s}
    return out


def main_cuda(args, prov: dict) -> None:
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    dev = torch.cuda.get_device_name()
    peak = measure_bf16_peak()
    print(f"# CUDA {torch.version.cuda}; bf16 matmul peak "
          f"{peak:.0f} TFLOP/s (8192^3 mm, best of 10; MFU = tok/s x formula FLOP/token / this peak)")
    results = []
    for preset in args.models.split(","):
        r = bench_shape_cuda(preset.strip(), args.tokens_per_step, args.micro_batch, args.seq_len, args.steps,
                             args.warmup, sides, args.set)
        r["peak_tflops"] = peak
        for s in r["sides"].values():
            s["mfu"] = s["tok_s"] * r["flops_per_token"] / (peak * 1e12)
        results.append(r)
        base = r["sides"].get("peer-compiled")
        print(f"\n{r['preset']}: {r['tokens_per_step']} tokens/step = {r['grad_accum']} x {r['micro_batch']} x "
              f"{r['seq_len']}{' ' + ' '.join(r['overrides']) if r['overrides'] else ''}")
        print(f"  {'side':<14} {'tok/s':>10} {'step ms':>8} {'MFU':>6} {'peak GiB':>9} {'first s':>8} "
              f"{'vs peer-compiled':>16}")
        for name, s in r["sides"].items():
            ratio = f"{s['tok_s'] / base['tok_s']:.3f}" if base else "-"
            print(f"  {name:<14} {s['tok_s']:>10.0f} {s['step_s'] * 1e3:>8.1f} {s['mfu']:>6.1%} "
                  f"{s['peak_bytes'] / 2**30:>9.2f} {s['first_step_s']:>8.1f} {ratio:>16}")
        torch.cuda.empty_cache()
    if args.json or args.json_out:
        blob = json.dumps({"provenance": prov, "device": dev, "bf16_peak_tflops": peak, "results": results},
                          indent=2)
        if args.json_out:
            with open(args.json_out, "w") as f:
                f.write(blob)
        if args.json:
            print(blob)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="d20,nano-125m")
    ap.add_argument("--tokens-per-step", type=int, default=8192)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per model (after one warm-up)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--cpu-compiled", action="store_true",
                    help="CPU: also time ours with the blocks under torch.compile (interleaved)")
    ap.add_argument("--cpu-sides", default="",
                    help="CPU: more sides, comma-separated: ours-int8 (ternary_matmul = int8), ref-bf16 (the "
                         "peer under bf16 autocast), ref-compiled, ref-compiled-bf16 (the peer under torch.compile)")
    ap.add_argument("--warmup", type=int, default=3, help="CUDA: untimed steps per side (compiling included)")
    ap.add_argument("--sides", default="ours,peer-eager,peer-compiled",
                    help="CUDA: any of ours, ours-eager, peer-eager, peer-compiled")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="CUDA: config override for ours (repeatable), e.g. --set compile=false")
    ap.add_argument("--json-out", default="", help="write the JSON results to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    head = kit.header("throughput", device=args.device, models=args.models, tokens_per_step=args.tokens_per_step,
                      micro_batch=args.micro_batch, seq_len=args.seq_len, steps=args.steps)
    prov = head["provenance"]
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here")
        main_cuda(args, prov)
        return
    peak = measure_matmul_peak()
    print(f"# fp32 matmul peak {peak:.1f} GFLOP/s (MFU = measured tok/s x formula FLOP/token / this peak)")
    print(f"{'shape':<10} {'tok/step':>8} {'ours tok/s':>11} {'ref tok/s':>10} {'ratio':>6} "
          f"{'ours MFU':>8} {'ref MFU':>8} {'ours opt s':>10} {'ref opt s':>9}  target >= 0.85")
    results = []
    for preset in args.models.split(","):
        r = bench_shape(preset.strip(), args.tokens_per_step, args.micro_batch, args.seq_len, args.steps,
                        compiled=args.cpu_compiled,
                        extra_sides=tuple(x.strip() for x in args.cpu_sides.split(",") if x.strip()))
        r["ours_mfu"] = r["ours_tok_s"] * r["flops_per_token"] / (peak * 1e9)
        r["ref_mfu"] = r["ref_tok_s"] * r["flops_per_token"] / (peak * 1e9)
        r["peak_gflops"] = peak
        results.append(r)
        print(f"{r['preset']:<10} {r['tokens_per_step']:>8} {r['ours_tok_s']:>11.1f} {r['ref_tok_s']:>10.1f} "
              f"{r['ratio']:>6.3f} {r['ours_mfu']:>8.1%} {r['ref_mfu']:>8.1%} {r['ours_opt_step_s']:>10.2f} "
              f"{r['ref_opt_step_s']:>9.2f}  "
              f"{'PASS' if r['ratio'] >= 0.85 else 'MISS'}")
        if "compiled_tok_s" in r:
            print(f"{'':<10} {'':>8} compiled: {r['compiled_tok_s']:.1f} tok/s, {r['compiled_ratio']:.3f}x the ref "
                  f"(first step {r['compiled_first_step_s']:.0f} s, compiling included)")
        if r["sides"]:
            peers = {"ref": r["ref_tok_s"]} | {k: v["tok_s"] for k, v in r["sides"].items() if k.startswith("ref")}
            best = max(peers, key=peers.get)
            for name, v in [("ours", {"tok_s": r["ours_tok_s"]})] + list(r["sides"].items()):
                print(f"{'':<10} {name:<18} {v['tok_s']:>9.1f} tok/s  "
                      f"{v['tok_s'] / r['ref_tok_s']:.3f}x ref (fp32 eager)"
                      f"  {v['tok_s'] / peers[best]:.3f}x the best plain peer ({best})")
    if args.json:
        print(json.dumps({"provenance": prov, "results": results}, indent=2))


if __name__ == "__main__":
    main()
