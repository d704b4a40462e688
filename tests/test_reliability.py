"""Runs that survive faults: each test injects one and checks what survives (docs/reliability.md).

Preemption signals, kill -9 during checkpoint writes (tests/faults.py runs the trials), fsync
order, stale temp dirs, non-finite steps, a full disk, a dead torchrun rank, two runs in one dir,
resume on other data, a malicious ``trainer.pt``, and an empty prompt. Tiny models, one thread,
every subprocess with a timeout.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_corpus
from faults import POINTS, TINY
from safetensors.torch import load_file

from nanochat_ternary.checkpoint import files as ck
from nanochat_ternary.cli import main
from nanochat_ternary.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NANOCHAT_CACHE", str(tmp_path_factory.getbasetemp() / "nanochat-cache"))


def _train(run: Path, *args: str, log: Path | None = None) -> int:
    extra = ["--log-file", str(log)] if log else []
    return main(["train", *TINY, "--checkpoint-dir", str(run), *extra, *args])


def _losses(log: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, log.read_text().splitlines())}


def _records(log: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, log.read_text().splitlines())}


def _names(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir())


def _loadable(ckpt: Path) -> dict[str, torch.Tensor]:
    ck.read_meta(ckpt)
    ck.load_trainer_state(ckpt)
    return load_file(str(ckpt / "model.safetensors"))


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(HERE.parent / "src"), str(HERE), os.environ.get("PYTHONPATH", "")])}


# ---------------------------------------------------------------------------------------------
# preemption: SIGTERM / SIGINT / SIGUSR1


# lr flat after 2 warmup steps: the schedule does not depend on total_steps, so a run told to go on
# "forever" and stopped by a signal follows the same trajectory as a 20-step reference
FLAT = ["--set", "warmup_steps=2", "--set", "decay_start_frac=1.0"]


def test_sigterm_from_outside_saves_last_finished_step_exits_75_and_resume_is_exact(tmp_path):
    """The real entry point in its own process, signalled from outside at a moment it does not choose."""
    ref_log = tmp_path / "ref.jsonl"
    assert _train(tmp_path / "ref", *FLAT, "--total-steps", "20", log=ref_log) == 0
    ref = _losses(ref_log)
    run, log = tmp_path / "run", tmp_path / "log.jsonl"
    with open(tmp_path / "err.txt", "w") as err_f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nanochat_ternary.cli", "train", *TINY, *FLAT, "--total-steps", "100000",
             "--checkpoint-dir", str(run), "--log-file", str(log)],
            stdout=subprocess.DEVNULL, stderr=err_f, env=_env())
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 3):
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=60)
        finally:
            proc.kill()
    err = (tmp_path / "err.txt").read_text()
    assert rc == 75, (rc, err[-2000:])
    logged = _losses(log)
    stop = max(logged)  # the checkpoint is the last step that finished (and was logged)
    assert 3 <= stop < 20, stop
    assert _names(run) == [".lock", f"step_{stop:06d}"]
    assert f"stopped: SIGTERM at step {stop}: checkpoint saved in" in err and "Traceback" not in err
    assert all(abs(logged[s] - ref[s]) <= 1e-6 for s in logged)
    rlog = tmp_path / "resumed.jsonl"
    assert main(["train", "--resume", str(run), "--total-steps", "20", "--log-file", str(rlog)]) == 0
    resumed = _losses(rlog)
    assert sorted(resumed) == list(range(stop + 1, 21))
    for s in resumed:
        assert abs(resumed[s] - ref[s]) <= 1e-6, (s, resumed[s], ref[s])


def _signal_at_eval(monkeypatch, times: int, sig: int = signal.SIGINT) -> None:
    """Send ``sig`` ``times`` times from inside the first evaluation: after the step's update."""
    orig, fired = Trainer.evaluate, []

    def evaluate(self):
        if not fired:
            fired.append(True)
            for _ in range(times):
                os.kill(os.getpid(), sig)
        return orig(self)

    monkeypatch.setattr(Trainer, "evaluate", evaluate)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR1, signal.SIGTERM], ids=lambda s: s.name)
