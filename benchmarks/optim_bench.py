"""Memory-efficient Muon, measured side by side: state memory, CPU step time, and peers on a task.

Three parts, one run (issue #3):

1. Memory, measured on the real nano-125m model: one optimizer step per variant (fresh tensors of
   the model's shapes, random gradients: ``measure_optimizer_state``), summing the bytes of every
   tensor in the optimizer state. Targets: 8-bit Muon <= 1.04 bytes of Muon state per Muon param;
   GaLore rank 128 <= 25% of fp32 Muon's Muon state, GaLore + 8-bit <= 10% (projectors included).
2. Step time on CPU, the nano-125m matrix set (12 x [4 x 768x768, 2 x 2176x768, 768x2176]), all
   variants on the same parameters and gradients, interleaved rep by rep (rotating the order) so
   machine noise hits all alike; ratios of medians to fp32 Muon. GaLore is timed separately on a
   plain step and on a refresh step (randomized SVD of every projected matrix) and amortized over
   a refresh period: ``(t_refresh + (F - 1) t_plain) / F``. Targets: 8-bit <= 1.15x, GaLore
   amortized <= 1.0x.
3. Peers on the same small training task (a 2-layer ternary GPT on a synthetic Markov-chain
   language, same init, same batches): our variants, torch.optim.Muon (+ AdamW for the rest),
   torch.optim.AdamW, bitsandbytes AdamW8bit, torchao AdamW8bit, galore-torch GaLoreAdamW. State
   bytes per parameter (all trainable params; shared storage counted once; wrapper subclasses
   measured by their inner tensors), median optimizer-step time, held-out loss at the end. Peers
   that are not installed or fail are listed with the reason. Also shows the projector dtype's
   effect on loss (GaLore with fp32 vs bf16 projectors).

    pip install -e '.[bench]'      # the peers (optional)
    python benchmarks/optim_bench.py [--threads 2] [--reps 5] [--layers 12] [--task-steps 60]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import kit  # benchmarks/kit.py: provenance, interleaved timing
import torch

from nanochat_ternary.config import ModelConfig, TrainConfig, build_config
from nanochat_ternary.model.gpt import GPT
from nanochat_ternary.optim import GaLoreMuon, Muon, Muon8bit, measure_optimizer_state, split_params
from nanochat_ternary.optim.factory import build_optimizers, optimizer_state_bytes

NANO_LAYER = [(768, 768)] * 4 + [(2176, 768)] * 2 + [(768, 2176)]


# ---------------------------------------------------------------------------------------------
# 1. memory

MEMORY_VARIANTS: dict[str, dict[str, Any]] = {
    "muon (fp32)": {},
    "muon-8bit": dict(use_8bit_optim=True),
    "galore-muon r128, bf16 proj": dict(use_galore=True),
    "galore-muon r128, fp32 proj": dict(use_galore=True, galore_proj_dtype="float32"),
    "galore-muon-8bit r128, bf16 proj": dict(use_galore=True, use_8bit_optim=True),
    "galore-muon-8bit r128, fp32 proj": dict(use_galore=True, use_8bit_optim=True,
                                             galore_proj_dtype="float32"),
}


def memory_part(preset: str) -> tuple[list[dict[str, Any]], dict[str, bool]]:
    cfg = build_config(preset)
    with torch.device("meta"):  # shapes only: measure_optimizer_state makes its own tensors
        model = GPT(cfg.model)
    tcfg = dataclasses.replace(cfg.training, galore_rank=128)
    rows = []
    base = None
    for name, flags in MEMORY_VARIANTS.items():
        rep = measure_optimizer_state(model, dataclasses.replace(tcfg, **flags), baseline=False)
        base = base or rep["muon_state_bytes"]
        rep = {"name": name, **rep, "muon_state_vs_fp32": rep["muon_state_bytes"] / base}
        rows.append(rep)
    print(f"\n== 1. Optimizer state, measured after one step on {preset} "
          f"({rows[0]['muon_params'] / 1e6:.1f}M Muon params, {rows[0]['adamw_params'] / 1e6:.1f}M AdamW) ==")
    print(f"{'variant':36s} {'Muon MiB':>9s} {'B/param':>8s} {'% fp32':>7s} {'int8':>5s} {'proj':>5s} "
          f"{'AdamW MiB':>10s} {'total MiB':>10s}")
    for r in rows:
        print(f"{r['name']:36s} {r['muon_state_bytes'] / 2**20:9.1f} {r['bytes_per_muon_param']:8.3f} "
              f"{100 * r['muon_state_vs_fp32']:6.1f}% {r['muon_int8_tensors']:5d} {r['galore_projected']:5d} "
              f"{r['adamw_state_bytes'] / 2**20:10.1f} {r['total_state_bytes'] / 2**20:10.1f}")
    by = {r["name"]: r for r in rows}
    targets = {
        "8-bit Muon <= 1.04 B/param": by["muon-8bit"]["bytes_per_muon_param"] <= 1.04,
        "GaLore r128 (bf16 proj) <= 25% of fp32 Muon":
            by["galore-muon r128, bf16 proj"]["muon_state_vs_fp32"] <= 0.25,
        "GaLore r128 + 8-bit (bf16 proj) <= 10% of fp32 Muon":
            by["galore-muon-8bit r128, bf16 proj"]["muon_state_vs_fp32"] <= 0.10,
    }
    return rows, targets


# ---------------------------------------------------------------------------------------------
# 2. step time


def step_time_part(layers: int, reps: int, freq: int) -> tuple[dict[str, float], dict[str, bool]]:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in NANO_LAYER * layers]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    # all share the parameters and gradients; lr 0 keeps the parameters fixed
    makers: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "muon (fp32)": lambda: Muon(params, lr=0.0),
        "muon-8bit": lambda: Muon8bit(params, lr=0.0),
        "muon-8bit +SR": lambda: Muon8bit(params, lr=0.0, stochastic_rounding=True),
        "galore-muon, plain step": lambda: GaLoreMuon(params, lr=0.0, update_freq=10**9),
        "galore-muon, refresh step": lambda: GaLoreMuon(params, lr=0.0, update_freq=1),
        "galore-muon-8bit, plain step": lambda: GaLoreMuon(params, lr=0.0, update_freq=10**9, quantize=True),
        "galore-muon-8bit, refresh step": lambda: GaLoreMuon(params, lr=0.0, update_freq=1, quantize=True),
    }
    opts = {k: f() for k, f in makers.items()}
    # a warm-up step each (allocates state, first refresh), then reps rounds in a rotating order
    timings = kit.interleaved({k: o.step for k, o in opts.items()}, reps=reps, warmup=1, rotate=True)
    times = {k: t.samples for k, t in timings.items()}
    names = list(opts)
    med = {k: t.median for k, t in timings.items()}
    base = med["muon (fp32)"]
    n = sum(p.numel() for p in params)
    print(f"\n== 2. Optimizer step time on CPU ({torch.get_num_threads()} threads), nano-125m matrices x "
          f"{layers} layers ({n / 1e6:.1f}M params), median of {reps} interleaved reps ==")
    for k in names:
        print(f"{k:34s} {med[k]:8.3f} s  {med[k] / base:6.3f}x fp32 Muon   "
              f"(min {min(times[k]):.3f}, max {max(times[k]):.3f})")
    amort = {}
    for v in ("galore-muon", "galore-muon-8bit"):
        a = (med[f"{v}, refresh step"] + (freq - 1) * med[f"{v}, plain step"]) / freq
        amort[v] = a
        print(f"{v + f', amortized over {freq} steps':34s} {a:8.3f} s  {a / base:6.3f}x fp32 Muon")
    ratios = {
        "muon-8bit": med["muon-8bit"] / base,
        "muon-8bit +SR": med["muon-8bit +SR"] / base,
        "galore-muon amortized": amort["galore-muon"] / base,
        "galore-muon-8bit amortized": amort["galore-muon-8bit"] / base,
    }
    targets = {
        "8-bit Muon step <= 1.15x fp32 Muon": ratios["muon-8bit"] <= 1.15,
        "8-bit Muon +SR step <= 1.15x fp32 Muon": ratios["muon-8bit +SR"] <= 1.15,
        "GaLore amortized step <= 1.0x fp32 Muon": ratios["galore-muon amortized"] <= 1.0,
        "GaLore+8-bit amortized step <= 1.0x fp32 Muon": ratios["galore-muon-8bit amortized"] <= 1.0,
    }
    return {**{f"{k} s": v for k, v in med.items()}, **{f"{k} ratio": v for k, v in ratios.items()}}, targets


# ---------------------------------------------------------------------------------------------
# 3. peers on a small task

TASK_MODEL = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=4, ffn_mult=2.0, vocab_size=256,
                         max_seq_len=64)
TASK_BATCH, TASK_SEQ = 16, 64
ADAM_LR, MUON_LR = 3e-3, 0.02
GALORE_RANK, GALORE_FREQ = 32, 20  # task matrices are 128x128 / 256x128


def markov_batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A first-order Markov language over 256 tokens, 4 likely successors per token."""
    g = torch.Generator().manual_seed(1234)  # the language: the same for every call
    V = TASK_MODEL.vocab_size
    succ = torch.randint(0, V, (V, 4), generator=g)
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    g = torch.Generator().manual_seed(seed)  # the samples
    out = []
    for _ in range(n):
        x = torch.empty(TASK_BATCH, TASK_SEQ + 1, dtype=torch.long)
        x[:, 0] = torch.randint(0, V, (TASK_BATCH,), generator=g)
        for t in range(TASK_SEQ):
            pick = torch.multinomial(probs, TASK_BATCH, replacement=True, generator=g)
            x[:, t + 1] = succ[x[:, t], pick]
        out.append((x[:, :-1], x[:, 1:]))
    return out


