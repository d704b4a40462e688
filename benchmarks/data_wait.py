"""The data-wait share: how long a training step waits for its batch, next to how long it computes.

Why: MinatoLoader (EuroSys 2026) removes head-of-line blocking when per-sample preprocessing time
varies. Our batches are slices of a memory-mapped, pre-tokenized token file, all of equal cost, so
there should be nothing for it to fix; this measures whether that holds at GPU step rates.

What runs: the trainer's own batch sources (``data/loader.py``: sync = ``TokenBatches.get`` on the
training thread; async = ``AsyncBatches`` with worker processes), feeding a consumer that "trains"
for a fixed step time (``time.sleep``, so the workers get the CPU as they would beside a GPU).
The step times default to the H100 figures of docs/gpu.md (commit 3391f6d): d20 64 x 512 at
25.8 ms/step, nano-125m 32 x 1024 at 71.2 ms, nano-1b 8 x 2048 at 279 ms. Two token sources:
the default corpus (the stdlib, prepared and cached) and a large ``tokens`` file of random ids
(``--large-tokens``, default 2^30 = 1.07 G tokens, 2 GiB as uint16; written once to a temp dir).
Reported per (source, shape, mode): mean and p99 wait per step, and the share
``wait / (wait + step time)``. Not included: the host-to-device copy (32K int64 ids are 256 KiB,
~20 us over PCIe 4), which is the same for any loader.

    python benchmarks/data_wait.py                     # ~2 min, 2 GiB of temp disk
    python benchmarks/data_wait.py --steps 200 --large-tokens 0   # the default corpus only
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import kit  # benchmarks/kit.py: provenance
import numpy as np

from nanochat_ternary.data.batches import TokenBatches
from nanochat_ternary.data.datasets import load_dataset
from nanochat_ternary.data.loader import make_batch_source
from nanochat_ternary.data.tokenfile import read_tokens, write_tokens

# (batch, seq_len, step seconds on one H100 from docs/gpu.md)
SHAPES = {"d20": (64, 512, 0.0258), "nano-125m": (32, 1024, 0.0712), "nano-1b": (8, 2048, 0.279)}


def large_token_file(path: Path, n_tokens: int, vocab: int = 50257) -> np.ndarray:
    """A ``tokens`` file of ``n_tokens`` random ids, written in 64M-token chunks; memory-mapped back."""
    rng = np.random.default_rng(0)
    chunk = 1 << 26
    write_tokens(path, (rng.integers(0, vocab, size=min(chunk, n_tokens - i), dtype=np.uint16)
                        for i in range(0, n_tokens, chunk)), vocab)
    return read_tokens(path)


def drop_page_cache(path: Path) -> None:
    """Evict the file's pages from the OS cache (no root needed), so reads come from the disk, as for
    a corpus larger than RAM."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure(tokens: np.ndarray, batch: int, seq_len: int, step_s: float, steps: int, use_async: bool,
            workers: int) -> list[float]:
    """Seconds the consumer blocked in ``next()`` for each of ``steps`` steps (first two dropped:
    the async workers' start-up)."""
    import torch

    batches = TokenBatches(tokens, batch, seq_len, seed=1)
    source = make_batch_source(batches, 0, steps + 2, use_async=use_async, num_workers=workers,
                               prefetch_batches=4, device=torch.device("cpu"))
    waits = []
    try:
        for _ in range(steps + 2):
            t0 = time.perf_counter()
            source.next()
            waits.append(time.perf_counter() - t0)
            time.sleep(step_s)  # the step's compute
    finally:
        source.close()
    return waits[2:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--large-tokens", type=int, default=1 << 30, help="0: skip the large token file")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    kit.header("data_wait", steps_per_case=args.steps, async_workers=args.workers, large_tokens=args.large_tokens)
    sources = {"stdlib (default corpus)": (load_dataset("stdlib", show_progress=False).train, None)}
    tmp = tempfile.TemporaryDirectory(prefix="data-wait-")
    if args.large_tokens:
        t0 = time.perf_counter()
        big = Path(tmp.name) / "big.bin"
        sources[f"{args.large_tokens / 1e9:.2f}G-token file, cold"] = (large_token_file(big, args.large_tokens), big)
        print(f"# wrote the large token file in {time.perf_counter() - t0:.0f} s; its pages are evicted from the "
              f"OS cache before each case")
    print(f"{'source':<32} {'shape (step)':<26} {'mode':<6} {'mean wait':>10} {'p99 wait':>10} {'share':>8}")
    for name, (tokens, path) in sources.items():
        for shape, (b, t, step_s) in SHAPES.items():
            for use_async in (False, True):
                if path is not None:
                    drop_page_cache(path)
                w = measure(tokens, b, t, step_s, args.steps, use_async, args.workers)
                mean, p99 = statistics.mean(w), float(np.percentile(w, 99))
                print(f"{name:<32} {f'{shape} {b}x{t} ({step_s * 1e3:.0f} ms)':<26} "
                      f"{'async' if use_async else 'sync':<6} {mean * 1e3:>8.3f}ms {p99 * 1e3:>8.3f}ms "
                      f"{mean / (mean + step_s):>8.2%}", flush=True)
    tmp.cleanup()


if __name__ == "__main__":
    main()