def test_signal_after_the_update_of_step_n_saves_step_n_and_resume_is_exact(tmp_path, monkeypatch, capsys, sig):
    """A signal during step 4's evaluation (its update already applied) saves ``step_000004``, not
    a checkpoint named 3 holding step 4's weights (issue #14), and exits 75."""
    straight = tmp_path / "straight.jsonl"
    assert _train(tmp_path / "a", "--total-steps", "8", "--eval-interval", "4", log=straight) == 0
    _signal_at_eval(monkeypatch, times=1, sig=sig)
    capsys.readouterr()
    assert _train(tmp_path / "b", "--total-steps", "8", "--eval-interval", "4", log=tmp_path / "b.jsonl") == 75
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert f"stopped: {sig.name} at step 4: checkpoint saved in {tmp_path / 'b' / 'step_000004'}" in err
    assert [p.name for p in ck.list_checkpoints(tmp_path / "b")] == ["step_000004"]
    assert ck.read_meta(tmp_path / "b" / "step_000004")["step"] == 4
    resumed = tmp_path / "resumed.jsonl"
    assert main(["train", "--resume", str(tmp_path / "b"), "--log-file", str(resumed)]) == 0
    a, r = _losses(straight), _losses(resumed)
    assert sorted(r) == [5, 6, 7, 8]
    for s in r:
        assert abs(a[s] - r[s]) <= 1e-6, (s, a[s], r[s])


def test_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path, monkeypatch, capsys):
    _signal_at_eval(monkeypatch, times=2)
    run = tmp_path / "run"
    assert _train(run, "--total-steps", "8", "--eval-interval", "4", "--checkpoint-interval", "2") == 130
    assert [p.name for p in ck.list_checkpoints(run)] == ["step_000002"]
    err = capsys.readouterr().err
    assert "interrupted again: stopped at once without saving" in err and "step_000002" in err


# ---------------------------------------------------------------------------------------------
# crash during a checkpoint write


def _trial_failure(r: dict, work: Path) -> str:
    """One failed kill trial, with the tail of its child's output (pytest would cut the dict short)."""
    fields = {k: v for k, v in r.items() if k not in ("child_output", "stale_before")}
    out = work / f"trial{r['trial']:02d}" / "kill.out"
    tail = out.read_text(errors="replace")[-800:] if out.is_file() else "(no child output)"
    return f"{fields}\n  child output: ...{tail}"


def test_kill9_during_checkpoint_writes_resume_picks_newest_complete_and_continues_exactly(tmp_path):
    """26 trials (22 at chosen points of a save, every point twice; 4 at timed random moments)."""
    proc = subprocess.run([sys.executable, str(HERE / "faults.py"), "kill-trials", "--trials", "26",
                           "--timer-trials", "4", "--seed", "0", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 26
    failed = [r for r in results if not r["ok"]]
    assert not failed, "\n".join(_trial_failure(r, tmp_path) for r in failed[:4])
    assert sorted({r["point"] for r in results if r["kind"] == "point"}) == sorted(POINTS)
    # the faults were real: killed by SIGKILL, temp dirs left behind, and resumes that had work to do
    assert all(r["killed"] for r in results)
    assert sum(bool(r["stale_before"]) for r in results) >= 15
    assert sum(len(r.get("resumed_steps", [])) for r in results) >= 40


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="maps fds to paths through /proc (Linux)")
def test_checkpoint_files_are_fsynced_before_the_rename_and_the_dir_after(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(Path(dst).resolve())))
        real_rename(src, dst)

    monkeypatch.setattr(ck.os, "fsync", fsync)
    monkeypatch.setattr(ck.os, "rename", rename)
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    model = torch.nn.Linear(3, 2)
    run = tmp_path / "run"
    final = ck.save_checkpoint(run, 3, model, {"optimizers": []}, {"config": {}}, tokenizer_path=tok)
    at = events.index(("rename", str(final.resolve())))
    before = [Path(p) for kind, p in events[:at] if kind == "fsync"]
    assert {p.name for p in before} >= {"model.safetensors", "trainer.pt", "meta.json", "tokenizer.json"}
    assert any(p.name.startswith(".tmp-step_000003") for p in before)  # the temp dir's entries
    assert ("fsync", str(run.resolve())) in events[at + 1:]  # the rename itself


