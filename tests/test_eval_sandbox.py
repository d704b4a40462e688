"""HumanEval: the pass@k estimator, the stop sequences, and the sandbox against hostile programs."""

from __future__ import annotations

import math
import time

import pytest

from nanochat_ternary.eval.humaneval import pass_at_k, program, read_problems, truncate_at_stop
from nanochat_ternary.eval.sandbox import Limits, run_program, sandbox_info


def _formula(n: int, c: int, k: int) -> float:
    """Chen et al. 2021, eq. 1, with exact binomials."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_is_the_papers_estimator():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_formula(n, c, k), abs=1e-12)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the share of correct samples
    assert pass_at_k(5, 0, 5) == 0.0 and pass_at_k(5, 1, 5) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_completion_stops_at_a_new_top_level_statement():
    body = "    return a + b\n"
    for tail in ("\ndef other():\n", "\nclass X:\n", "\nif __name__ == '__main__':\n", "\nprint(add(1, 2))\n",
                 "\n# tests\n"):
        assert truncate_at_stop(body + tail) == body
    assert truncate_at_stop(body + "    # an indented comment stays\n") == body + "    # an indented comment stays\n"


def test_canonical_solutions_pass_and_wrong_ones_fail():
    problems = read_problems()
    assert len(problems) == 164
    for p in problems[:3]:
        assert run_program(program(p, p["canonical_solution"]), Limits(timeout=20)).passed
        assert not run_program(program(p, "    return None\n"), Limits(timeout=20)).passed


# The hostile programs run with guard=False: the OS limits, not the Python-level guard, contain them.
GUARD = False
FAST = Limits(timeout=3, memory_mb=512, fsize_mb=4, nproc=16)


def _contained(prog: str, limits: Limits = FAST) -> tuple[object, float]:
    t0 = time.monotonic()
    r = run_program(prog, limits, guard=GUARD)
    took = time.monotonic() - t0
    assert not r.passed
    assert took < limits.timeout + 15  # bounded: the wall clock limit plus a loaded machine's slack
    return r, took


def test_sandbox_contains_an_infinite_loop():
    r, _ = _contained("while True:\n    pass\n")
    assert r.status == "timeout"


def test_sandbox_contains_a_fork_bomb():
    r, _ = _contained("import os\nwhile True:\n    os.fork()\n")
    assert r.status in ("failed", "timeout")
    time.sleep(0.5)
    ok = run_program("print('still alive')\n", FAST, guard=GUARD)  # the machine can still start processes
    assert ok.passed and "still alive" in ok.output


def test_sandbox_contains_unbounded_allocation():
    r, _ = _contained("blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))\n")
    assert "MemoryError" in r.output or r.status == "timeout"


def test_sandbox_contains_a_huge_file():
    r, _ = _contained("with open('big', 'wb') as f:\n    while True:\n        f.write(b'0' * 2**20)\n")
    assert "File too large" in r.output or r.returncode != 0


def test_sandbox_cannot_delete_or_write_outside_its_dir(tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("alive")
    outside = tmp_path / "written.txt"
    prog = (f"import os, shutil\nfor f in (lambda: os.remove({str(canary)!r}),\n"
            f"          lambda: shutil.rmtree({str(tmp_path)!r}), lambda: open({str(outside)!r}, 'w').write('x')):\n"
            "    try:\n        f()\n    except OSError as e:\n        print('refused', e)\nraise SystemExit(1)\n")
    # as root the child runs as nobody and file permissions refuse; as another user only the
    # Python-level guard stands between the program and that user's files, so it is on then
    import os

    dropped = sandbox_info()["user"].startswith("nobody")
    assert dropped or os.geteuid() != 0  # as root the drop must happen (root also ignores RLIMIT_NPROC)
    guarded = not dropped
    r = run_program(prog, FAST, guard=guarded)
    assert not r.passed
    assert canary.read_text() == "alive" and not outside.exists()


def test_sandbox_has_no_network():
    prog = ("import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=2)\n"
            "except OSError as e:\n    print('no network:', e)\n    raise SystemExit(1)\n")
    r, _ = _contained(prog)
    assert "no network" in r.output
