"""prepare-data throughput and peak memory against the bare tokenizer, side by side in one run.

For each corpus size (generated from the local stdlib's .py files, lines shuffled per copy so BPE
sees new text), three subprocesses, each timed, its peak RSS read by GNU time (``/usr/bin/time -f %M``):

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
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

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
    """(wall seconds, peak RSS of the child in GiB from GNU time's %M, stdout) of one subprocess."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    t0 = time.monotonic()
    r = subprocess.run(["/usr/bin/time", "-f", "__RSS_KIB %M", *cmd], env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    kib = int(r.stderr.rsplit("__RSS_KIB", 1)[1].split()[0])
    return wall, kib / 2**20, r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[100.0])
    ap.add_argument("--work", default="/tmp/prepare-bench")
    ap.add_argument("--vocab-size", type=int, default=4096)
    args = ap.parse_args()
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
        t_bare, _, out = timed([sys.executable, "-c", BARE, str(corpus), str(work / "tokenizer.json")]) \
            if (work / "tokenizer.json").is_file() else (None, None, None)
        t_full, rss_full, _ = timed([*cli, str(corpus), "--out", str(full)])
        if t_bare is None:
            shutil.copy(full / "tokenizer.json", work / "tokenizer.json")
            t_bare, _, out = timed([sys.executable, "-c", BARE, str(corpus), str(work / "tokenizer.json")])
        bare_bytes, bare_encode_s = out.split()
        t_given, rss_given, _ = timed([*cli, str(corpus), "--out", str(given), "--tokenizer", str(work / "tokenizer.json")])
        meta = json.loads((full / "meta.json").read_text())
        row = {"corpus_mb": n_bytes / 1e6, "tokens": meta["train_tokens"] + meta["val_tokens"],
               "bare_encode_mb_s": int(bare_bytes) / 1e6 / float(bare_encode_s),
               "prepare_given_tok_mb_s": n_bytes / 1e6 / t_given, "prepare_full_mb_s": n_bytes / 1e6 / t_full,
               "peak_rss_gib_full": rss_full, "peak_rss_gib_given": rss_given}
        row["ratio_given_vs_bare"] = row["prepare_given_tok_mb_s"] / row["bare_encode_mb_s"]
        row["ratio_full_vs_bare"] = row["prepare_full_mb_s"] / row["bare_encode_mb_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