def test_stale_temp_dirs_are_never_picked_and_are_cleaned_by_the_next_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "--total-steps", "2") == 0
    # a crashed save of a later step that got as far as writing every file, and a crashed prune
    shutil.copytree(run / "step_000002", run / ".tmp-step_000009-x1y2")
    shutil.copytree(run / "step_000002", run / ".trash-step_000001-4242")
    assert ck.resolve_checkpoint(run).name == "step_000002"
    assert [p.name for p in ck.list_checkpoints(run)] == ["step_000002"]
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--total-steps", "3"]) == 0
    assert "removed 2 unfinished checkpoint write(s) left by a crash" in capsys.readouterr().out
    assert _names(run) == [".lock", "step_000002", "step_000003"]


# ---------------------------------------------------------------------------------------------
# divergence


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def _poison(monkeypatch, nan_forward: set[int], nan_grad: set[int]) -> None:
    """NaN activations (so a NaN loss) or NaN gradients at the given training steps (1-based),
    injected at the token embedding's output."""
    orig, calls = torch.nn.Embedding.forward, {"n": 0}

    def forward(self, x):
        out = orig(self, x)
        if not self.training:
            return out
        calls["n"] += 1
        if calls["n"] in nan_forward:
            out = out * float("nan")
        if calls["n"] in nan_grad:
            out = _NaNGrad.apply(out)
        return out

    monkeypatch.setattr(torch.nn.Embedding, "forward", forward)


def test_non_finite_steps_are_skipped_counted_logged_and_leave_the_model_untouched(tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, nan_forward={3, 5}, nan_grad={4})
    run, log = tmp_path / "run", tmp_path / "log.jsonl"
    assert _train(run, "--total-steps", "8", "--checkpoint-interval", "1", "--keep-last-checkpoints", "0",
                  log=log) == 0
    recs = _records(log)
    assert [s for s, r in recs.items() if r.get("skipped")] == [3, 4, 5]
    assert recs[3]["loss"] is None and recs[5]["loss"] is None  # NaN logged as null
    assert recs[4]["loss"] is not None and recs[4]["grad_norm"] is None  # finite loss, NaN gradient
    assert recs[8]["skipped_steps"] == 3 and recs[2]["skipped_steps"] == 0
    err = capsys.readouterr().err
    assert err.count("update skipped") == 3
    # steps 3-5 changed nothing: weights and optimizer state at 5 are those at 2; step 6 moves on
    w2, w5, w6 = (_loadable(run / f"step_{s:06d}") for s in (2, 5, 6))
    assert all(torch.equal(w2[k], w5[k]) for k in w2)
    assert any(not torch.equal(w5[k], w6[k]) for k in w5)
    s2, s5 = (ck.load_trainer_state(run / f"step_{s:06d}")["optimizers"] for s in (2, 5))
    for o2, o5 in zip(s2, s5):
        for pid, st in o2["state"].items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(v, o5["state"][pid][k]), (pid, k)
    for s in range(1, 9):
        assert all(torch.isfinite(t).all() for t in _loadable(run / f"step_{s:06d}").values())


def test_consecutive_non_finite_steps_stop_with_one_line_naming_step_and_last_good_checkpoint(
        tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, nan_forward=set(range(3, 100)), nan_grad=set())
    run = tmp_path / "run"
    rc = _train(run, "--total-steps", "10", "--checkpoint-interval", "2", "--set", "max_consecutive_skips=3")
    assert rc == 3
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1
    assert lines[0].startswith("error: training diverged: 3 consecutive steps")
    assert "steps 3-5" in lines[0] and "stopped at step 5" in lines[0]
    assert f"last good checkpoint: {run / 'step_000004'}" in lines[0]
    assert [p.name for p in ck.list_checkpoints(run)] == ["step_000002", "step_000004"]