def state_bytes(opts: list[torch.optim.Optimizer]) -> int:
    return sum(optimizer_state_bytes(o) for o in opts)


def _ours(flags: dict[str, Any]) -> Callable[[torch.nn.Module], list[torch.optim.Optimizer]]:
    tcfg = TrainConfig(lr=MUON_LR, adam_lr=ADAM_LR, galore_rank=GALORE_RANK, galore_update_freq=GALORE_FREQ,
                       galore_min_dim=128, **flags)
    return lambda model: build_optimizers(model, tcfg, torch.device("cpu"))


def _torch_muon(model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    muon, adamw = split_params(model)
    return [torch.optim.Muon(muon, lr=MUON_LR, weight_decay=0.0, adjust_lr_fn="original"),
            torch.optim.AdamW(adamw, lr=ADAM_LR, betas=(0.9, 0.95), weight_decay=0.0)]


def _all(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _torch_adamw(model):
    return [torch.optim.AdamW(_all(model), lr=ADAM_LR, betas=(0.9, 0.95), weight_decay=0.0)]


def _bnb_adamw8bit(model):
    import bitsandbytes as bnb

    return [bnb.optim.AdamW8bit(_all(model), lr=ADAM_LR, betas=(0.9, 0.95), weight_decay=0.0)]


def _torchao_adamw8bit(model):
    from torchao.optim import AdamW8bit

    return [AdamW8bit(_all(model), lr=ADAM_LR, betas=(0.9, 0.95), weight_decay=0.0)]


def _galore_adamw(model):
    from galore_torch import GaLoreAdamW

    muon, rest = split_params(model)
    return [GaLoreAdamW([{"params": rest},
                         {"params": muon, "rank": GALORE_RANK, "update_proj_gap": GALORE_FREQ, "scale": 0.25,
                          "proj_type": "std"}], lr=ADAM_LR, betas=(0.9, 0.95), weight_decay=0.0)]


PEERS: dict[str, Callable[[torch.nn.Module], list[torch.optim.Optimizer]]] = {
    "ours: muon (fp32)": _ours({}),
    "ours: muon-8bit": _ours(dict(use_8bit_optim=True)),
    "ours: muon-8bit +SR": _ours(dict(use_8bit_optim=True, stochastic_rounding=True)),
    "ours: galore-muon, bf16 proj": _ours(dict(use_galore=True)),
    "ours: galore-muon, fp32 proj": _ours(dict(use_galore=True, galore_proj_dtype="float32")),
    "ours: galore-muon-8bit, bf16 proj": _ours(dict(use_galore=True, use_8bit_optim=True)),
    "ours: galore-muon-8bit +SR": _ours(dict(use_galore=True, use_8bit_optim=True, stochastic_rounding=True)),
    "torch.optim.Muon (+AdamW)": _torch_muon,
    "torch.optim.AdamW": _torch_adamw,
    "bitsandbytes AdamW8bit": _bnb_adamw8bit,
    "torchao AdamW8bit": _torchao_adamw8bit,
    "galore-torch GaLoreAdamW": _galore_adamw,
}


def run_task(make, train, held_out) -> dict[str, Any]:
    torch.manual_seed(0)
    model = GPT(TASK_MODEL)
    opts = make(model)
    n_params = sum(p.numel() for p in _all(model))
    step_times, losses = [], []
    for x, y in train:
        loss = model(x, y)
        loss.backward()
        t = time.perf_counter()
        for o in opts:
            o.step()
        step_times.append(time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    with torch.no_grad():
        held = statistics.fmean(model(x, y).item() for x, y in held_out)
    muon_bytes = sum(state_bytes([o]) for o in opts if isinstance(o, (Muon, torch.optim.Muon)))
    muon_params = sum(p.numel() for o in opts if isinstance(o, (Muon, torch.optim.Muon))
                      for g in o.param_groups for p in g["params"])
    total = state_bytes(opts)
    return {"status": "ok", "state_bytes": total, "bytes_per_param": total / n_params,
            "muon_bytes_per_param": muon_bytes / muon_params if muon_params else None,
            "step_ms": 1e3 * statistics.median(step_times[3:]), "first_loss": losses[0],
            "train_loss_last5": statistics.fmean(losses[-5:]), "held_out_loss": held}


def peers_part(steps: int) -> dict[str, dict[str, Any]]:
    train, held_out = markov_batches(steps, seed=1), markov_batches(4, seed=2)
    results: dict[str, dict[str, Any]] = {}
    for name, make in PEERS.items():
        try:
            results[name] = run_task(make, train, held_out)
        except ImportError as e:
            results[name] = {"status": f"not installed ({e.name or e})"}
        except Exception as e:  # a peer that fails is reported, not dropped
            last = traceback.extract_tb(e.__traceback__)[-1]
            results[name] = {"status": f"failed: {type(e).__name__}: {str(e)[:120]} "
                                       f"({last.filename.rsplit('/', 1)[-1]}:{last.lineno})"}
    print(f"\n== 3. Same task, side by side: {TASK_MODEL.n_layers}-layer ternary GPT dim {TASK_MODEL.dim} "
          f"(matrices 128x128, 256x128), Markov language over {TASK_MODEL.vocab_size} tokens, {steps} steps "
          f"of {TASK_BATCH}x{TASK_SEQ} tokens; GaLore rank {GALORE_RANK}, refresh every {GALORE_FREQ} ==")
    print(f"{'optimizer':36s} {'B/param':>8s} {'Muon B/p':>9s} {'step ms':>8s} {'train loss':>10s} "
          f"{'held-out':>9s}  (loss at step 0 ~ ln 256 = 5.55; entropy floor ~1.2)")
    for name, r in results.items():
        if r["status"] != "ok":
            print(f"{name:36s} {r['status']}")
            continue
        mb = f"{r['muon_bytes_per_param']:9.3f}" if r["muon_bytes_per_param"] is not None else f"{'-':>9s}"
        print(f"{name:36s} {r['bytes_per_param']:8.3f} {mb} {r['step_ms']:8.1f} "
              f"{r['train_loss_last5']:10.4f} {r['held_out_loss']:9.4f}")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="interleaved step-time reps per variant")
    ap.add_argument("--layers", type=int, default=12, help="nano-125m layers in the step-time part")
    ap.add_argument("--galore-freq", type=int, default=200, help="refresh period for the amortized time")
    ap.add_argument("--task-steps", type=int, default=60)
    ap.add_argument("--preset", default="nano-125m", help="model of the memory part")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: memory,time,peers")
    ap.add_argument("--json", default="", help="also write all results to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    head = kit.header("optim_bench", reps=args.reps, layers=args.layers, galore_freq=args.galore_freq,
                      task_steps=args.task_steps, preset=args.preset, skip=args.skip)
    out: dict[str, Any] = {"provenance": head["provenance"], "torch": torch.__version__, "threads": args.threads,
                           "header": head}
    targets: dict[str, bool] = {}
    if "memory" not in skip:
        out["memory"], t = memory_part(args.preset)
        targets.update(t)
    if "time" not in skip:
        out["step_time"], t = step_time_part(args.layers, args.reps, args.galore_freq)
        targets.update(t)
    if "peers" not in skip:
        out["peers"] = peers_part(args.task_steps)
    if targets:
        print("\n== targets ==")
        for k, ok in targets.items():
            print(f"  [{'PASS' if ok else 'FAIL'}] {k}")
    out["targets"] = targets
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
