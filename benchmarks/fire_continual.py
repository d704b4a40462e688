"""Continual training from corpus A to corpus B: warm start, warm start + FIRE, or from scratch.

For each seed: train ``d20`` (its vocab becomes the corpus-A tokenizer's) on corpus A (the Python
stdlib, code) for ``--steps-a`` steps; then train ``--steps-b`` steps on corpus B (``pkgdocs``,
English prose of the installed packages, encoded with corpus A's tokenizer) three ways, with the
same seed, steps, batch shape and schedule (a fresh warmup and decay each):

    warm        init_from=<A checkpoint>                    weights of A, fresh optimizer, step 0
    warm+fire   init_from=<A checkpoint>, fire=true         the same, block matrices FIRE'd first
    scratch     a fresh init

Every run trains in its own process as ``nanochat-train bench`` runs a configuration
(``nanochat_ternary.bench.runner.run_one``, as optim_convergence.py), in ``OUT/runs/NAME-seedS``. Reported per
seed and as the mean: the final validation loss on B (plasticity: how well B was learned) and on A
(forgetting: how much of A is left), both in nats per token of the same tokenizer, so comparable
across the three. The A checkpoints themselves are scored too (where the warm starts begin).

    python benchmarks/fire_continual.py                                  # 600 + 300 steps, seeds 1 2
    python benchmarks/fire_continual.py --steps-a 1000 --steps-b 500 --seeds 1 2 3 --parallel 1 --threads 2
    python benchmarks/fire_continual.py --steps-a 10 --steps-b 10 --batch-size 2 --seq-len 64 --seeds 1  # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import kit  # benchmarks/kit.py: provenance, JSONL logs
import numpy as np
import torch

from nanochat_ternary.bench import runner
from nanochat_ternary.checkpoint import open_checkpoint
from nanochat_ternary.checkpoint.files import resolve_checkpoint
from nanochat_ternary.data.batches import val_batches
from nanochat_ternary.data.datasets import load_dataset, stdlib_dataset

WAYS: dict[str, list[str]] = {  # the --set overrides of each way on corpus B
    "warm": ["init_from={ckpt_a}"],
    "warm+fire": ["init_from={ckpt_a}", "fire=true"],
    "scratch": [],
}


def phase_settings(steps: int, data: dict[str, str], args: argparse.Namespace) -> runner.BenchSettings:
    """What every run of a phase shares (A: the stdlib; B: corpus B's tokens): one evaluation, at the
    end; a log record every 10 steps; the final checkpoint kept (the warm starts and scores read it)."""
    return runner.BenchSettings(model=args.model, steps=steps, seeds=len(args.seeds), batch_size=args.batch_size,
                                seq_len=args.seq_len, eval_points=1, threads=args.threads, keep_checkpoints=True,
                                overrides=["log_interval=10"], **data)


def train(name: str, seed: int, steps: int, data: dict[str, str], extra: list[str], args: argparse.Namespace,
          out: Path) -> dict:
    """One matched run; its final val loss (on its own data) and checkpoint, or its error."""
    where = out / "runs" / f"{name}-seed{seed}"
    t0 = time.perf_counter()
    r = runner.run_one(runner.Entry(name, "config", "", overrides=extra), seed, phase_settings(steps, data, args),
                       where, f"{name} seed {seed}", progress=False)
    wall = time.perf_counter() - t0
    recs = [x for x in kit.read_jsonl(where / "metrics.jsonl") if x.get("val_loss") is not None]
    if r.get("status") != "ok" or not recs:
        return {"run": name, "seed": seed, "error": str(r.get("error") or "?").strip().splitlines()[-1]}
    output = (where / "train.log").read_text().splitlines() if (where / "train.log").is_file() else []
    fire = [ln for ln in output if ln.startswith("fire: ")]
    return {"run": name, "seed": seed, "val_loss": recs[-1]["val_loss"],
            "ckpt": str(resolve_checkpoint(where / "checkpoints")), "wall_s": wall,
            **({"fire": fire[0]} if fire else {})}


@torch.no_grad()
def val_loss(ckpt: str, tokens: np.ndarray, args: argparse.Namespace) -> float:
    """Mean next-token CE of a checkpoint on ``tokens`` (a val split), over the batches a run's own
    evaluation would use (``eval_batches`` evenly spaced windows; Trainer.evaluate's sum)."""
    model = open_checkpoint(ckpt).model
    total = n = 0.0
    for x, y in val_batches(tokens, args.batch_size, args.seq_len, args.eval_batches):
        total += float(model(x, targets=y)) * y.numel()
        n += y.numel()
    return total / n


def _outcome(r: dict) -> str:
    return r["error"] if "error" in r else f"val_loss {r['val_loss']:.4f} ({r['wall_s']:.0f} s)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="d20")
    ap.add_argument("--steps-a", type=int, default=600, help="steps on corpus A (stdlib)")
    ap.add_argument("--steps-b", type=int, default=300, help="steps on corpus B (pkgdocs), for each way")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-batches", type=int, default=8, help="val batches for the scores on A and B")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parallel", type=int, default=2, help="runs at once (each with --threads threads)")
    ap.add_argument("--out", default="")
    ap.add_argument("--json", default="", help="write all results to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="fire-continual-"))
    out.mkdir(parents=True, exist_ok=True)

    # corpus A and corpus B encoded with A's tokenizer, prepared once here (cached) before any run
    corpus_a = stdlib_dataset(show_progress=False)
    corpus_b = load_dataset("pkgdocs", tokenizer=corpus_a.tokenizer_path, show_progress=False)
    data_a = {"dataset": "stdlib"}
    data_b = {"dataset": "tokens", "data_path": str(corpus_b.dir)}  # the same tokens for all three ways
    prov = kit.header("fire_continual", out=str(out))["provenance"]
    print(f"# {args.model}, {args.steps_a} steps on A then {args.steps_b} on B, {args.batch_size}x{args.seq_len} "
          f"tokens/step, seeds {args.seeds}, {args.parallel} at a time x {args.threads} thread(s)")
    print(f"# A: stdlib, {len(corpus_a.train):,} train / {len(corpus_a.val):,} val tokens; B: pkgdocs "
          f"({corpus_b.meta.get('text_bytes', 0):,} bytes of text), {len(corpus_b.train):,} / {len(corpus_b.val):,} "
          f"tokens with A's tokenizer (vocab {corpus_a.vocab_size})", flush=True)

    # One pool for every run: the scratch runs need no A checkpoint, so they fill the slots while A
    # trains, and each seed's warm runs start as soon as its own A checkpoint exists.
    def run_b(way: str, seed: int, ckpt: str = "") -> dict:
        return train(way, seed, args.steps_b, data_b, [a.format(ckpt_a=ckpt) for a in WAYS[way]], args, out)

    with ThreadPoolExecutor(args.parallel) as pool:
        pending = {pool.submit(train, "A", s, args.steps_a, data_a, [], args, out) for s in args.seeds}
        pending |= {pool.submit(run_b, "scratch", s) for s in args.seeds}
        phase_a, phase_b = [], []
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                r = f.result()
                print(f"  done: {r['run']:<9} seed {r['seed']}: {_outcome(r)}", flush=True)
                if r["run"] != "A":
                    phase_b.append(r)
                    continue
                phase_a.append(r)
                if "ckpt" in r:
                    pending |= {pool.submit(run_b, w, r["seed"], r["ckpt"]) for w in WAYS if w != "scratch"}
    phase_a.sort(key=lambda r: r["seed"])
    phase_b.sort(key=lambda r: (r["seed"], list(WAYS).index(r["run"])))
    for r in phase_b:
        if "fire" in r and r["seed"] == args.seeds[0]:
            print(f"FIRE, seed {r['seed']}: {r['fire']}")

    # scores on both corpora, in this process (the same val windows for every checkpoint)
    results = [r for r in phase_a + phase_b if "ckpt" in r]
    for r in results:
        r["val_a"] = val_loss(r["ckpt"], corpus_a.val, args)
        r["val_b"] = val_loss(r["ckpt"], corpus_b.val, args)
    by = {(("A (start)" if r["run"] == "A" else r["run"]), r["seed"]): r for r in results}
    print(f"\nfinal val loss (nats/token, A's tokenizer), {args.eval_batches} batches of "
          f"{args.batch_size}x{args.seq_len}:")
    head = " ".join(f"{'B s' + str(s):>8}" for s in args.seeds) + f" {'B mean':>8}  " + \
        " ".join(f"{'A s' + str(s):>8}" for s in args.seeds) + f" {'A mean':>8}"
    print(f"{'way':<11} {head}")
    for way in ["A (start)", *WAYS]:
        vb = [by[(way, s)]["val_b"] if (way, s) in by else math.nan for s in args.seeds]
        va = [by[(way, s)]["val_a"] if (way, s) in by else math.nan for s in args.seeds]
        print(f"{way:<11} " + " ".join(f"{v:>8.4f}" for v in vb) + f" {statistics.mean(vb):>8.4f}  "
              + " ".join(f"{v:>8.4f}" for v in va) + f" {statistics.mean(va):>8.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"provenance": prov, "args": vars(args), "results": phase_a + phase_b},
                                              indent=2))


if __name__ == "__main__":
    main()