def test_a_checkpoint_with_non_finite_values_is_never_written(tmp_path):
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[0, 1] = float("inf")
    with pytest.raises(ck.CheckpointError, match="refusing to write checkpoint step_000001: weight holds NaN/inf"):
        ck.save_checkpoint(tmp_path, 1, model, {"optimizers": []}, {"config": {}})
    model = torch.nn.Linear(3, 2)
    state = {"optimizers": [{"state": {0: {"exp_avg": torch.tensor([float("nan")])}}}]}
    with pytest.raises(ck.CheckpointError, match="trainer.optimizers.0.state.0.exp_avg holds NaN/inf"):
        ck.save_checkpoint(tmp_path, 1, model, state, {"config": {}})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# disk full


def _disk_full_on(monkeypatch, saves: set[int]) -> None:
    """The given saves (1-based) hit ENOSPC after writing part of the weights file."""
    orig, n = ck.save_model, {"i": 0}

    def save_model(model, filename, *a, **k):
        n["i"] += 1
        if n["i"] in saves:
            Path(filename).write_bytes(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return orig(model, filename, *a, **k)

    monkeypatch.setattr(ck, "save_model", save_model)


def test_disk_full_at_an_interval_save_warns_keeps_the_previous_and_retries(tmp_path, monkeypatch, capsys):
    _disk_full_on(monkeypatch, {2})  # the save at step 4
    run = tmp_path / "run"
    assert _train(run, "--total-steps", "8", "--checkpoint-interval", "2", "--keep-last-checkpoints", "0") == 0
    assert _names(run) == [".lock", "step_000002", "step_000006", "step_000008"]  # no partial, no temp dir
    err = capsys.readouterr().err
    warn = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1, err
    assert "step_000004 (No space left on device); partial files removed" in warn[0]
    assert "retries at the next interval" in warn[0] and "step_000002" in warn[0]
    _loadable(run / "step_000002")


def test_disk_full_at_the_final_save_is_one_line_error_and_the_previous_survives(tmp_path, monkeypatch, capsys):
    _disk_full_on(monkeypatch, {2})  # the final save, at step 4
    run = tmp_path / "run"
    assert _train(run, "--total-steps", "4", "--checkpoint-interval", "2") == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "No space left on device" in err[0]
    assert err[0].endswith(f"the last checkpoint is {run / 'step_000002'}")
    assert _names(run) == [".lock", "step_000002"]
    _loadable(run / "step_000002")
    monkeypatch.undo()
    assert main(["train", "--resume", str(run)]) == 0  # the disk has room again: carry on
    assert (run / "step_000004").is_dir()


# ---------------------------------------------------------------------------------------------
# a dead rank under torchrun


@pytest.mark.parametrize("action", ["raise", "kill"])
def test_a_failing_rank_ends_the_whole_job_quickly_and_rank0_checkpoints_survive(tmp_path, action):
    run = tmp_path / "run"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(HERE / "faults.py"), "train", *TINY, "--batch-size", "2", "--total-steps", "40",
         "--checkpoint-interval", "2", "--checkpoint-dir", str(run)],
        capture_output=True, text=True, timeout=300, env={**_env(), "NANOCHAT_FAULT": f"{action}@rank1:step5"})
    ended, elapsed = time.time(), time.monotonic() - t0
    assert proc.returncode != 0
    fault_at = float(next(ln for ln in proc.stderr.splitlines() if "fault-time" in ln).split()[-1])
    assert ended - fault_at < 60, ended - fault_at  # no hang: the job ends soon after the fault
    assert elapsed < 240
    if action == "raise":
        assert "RuntimeError: injected fault: rank 1 failed at step 5" in proc.stderr
    else:  # torchrun's summary names the killed rank and its signal
        assert "rank      : 1" in proc.stderr and "Signal 9 (SIGKILL)" in proc.stderr
    # rank 0 says in one line why it stopped (unless torchrun's SIGTERM got there first)
    assert "rank 0: lost contact with the other ranks during step 5" in proc.stderr or "SIGTERM" in proc.stderr
    assert [p.name for p in ck.list_checkpoints(run)] == ["step_000002", "step_000004"]
    for c in ck.list_checkpoints(run):
        _loadable(c)


