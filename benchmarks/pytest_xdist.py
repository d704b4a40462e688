"""The test suite on both cores (``pytest -n 2``, as ``make test`` runs it) against one process (``-n 0``).

Both ways run the same test files, interleaved round by round with the order rotating
(``kit.interleaved``), each a fresh ``python -m pytest`` process timed from start to exit (start-up,
collection and xdist's worker start included: what a user waits for). Reported: the median wall time
of each and the ratio one process / ``-n 2`` (> 1: ``-n 2`` is faster).

    python benchmarks/pytest_xdist.py                     # a 6-file subset, 3 rounds (~10 min loaded)
    python benchmarks/pytest_xdist.py --files all --rounds 1   # the whole suite (on an idle machine)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import kit  # benchmarks/kit.py: provenance, interleaved timing, child processes

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ["test_model.py", "test_generate.py", "test_config.py", "test_data.py", "test_quantized.py",
          "test_checkpoint.py"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", default=",".join(SUBSET), help="comma-separated files under tests/, or 'all'")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", default="2", help="the -n of the parallel side (make test: 2)")
    args = ap.parse_args()
    files = ["tests"] if args.files == "all" else [f"tests/{f}" for f in args.files.split(",")]

    def run(n: str) -> None:
        p = kit.run_process([sys.executable, "-m", "pytest", "-n", n, "-p", "no:cacheprovider", *files],
                            env={"PYTHONPATH": str(ROOT / "src")}, cwd=ROOT)
        if p.returncode != 0:
            raise SystemExit(f"pytest -n {n} failed (exit {p.returncode}):\n{p.stdout[-3000:]}{p.stderr[-2000:]}")

    kit.header("pytest_xdist", files=args.files, rounds=args.rounds, workers=args.workers)
    parallel, single = f"-n {args.workers}", "one process (-n 0)"
    t = kit.interleaved({parallel: lambda: run(args.workers), single: lambda: run("0")}, reps=args.rounds,
                        warmup=0, rotate=True)
    kit.print_ratios(t, parallel, unit="s/run")
    print(f"one process / {parallel}: {t[single].median / t[parallel].median:.2f}x")


if __name__ == "__main__":
    main()
