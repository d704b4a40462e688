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


def test_rotated_rounds_start_one_later_each_round():
    calls: list[str] = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    kit.interleaved(fns, reps=3, warmup=1, rotate=True)
    # warm-up round 0, then rounds 0, 1, 2: each starts one callable later
    assert "".join(calls) == "abc" + "abc" + "bca" + "cab"
    assert kit.round_order(["a", "b"], 5, rotate=False) == ["a", "b"]


def test_self_timed_callables_report_their_own_seconds():
    times = iter([0.5, 0.25, 0.75, 1.0])
    t = kit.interleaved({"x": lambda: next(times), "y": lambda: 2.0}, reps=2, warmup=1, self_timed=True)
    assert t["x"].samples == [0.25, 0.75]  # the warm-up's 0.5 is left out
    assert t["y"].samples == [2.0, 2.0]


def test_timing_statistics_on_known_numbers():
    t = kit.Timing([3.0, 1.0, 2.0, 10.0])
    assert t.median == 2.5 and t.best == 1.0 and t.mean == 4.0
    assert t.spread == (10.0 - 1.0) / 2.5
    assert kit.Timing([0.0, 0.0]).spread == 0.0


def test_run_process_reads_the_childs_peak_rss_and_status(tmp_path):
    code = "import sys; a = bytearray(96 * 2**20); a[::4096] = b'x' * len(a[::4096]); print('ok'); sys.exit(3)"
    p = kit.run_process([sys.executable, "-c", code])
    assert p.returncode == 3 and p.stdout.strip() == "ok" and p.wall_s > 0
    assert p.peak_rss_bytes >= 96 * 2**20  # the touched 96 MiB, plus the interpreter
    small = kit.run_process([sys.executable, "-c", "pass"])
    assert small.peak_rss_bytes < p.peak_rss_bytes - 64 * 2**20


def test_run_process_times_out_and_kills_the_child():
    import subprocess

    import pytest

    t0 = time.perf_counter()
    with pytest.raises(subprocess.TimeoutExpired):
        kit.run_process([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert time.perf_counter() - t0 < 10


def test_read_jsonl(tmp_path):
    log = tmp_path / "log.jsonl"
    assert kit.read_jsonl(log) == []
    log.write_text('{"step": 1}\n{"step": 2, "val_loss": 3.5}\n')
    assert kit.read_jsonl(log) == [{"step": 1}, {"step": 2, "val_loss": 3.5}]


def test_rss_bytes_grows_with_a_touched_allocation():
    import numpy as np

    before = kit.rss_bytes()
    a = np.ones(32 * 2**20 // 8)  # 32 MiB, touched
    assert kit.rss_bytes() - before >= 24 * 2**20
    del a