# ---------------------------------------------------------------------------------------------
# two runs, one dir


def test_a_second_run_in_a_live_runs_dir_is_refused_and_a_dead_runs_lock_does_not_stick(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    code = ("import sys, time; from pathlib import Path; from nanochat_ternary.train.lock import RunLock; "
            "RunLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert _train(run, "--total-steps", "2") == 1
        err = capsys.readouterr().err
        assert f"checkpoint dir {run} is in use by another run (pid {holder.pid} on " in err
        assert err.count("\n") == 1 and ck.list_checkpoints(run) == []
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait(timeout=30)
    assert (run / ".lock").is_file()  # the file stays; the lock died with its process
    assert _train(run, "--total-steps", "2") == 0


# ---------------------------------------------------------------------------------------------
# wrong data on resume


def test_resume_on_other_data_is_refused_unless_explicitly_allowed(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "--total-steps", "2") == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--n-samples", "160", "--total-steps", "4"]) == 1
    err = capsys.readouterr().err
    assert re.search(r"was trained on different data \(train_tokens \d+ -> \d+, train_sha256 \w+ -> \w+\)", err)
    assert "--set allow_data_change=true" in err and err.count("\n") == 1
    assert not (run / "step_000004").exists()
    assert main(["train", "--resume", str(run), "--n-samples", "160", "--total-steps", "4",
                 "--set", "allow_data_change=true"]) == 0
    assert "warning: resuming" in capsys.readouterr().err
    meta = ck.read_meta(run / "step_000004")
    assert meta["config"]["training"]["allow_data_change"] is False  # not inherited by the next resume
    assert meta["data_fingerprint"]["train_tokens"] != ck.read_meta(run / "step_000002")["data_fingerprint"][
        "train_tokens"]


def test_resume_with_another_tokenizer_is_refused(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", n_files=4, n_lines=30)
    text = ["--dataset", "text", "--data-path", str(corpus)]
    run = tmp_path / "run"
    assert _train(run, *text, "--set", "tokenizer_vocab_size=300", "--total-steps", "1") == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "tokenizer_vocab_size=290", "--total-steps", "2"]) == 1
    err = capsys.readouterr().err
    assert "was trained on different data" in err and "tokenizer_sha256" in err


# ---------------------------------------------------------------------------------------------
# safe loading


class _Payload:
    """Unpickling this runs a shell command (a real exploit, as a crafted file would carry)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_trainer_pt_is_refused_and_runs_nothing(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert _train(run, "--total-steps", "2") == 0
    ckpt = run / "step_000002"
    marker = tmp_path / "PWNED"
    torch.save({"optimizers": [], "rng": {}, "x": _Payload(marker)}, ckpt / "trainer.pt")
    torch.load(ckpt / "trainer.pt", weights_only=False)  # the exploit is real: an unsafe load runs it
    assert marker.exists()
    marker.unlink()
    loads: list[object] = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or real_load(*a, **k))
    capsys.readouterr()
    other = tmp_path / "other"
    assert main(["train", "--resume", str(ckpt), "--checkpoint-dir", str(other), "--total-steps", "4"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint ") and err.count("\n") == 1
    assert "refused trainer.pt, a pickle that could run code" in err and "posix.system" in err
    assert not marker.exists() and loads == [True]
    assert not (other / "step_000004").exists()
    # generate reads only safetensors and JSON: the bad trainer.pt is not even opened
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "ab", "--max-tokens", "4"]) == 0
    assert not marker.exists() and loads == [True]


# ---------------------------------------------------------------------------------------------
# empty prompts (issue #14)


def test_generate_and_the_final_sample_start_from_the_separator_on_an_empty_prompt(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "--total-steps", "2", "--sample-tokens", "6", "--sample-prompt", "") == 0
    out = capsys.readouterr().out
    assert "--- sample (6 tokens, prompt '') ---" in out
    assert main(["generate", "--checkpoint", str(run), "--max-tokens", "6", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and len(out) >= 2
