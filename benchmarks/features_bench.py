"""Training features measured side by side: gradient checkpointing, MTP, Collider, async loader.

Every memory figure is the peak RSS of a fresh subprocess (``kit.run_process``: its ``ru_maxrss``)
that does only that measurement, so each owns its peak; every time is wall-clock on this machine's
CPU (the script builds everything on the CPU device; it measures no GPU). Times that are compared
are taken interleaved in one process (A, B, A, B, ...) so that machine load hits both alike. The
first lines (``kit.header``) record the code's provenance (package version, git commit, dirty flag),
the machine and its load average.

1. Gradient checkpointing: nano-125m shape (ternary), batch 4 x seq 512 by default, with and
   without. Two memory figures, both from the first forward+backward of a fresh process (weights
   and preallocated gradients already resident, so neither counts them):
   - activation memory = RSS at the end of the forward minus RSS before it: what the forward keeps
     alive for the backward (the textbook definition, and what checkpointing exists to cut);
   - step peak = peak RSS minus RSS before the step: activations plus the backward's own
     temporaries (gradient buffers of each matmul, the recomputed block), which checkpointing
     cannot remove.
   Step time: off and on interleaved step by step in one process (the same model, the flag toggled
   between steps), median of ``--gc-steps`` each after one warm-up each. Target: >= 50% less
   activation memory for <= 40% more step time.
2. MTP memory: d20 shape (vocab 50257, where logits dominate), n = 4 heads vs none, peak RSS of a
   forward+backward. Target: <= 1.3x.
3. Matched training runs on the stdlib corpus (tiny-cpu, same seed, data and steps): baseline, MTP
   (n = 4), Collider (sparsity 0.35). Reports step time, final val loss, and tokens each run needs
   to reach the baseline's final val loss (first eval at or below it; "not reached" otherwise).
4. Async loader: a tiny model on synthetic data whose batches each take ``--delay-ms`` to prepare
   (an injected sleep), sync vs async (2 workers): data-wait share of step time.

    python benchmarks/features_bench.py                  # all, ~10 min on 2 cores
    python benchmarks/features_bench.py --only gc,mtp    # a subset
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import kit  # benchmarks/kit.py: provenance, interleaved timing, RSS, CLI runs
import torch

HERE = Path(__file__).resolve()


# ---------------------------------------------------------------------------------------------
# child: one forward+backward measurement in its own process


def child_step(args: argparse.Namespace) -> dict:
    from nanochat_ternary.config import build_config
    from nanochat_ternary.model.gpt import GPT
    from nanochat_ternary.train.objective import Objective

    torch.set_num_threads(args.threads)
    sets = [f"use_mtp={str(args.mtp > 0).lower()}"] + ([f"mtp_n_tokens={args.mtp}"] if args.mtp else [])
    cfg = build_config(args.preset, overrides=sets + [f"seq_len={args.seq}", f"batch_size={args.batch}"])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    model.gradient_checkpointing = bool(args.gc)
    model.train()
    objective = Objective(cfg.model, cfg.training)
    V = cfg.model.vocab_size
    x = torch.randint(0, V, (args.batch, args.seq))
    y = torch.randint(0, V, (args.batch, args.seq))
    for p in model.parameters():
        p.grad = p.detach().clone().zero_()  # written, so resident (zeros_like may map lazy pages)

    rss_after_forward = []

    def step() -> float:
        t0 = time.perf_counter()
        loss, _ = model(x, targets=y, objective=objective)
        rss_after_forward.append(kit.rss_bytes())
        loss.backward()
        return time.perf_counter() - t0

    # RSS before the first step: the allocator keeps freed memory, so a later baseline would already
    # include the previous step's activations. The peak is the high-water mark over all steps.
    rss0 = kit.rss_bytes()
    times = [step() for _ in range(1 + args.steps)]  # the first is a warm-up, not timed
    # the peak RSS is read by the parent from this process's ru_maxrss (run_child)
    return {"rss_before": rss0, "rss_after_forward": rss_after_forward[0],
            "step_s": min(times[1:]), "warmup_s": times[0]}


def child_time(args: argparse.Namespace) -> dict:
    """Checkpointing off and on, interleaved step by step on one model (the flag toggled between
    steps; the objective reads it too), so that machine load hits both alike."""
    from nanochat_ternary.config import build_config
    from nanochat_ternary.model.gpt import GPT
    from nanochat_ternary.train.objective import Objective

    torch.set_num_threads(args.threads)
    cfg = build_config(args.preset, overrides=[f"seq_len={args.seq}", f"batch_size={args.batch}"])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    model.train()
    objective = Objective(cfg.model, cfg.training)
    V = cfg.model.vocab_size
    x = torch.randint(0, V, (args.batch, args.seq))
    y = torch.randint(0, V, (args.batch, args.seq))

    def step(gc: bool) -> float:
        model.gradient_checkpointing = gc
        t0 = time.perf_counter()
        loss, _ = model(x, targets=y, objective=objective)
        loss.backward()
        dt = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)  # not timed
        return dt

    # off, on, off, on, ...; the first of each is a warm-up (timed, reported, left out of the median)
    t = kit.interleaved({"off": lambda: step(False), "on": lambda: step(True)}, reps=1 + args.steps, warmup=0,
                        self_timed=True)
    off, on = t["off"].samples, t["on"].samples
    return {"off_s": kit.Timing(off[1:]).median, "on_s": kit.Timing(on[1:]).median, "off_all": off, "on_all": on}


def run_child(*flags: str, **kw) -> dict:
    """This script in a fresh process in a child mode; its JSON answer, plus its peak RSS."""
    cmd = [sys.executable, str(HERE), *flags]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    out = kit.run_process(cmd)
    if out.returncode != 0:
        raise RuntimeError(f"child {kw} failed:\n{out.stderr[-3000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "peak_rss": out.peak_rss_bytes}


def mib(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB"


# ---------------------------------------------------------------------------------------------
# 1 + 2


def bench_gc(a: argparse.Namespace) -> None:
    print(f"\n## Gradient checkpointing: {a.gc_preset}, batch {a.gc_batch} x seq {a.gc_seq}, "
          f"fwd+bwd, {a.threads} threads")
    res = {}
    for gc in (0, 1):
        r = run_child("--child", preset=a.gc_preset, seq=a.gc_seq, batch=a.gc_batch, gc=gc, mtp=0, steps=1,
                      threads=a.threads)
        r["act"] = r["rss_after_forward"] - r["rss_before"]
        r["step_peak"] = r["peak_rss"] - r["rss_before"]
        res[gc] = r
        print(f"  {'on ' if gc else 'off'}: activations (end of forward - before) {mib(r['act'])}, step peak "
              f"(peak - before) {mib(r['step_peak'])}, peak RSS {mib(r['peak_rss'])} (own process)")
    off, on = res[0], res[1]
    saved = 100 * (1 - on["act"] / off["act"])
    t = run_child("--child", child_time=1, preset=a.gc_preset, seq=a.gc_seq, batch=a.gc_batch, steps=a.gc_steps,
                  threads=a.threads)
    ratio = t["on_s"] / t["off_s"]
    print(f"  step time, interleaved off/on in one process, median of {a.gc_steps} each: off {t['off_s']:.2f} s, "
          f"on {t['on_s']:.2f} s (all: off {', '.join(f'{v:.2f}' for v in t['off_all'])}; "
          f"on {', '.join(f'{v:.2f}' for v in t['on_all'])}; first of each = warm-up)")
    print(f"  activation memory: {on['act'] / off['act']:.2f}x ({saved:.0f}% less; target >= 50% less "
          f"{'PASS' if saved >= 50 else 'MISS'})   step time: {ratio:.2f}x (target <= 1.40x "
          f"{'PASS' if ratio <= 1.40 else 'MISS'})   step peak: {on['step_peak'] / off['step_peak']:.2f}x   "
          f"peak RSS: {on['peak_rss'] / off['peak_rss']:.2f}x")


def bench_mtp_mem(a: argparse.Namespace) -> None:
    print(f"\n## MTP memory: {a.mtp_preset}, batch {a.mtp_batch} x seq {a.mtp_seq}, fwd+bwd")
    res = {}
    for n in (0, 4):
        r = run_child("--child", preset=a.mtp_preset, seq=a.mtp_seq, batch=a.mtp_batch, gc=0, mtp=n, steps=1,
                      threads=a.threads)
        res[n] = r
        print(f"  {'n=4 heads' if n else 'no MTP   '}: peak RSS {mib(r['peak_rss'])}, "
              f"step {r['step_s']:.2f} s")
    logits = a.mtp_batch * a.mtp_seq * 50257 * 4
    print(f"  peak RSS ratio n=4 / none: {res[4]['peak_rss'] / res[0]['peak_rss']:.2f}x (target <= 1.3x); "
          f"one head's fp32 logits = {mib(logits)}; step time {res[4]['step_s'] / res[0]['step_s']:.2f}x")


# ---------------------------------------------------------------------------------------------
# 3: matched training runs through the CLI


def _train(run_dir: Path, name: str, extra: list[str], a: argparse.Namespace) -> list[dict]:
    out, records = kit.run_cli(
        ["train", "--config", "tiny-cpu", "--total-steps", str(a.train_steps), "--batch-size", str(a.train_batch),
         "--seq-len", "128", "--eval-interval", str(a.eval_interval), "--log-interval", "10", "--sample-tokens", "0",
         "--threads", str(a.small_threads), "--checkpoint-dir", str(run_dir / name), "--set", "eval_batches=8",
         *extra], run_dir / f"{name}.jsonl")
    if out.returncode != 0:
        raise RuntimeError(f"run {name} failed:\n{out.stderr[-3000:]}")
    return records


def bench_training(a: argparse.Namespace) -> None:
    tok_step = a.train_batch * 128
    print(f"\n## Matched runs ({a.small_threads} thread): tiny-cpu on stdlib, {a.train_steps} steps x "
          f"{tok_step} tokens, seed 1337, "
          f"val every {a.eval_interval} steps")
    runs = {"baseline": [], "mtp n=4": ["--set", "use_mtp=true", "--set", "mtp_n_tokens=4"],
            "collider 0.35": ["--set", "use_collider=true", "--set", "collider_sparsity=0.35"]}
    with tempfile.TemporaryDirectory() as d:
        recs = {name: _train(Path(d), name.split()[0], extra, a) for name, extra in runs.items()}
    base_final = [r for r in recs["baseline"] if "val_loss" in r][-1]["val_loss"]
    base_time = None
    for name, rr in recs.items():
        evals = [r for r in rr if "val_loss" in r]
        # step time from the last logged interval records (skips the first step's warm-up)
        steps_time = (rr[-1]["elapsed_s"] - rr[0]["elapsed_s"]) / (rr[-1]["step"] - rr[0]["step"])
        base_time = base_time or steps_time
        reach = next((r["tokens_seen"] for r in evals if r["val_loss"] <= base_final), None)
        extra = ""
        if "kept_frac" in rr[-1]:
            extra = f", kept_frac {sum(r['kept_frac'] for r in rr) / len(rr):.3f}"
        if "mtp_ce_4" in rr[-1]:
            extra = ", final mtp_ce_1..4 " + " ".join(f"{rr[-1][f'mtp_ce_{k}']:.2f}" for k in range(1, 5))
        curve = " ".join(f"{r['val_loss']:.3f}" for r in evals)
        print(f"  {name:<14}: step {steps_time:.3f} s ({steps_time / base_time:.2f}x), final val_loss "
              f"{evals[-1]['val_loss']:.4f}, tokens to reach baseline's final "
              f"{base_final:.4f}: {reach if reach is not None else 'not reached'}{extra}")
        print(f"  {'':<14}  val curve: {curve}")


# ---------------------------------------------------------------------------------------------
# 4: async loader on a slow data source


def child_async(args: argparse.Namespace) -> dict:
    from nanochat_ternary.config import build_config
    from nanochat_ternary.data.batches import TokenBatches
    from nanochat_ternary.train.runtime import setup_runtime
    from nanochat_ternary.train.trainer import Trainer

    class SlowBatches(TokenBatches):
        delay_s = args.delay_ms / 1000

        def get(self, step, micro=0):
            time.sleep(self.delay_s)  # the injected cost of reading / decoding a batch
            return super().get(step, micro)

    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / "log.jsonl"
        cfg = build_config("tiny-cpu", overrides=[
            "dataset=synthetic", "n_samples=2000", "batch_size=8", "seq_len=128",
            f"total_steps={args.steps}",
            "dim=64", "n_layers=2", "n_heads=2", "n_kv_heads=2",
            "eval_interval=0", "log_interval=1", "sample_tokens=0", f"log_file={log}",
            f"checkpoint_dir={d}/run",
            f"use_async_loader={str(bool(args.use_async)).lower()}", "num_workers=2", "prefetch_batches=4",
            f"threads={args.threads}"])
        rt = setup_runtime("cpu", args.threads)
        tr = Trainer(cfg, rt, echo=lambda _m: None)
        b = tr.batches
        tr.batches = SlowBatches(b.tokens, b.batch_size, b.seq_len, b.seed,
                                 grad_accum_steps=b.grad_accum_steps)
        tr.fit()
        recs = kit.read_jsonl(log)[2:]  # skip warm-up steps
    wall = recs[-1]["elapsed_s"] - recs[0]["elapsed_s"]
    n = recs[-1]["step"] - recs[0]["step"]
    wait = sum(r["data_wait_s"] for r in recs[1:])
    return {"step_s": wall / n, "wait_s": wait / n}


def bench_async(a: argparse.Namespace) -> None:
    print(f"\n## Async loader: dim 64 x 2 layers, batch 8 x 128, synthetic data with {a.delay_ms} ms "
          f"injected per batch, {a.async_steps} steps")
    res = {}
    for use in (0, 1):
        r = run_child("--child-async", use_async=use, delay_ms=a.delay_ms, steps=a.async_steps,
                      threads=a.small_threads)
        res[use] = r
        print(f"  {'async (2 workers)' if use else 'sync             '}: step {r['step_s'] * 1000:.0f} ms, "
              f"data wait {r['wait_s'] * 1000:.1f} ms/step = "
              f"{100 * r['wait_s'] / r['step_s']:.1f}% of step time")
    print(f"  step time async / sync: {res[1]['step_s'] / res[0]['step_s']:.2f}x")


# ---------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="gc,mtp,train,async")
    p.add_argument("--threads", type=int, default=2)
    # tiny models: one thread (with 2 threads on a busy 2-core machine their small matmuls can stall)
    p.add_argument("--small-threads", type=int, default=1)
    p.add_argument("--gc-preset", default="nano-125m")
    p.add_argument("--gc-seq", type=int, default=512)
    p.add_argument("--gc-batch", type=int, default=4)
    p.add_argument("--gc-steps", type=int, default=3, help="timed steps each for off and on (interleaved)")
    p.add_argument("--mtp-preset", default="d20")
    p.add_argument("--mtp-seq", type=int, default=256)
    p.add_argument("--mtp-batch", type=int, default=4)
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--eval-interval", type=int, default=20)
    p.add_argument("--delay-ms", type=int, default=40)
    p.add_argument("--async-steps", type=int, default=30)
    # child modes
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-async", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-time", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--preset", default="")
    p.add_argument("--seq", type=int, default=0)
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--gc", type=int, default=0)
    p.add_argument("--mtp", type=int, default=0)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--use-async", type=int, default=0)
    a = p.parse_args()
    if a.child_time:  # before --child, which run_child always passes
        print(json.dumps(child_time(a)))
        return
    if a.child:
        print(json.dumps(child_step(a)))
        return
    if a.child_async:
        print(json.dumps(child_async(a)))
        return
    torch.set_num_threads(a.threads)  # what the header reports; each child sets its own
    kit.header("features_bench", only=a.only, threads=a.threads, small_threads=a.small_threads)
    t0 = time.perf_counter()
    only = set(a.only.split(","))
    benches = (("gc", bench_gc), ("mtp", bench_mtp_mem), ("async", bench_async), ("train", bench_training))
    for key, fn in benches:
        if key in only:
            fn(a)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
