"""benchmarks/kit.py: the shared measurement kit."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import kit  # noqa: E402


def test_interleaved_times_round_robin_and_orders_by_cost():
    calls: list[str] = []
    fns = {"fast": lambda: calls.append("f"), "slow": lambda: (calls.append("s"), time.sleep(0.02))}
    t = kit.interleaved(fns, reps=3, warmup=1)
    assert calls == ["f", "s"] * 4  # warm-up round, then A B A B A B
    assert len(t["fast"].samples) == 3 and t["slow"].median > t["fast"].median
    assert t["slow"].median >= 0.02


def test_header_names_commit_machine_and_settings(capsys):
    info = kit.header("unit", tokens=8)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# unit: nanochat-ternary") and "UTC" in out[0]
    assert out[1].startswith("# machine:") and info["machine"]["cpu_capability"] in out[1]
    assert out[2] == "# settings: tokens=8"


def test_peak_memory_sees_an_allocation_on_cpu():
    import numpy as np

    def alloc():
        a = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        return float(a.sum())

    peak = kit.peak_memory(alloc)
    if peak is None:  # no /proc/self/clear_refs here
        return
    assert peak >= 48 * 2**20
