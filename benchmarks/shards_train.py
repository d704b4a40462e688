"""Training tokens/s from a shard set against the same tokens as one file, side by side in one run.

The same corpus (stdlib sources with shuffled lines, as prepare_bench generates) is prepared twice
with one tokenizer: ``--shard-tokens 0`` (one train.bin) and ``--shard-tokens N`` (many shards).
Then ``train`` runs on each in turn, A B A B ... (``--rounds``), each a fresh process (tiny-cpu,
one thread, no checkpoints or samples); a run's figure is the median ``tok_per_s`` of its log
records after the first ``--skip`` steps. Same seed, so both runs see the same batches.

    PYTHONPATH=src python benchmarks/shards_train.py --mb 20 --shard-tokens 500000 --steps 40 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import kit  # benchmarks/kit.py: provenance, the CLI runner
from prepare_bench import generate


def prepare(corpus: Path, out: Path, tok: Path | None, shard_tokens: int) -> Path:
    if (out / "meta.json").is_file():  # a finished prepare from an earlier run of this script (same --work)
        return out
    args = ["prepare-data", str(corpus), "--out", str(out), "--shard-tokens", str(shard_tokens), "--no-progress",
            "--vocab-size", "4096"]
    if tok is not None:
        args += ["--tokenizer", str(tok)]
    proc = kit.run_process([sys.executable, "-m", "nanochat_ternary.cli", *args])
    if proc.returncode != 0:
        raise SystemExit(f"prepare-data failed: {proc.stderr[-1000:]}")
    return out


def train_tok_s(data: Path, work: Path, steps: int, skip: int) -> float:
    ck = work / "ckpt"
    shutil.rmtree(ck, ignore_errors=True)
    proc, recs = kit.run_cli(["train", "--dataset", "tokens", "--data-path", str(data), "--checkpoint-dir", str(ck),
                              "--set", f"total_steps={steps}", "--set", "threads=1", "--set", "sample_tokens=0",
                              "--set", "checkpoint_interval=0", "--set", f"eval_interval={steps}",
                              "--set", "log_interval=1"], work / "log.jsonl")
    if proc.returncode != 0:
        raise SystemExit(f"train failed: {proc.stderr[-1000:]}")
    rates = [r["tok_per_s"] for r in recs if "tok_per_s" in r and r.get("step", 0) > skip]
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=20.0, help="corpus size in MB")
    ap.add_argument("--shard-tokens", type=int, default=500_000)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=5, help="steps left out of each run's median (warm-up)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", default="")
    args = ap.parse_args()
    head = kit.header("shards_train", **vars(args))
    work = Path(args.work or tempfile.mkdtemp(prefix="shards-train-"))
    corpus = work / f"corpus-{args.mb:g}mb"
    n_bytes = generate(corpus, args.mb)
    single = prepare(corpus, work / "single", None, 0)
    sharded = prepare(corpus, work / "sharded", single / "tokenizer.json", args.shard_tokens)
    meta = {k: json.loads((d / "meta.json").read_text()) for k, d in (("single", single), ("sharded", sharded))}
    assert meta["single"]["train_tokens"] == meta["sharded"]["train_tokens"], "not the same tokens"
    rates: dict[str, list[float]] = {"single": [], "sharded": []}
    for r in range(args.rounds):
        for name in kit.round_order(list(rates), r, rotate=True):
            rates[name].append(train_tok_s(single if name == "single" else sharded, work, args.steps, args.skip))
            print(f"round {r + 1} {name}: {rates[name][-1]:,.0f} tok/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    out = {"header": head, "corpus_bytes": n_bytes, "train_tokens": meta["single"]["train_tokens"],
           "shards": meta["sharded"]["train_shards"], "tok_per_s": rates, "median": med,
           "ratio_sharded_vs_single": med["sharded"] / med["single"]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
