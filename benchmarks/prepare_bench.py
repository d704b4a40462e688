"""prepare-data throughput and peak memory against the bare tokenizer, side by side in one run.

For each corpus size (generated from the local stdlib's .py files, lines shuffled per copy so BPE
sees new text), four subprocesses in turn, each timed, its peak RSS read as ``/usr/bin/time -f %M``
reads it (``kit.run_process``: the child's ``ru_maxrss``): bare, prepare --tokenizer, bare again
(the machine's load drifts: the two bare rates bracket the prepare), full prepare:

* ``bare``: a loop of ``Tokenizer.encode_batch_fast`` over the same files in 1 MB batches (read
  lazily, ids discarded) with the same tokenizer: the speed the tokenizer allows on this machine;
* ``prepare --tokenizer``: ``prepare-data`` encoding with that tokenizer (scan + encode + shards);
* ``prepare``: the full command, BPE training on its 48 MB sample included.

Ratios ``prepare MB/s / bare MB/s`` are the figures to quote (same machine, same minutes).

    PYTHONPATH=src python benchmarks/prepare_bench.py --sizes-mb 100 --work /tmp/prepare-bench
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

import kit  # noqa: E402  (benchmarks/kit.py: provenance, a child's wall time and peak RSS)

BARE = """
import sys, time
from pathlib import Path
from nanochat_ternary.data.tokenizer import load_tokenizer
tok = load_tokenizer(sys.argv[2])
batch, size, total, t0 = [], 0, 0, time.monotonic()
for p in sorted(Path(sys.argv[1]).rglob("*.py")):
    t = p.read_text(encoding="utf-8")
    batch.append(t); size += len(t); total += len(t.encode())
    if size >= 1 << 20:
        tok.hf.encode_batch_fast(batch, add_special_tokens=False); batch, size = [], 0
if batch:
    tok.hf.encode_batch_fast(batch, add_special_tokens=False)
print(total, time.monotonic() - t0)
"""


def generate(out: Path, mb: float, seed: int = 0) -> int:
    """Files of stdlib source with shuffled lines until ``mb`` MB; returns the byte count."""
    if (out / ".done").is_file():
        return int((out / ".done").read_text())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))]
    rng, total, i = random.Random(seed), 0, 0
    while total < mb * 1e6:
        lines = texts[i % len(texts)].splitlines(keepends=True)
        rng.shuffle(lines)
        text = "".join(lines)
        d = out / f"d{i // 1000:04d}"
        d.mkdir(exist_ok=True)
        (d / f"f{i:07d}.py").write_text(text, encoding="utf-8")
        total += len(text.encode("utf-8"))
        i += 1
    (out / ".done").write_text(str(total))
    return total


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS of the child in GiB, stdout) of one subprocess."""
    r = kit.run_process(cmd, env={"PYTHONPATH": str(SRC)})
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return r.wall_s, r.peak_rss_bytes / 2**30, r.stdout


def sampler_bench(prepared: Path, shard_tokens: int, n_gets: int = 3000) -> dict[str, float]:
    """Batches per second from the same tokens as one memmapped file and as shards of
    ``shard_tokens`` (``TokenBatches.get``, batch 8 x 256: the data side of a training step)."""
    import numpy as np

    from nanochat_ternary.data import TokenBatches, load_prepared, write_tokens
    from nanochat_ternary.data.shards import ShardedTokens

    one = np.asarray(load_prepared(prepared).train)
    d = prepared.parent / f"{prepared.name}-shards"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    vocab = int(one.max()) + 1
    paths = []
    for i in range(0, len(one), shard_tokens):
        paths.append(d / f"train-{i // shard_tokens:05d}.bin")
        write_tokens(paths[-1], one[i:i + shard_tokens], vocab)
    single = d / "single.bin"
    write_tokens(single, one, vocab)
    from nanochat_ternary.data import read_tokens

    out = {"shards": len(paths)}
    for name, tokens in (("single", read_tokens(single)), ("shards", ShardedTokens(paths)),
                         ("single_again", read_tokens(single))):
        b = TokenBatches(tokens, 8, 256, seed=0)
        b.get(0)
        t0 = time.perf_counter()
        for step in range(n_gets):
            b.get(step)
        out[f"{name}_batches_per_s"] = n_gets / (time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[100.0])
    ap.add_argument("--work", default="/tmp/prepare-bench")
    ap.add_argument("--vocab-size", type=int, default=4096)
    args = ap.parse_args()
    kit.header("prepare_bench", sizes_mb=args.sizes_mb, vocab_size=args.vocab_size)
    work = Path(args.work)
    cli = [sys.executable, "-m", "nanochat_ternary.cli", "prepare-data", "--vocab-size", str(args.vocab_size),
           "--no-progress"]
    rows = []
    for mb in args.sizes_mb:
        corpus = work / f"corpus-{mb:g}mb"
        n_bytes = generate(corpus, mb)
        full = work / f"full-{mb:g}"
        given = work / f"given-{mb:g}"
        shutil.rmtree(full, ignore_errors=True)
        shutil.rmtree(given, ignore_errors=True)
        tok = work / "tokenizer.json"
        if not tok.is_file():  # a BPE trained on this corpus's first size, shared by the runs below
            t_full, rss_full, _ = timed([*cli, str(corpus), "--out", str(full)])
            shutil.copy(full / "tokenizer.json", tok)
            shutil.rmtree(full)
        # bare, prepare --tokenizer, bare again, full: the bare rate brackets the prepare (load drifts)
        # every rate is bytes / the subprocess's wall time (interpreter and imports included in all)
        t_bare1, rss_bare, _ = timed([sys.executable, "-c", BARE, str(corpus), str(tok)])
        t_given, rss_given, _ = timed([*cli, str(corpus), "--out", str(given), "--tokenizer", str(tok)])
        t_bare2, _, _ = timed([sys.executable, "-c", BARE, str(corpus), str(tok)])
        t_full, rss_full, _ = timed([*cli, str(corpus), "--out", str(full)])
        bare = [n_bytes / 1e6 / t for t in (t_bare1, t_bare2)]
        meta = json.loads((full / "meta.json").read_text())
        row = {"corpus_mb": n_bytes / 1e6, "tokens": meta["train_tokens"] + meta["val_tokens"],
               "bare_encode_mb_s": sum(bare) / 2, "bare_before_after": bare,
               "prepare_given_tok_mb_s": n_bytes / 1e6 / t_given, "prepare_full_mb_s": n_bytes / 1e6 / t_full,
               "peak_rss_gib_bare": rss_bare, "peak_rss_gib_given": rss_given, "peak_rss_gib_full": rss_full}
        row["ratio_given_vs_bare"] = row["prepare_given_tok_mb_s"] / row["bare_encode_mb_s"]
        row["ratio_full_vs_bare"] = row["prepare_full_mb_s"] / row["bare_encode_mb_s"]
        row.update(sampler_bench(given, 1_000_000))
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
