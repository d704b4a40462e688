"""Fault injection for tests/test_reliability.py (and docs/reliability.md), kept out of the package.

Two uses:

``python tests/faults.py kill-trials --trials 24 --seed 0 --dir DIR``
    kill -9 a training run while it writes a checkpoint, then resume it, many times; prints one JSON
    object per trial. Each run is a ``fork()`` of this one process (torch imported once), so a trial
    costs a tiny model's few steps, not an interpreter start. Two kinds of trial:

    * ``point``: the child SIGKILLs itself at a chosen point of a chosen save (a seeded random
      (step, point) pair; points cover every stage: temp dir made, a file half written, each file
      written, each fsync, just before and just after the rename, in the middle of pruning), so
      every stage is hit and the expected newest checkpoint is known exactly;
    * ``timer``: the child's writes are slowed by a few ms each, and the parent sends SIGKILL at a
      seeded random delay after the temp dir of a chosen save appears: a moment nobody chose.

    A trial passes when the newest complete checkpoint is the expected one (point trials) and is
    loadable, no temp/trash dir is ever taken for a checkpoint, ``--resume RUN`` exits 0, cleans
    the leftovers, and continues with per-step losses and final weights equal to an uninterrupted
    run's.

``[torchrun ...] python tests/faults.py train ARGS``   with ``NANOCHAT_FAULT=raise@rank1:step5``
    (or ``kill@...``): the ordinary CLI, except that the named rank raises (or SIGKILLs itself)
    while computing that step.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

from nanochat_ternary.checkpoint import files as ck
from nanochat_ternary.cli import main as cli_main

TOTAL_STEPS = 6
POINTS = ["mkdtemp", "model_partial", "after_model", "trainer_partial", "after_trainer", "after_tokenizer",
          "after_meta", "fsync", "before_rename", "after_rename", "prune_midway"]
# points after which the save being killed is complete (renamed into place)
COMPLETE_AFTER = {"after_rename", "prune_midway"}

TINY = ["--dataset", "synthetic", "--n-samples", "120", "--set", "dim=32", "--set", "n_layers=1",
        "--set", "n_heads=2", "--set", "n_kv_heads=1", "--set", "group_size=32", "--batch-size", "4",
        "--seq-len", "16", "--sample-tokens", "0", "--log-interval", "1", "--eval-interval", "0",
        "--set", "eval_batches=1", "--threads", "1", "--device", "cpu", "--seed", "3"]


def train_args(run: Path, log: Path) -> list[str]:
    return ["train", *TINY, "--total-steps", str(TOTAL_STEPS), "--checkpoint-dir", str(run),
            "--checkpoint-interval", "1", "--keep-last-checkpoints", "2", "--log-file", str(log)]


# ---------------------------------------------------------------------------------------------
# forked runs


def _fork(fn, out: Path) -> int:
    """Run ``fn() -> int`` in a forked child with its output in ``out``; return the child's pid."""
    pid = os.fork()
    if pid == 0:  # child
        code = 70
        try:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = os.fdopen(1, "w", buffering=1)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            code = fn()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def _wait(pid: int, timeout: float = 120.0) -> int:
    """Wait status -> exit code, or -signal number."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -999
        time.sleep(0.002)


def _instrument(target_save: int, point: str, slow_s: float = 0.0) -> None:
    """In the child: make the save functions SIGKILL this process at ``point`` of save number
    ``target_save`` (1-based; 0: never), optionally sleeping ``slow_s`` at every stage."""
    state = {"save": 0}
    rng = random.Random(target_save * 100 + POINTS.index(point) if point in POINTS else 0)

    def at(name: str) -> None:
        if slow_s:
            time.sleep(slow_s)
        if state["save"] == target_save and name == point:
            os.kill(os.getpid(), signal.SIGKILL)

    def partial(path: Path) -> None:  # a file cut short, as a kill mid-write leaves it
        data = path.read_bytes()
        path.write_bytes(data[: rng.randrange(1, max(2, len(data)))])

    orig_save, orig_model, orig_torch_save = ck.save_checkpoint, ck.save_model, torch.save
    orig_copy, orig_fsync, orig_rename, orig_rmtree = shutil.copyfile, ck._fsync, os.rename, shutil.rmtree
    orig_mkdtemp = ck.tempfile.mkdtemp

    def save_checkpoint(*a, **k):
        state["save"] += 1
        return orig_save(*a, **k)

    def mkdtemp(*a, **k):
        d = orig_mkdtemp(*a, **k)
        at("mkdtemp")
        return d

    def save_model(model, filename, *a, **k):
        orig_model(model, filename, *a, **k)
        if state["save"] == target_save and point == "model_partial":
            partial(Path(filename))
        at("model_partial")
        at("after_model")

    def torch_save(obj, f, *a, **k):
        orig_torch_save(obj, f, *a, **k)
        if state["save"] == target_save and point == "trainer_partial" and isinstance(f, (str, Path)):
            partial(Path(f))
        at("trainer_partial")
        at("after_trainer")

    def copyfile(src, dst, *a, **k):
        r = orig_copy(src, dst, *a, **k)
        at("after_tokenizer")
        return r

    fsyncs = {"n": 0}

    def fsync(path):
        if Path(path).name == "meta.json":
            at("after_meta")
        fsyncs["n"] += 1
        if fsyncs["n"] % 3 == 0:  # some fsync in the middle of the sequence
            at("fsync")
        orig_fsync(path)

    def rename(src, dst, *a, **k):
        if Path(dst).name.startswith("step_"):
            at("before_rename")
            orig_rename(src, dst, *a, **k)
            at("after_rename")
        else:
            orig_rename(src, dst, *a, **k)

    def rmtree(path, *a, **k):
        p = Path(path)
        if p.name.startswith(".trash-") and p.is_dir():
            files = sorted(p.iterdir())
            if files:
                files[0].unlink()  # half-deleted
            at("prune_midway")
        return orig_rmtree(path, *a, **k)

    ck.save_checkpoint = save_checkpoint
    ck.tempfile.mkdtemp = mkdtemp
    ck.save_model = save_model
    torch.save = torch_save
    shutil.copyfile = copyfile
    ck._fsync = fsync
    os.rename = rename
    shutil.rmtree = rmtree


def _train_child(argv: list[str], save: int = 0, point: str = "", slow_s: float = 0.0) -> int:
    if save or slow_s:
        _instrument(save, point, slow_s)
    return cli_main(argv)


def _losses(log: Path) -> dict[int, float]:
    if not log.is_file():
        return {}
    return {r["step"]: r["loss"] for r in map(json.loads, log.read_text().splitlines())}


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def _check_all_loadable(run: Path) -> bool:
    for c in ck.list_checkpoints(run):
        ck.read_meta(c)
        ck.load_trainer_state(c)
        _weights(c)
    return True


def run_trials(n: int, seed: int, work: Path, timer_trials: int) -> list[dict]:
    """``n`` kill trials (the last ``timer_trials`` of them timer-based); one result dict each."""
    torch.set_num_threads(1)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("NANOCHAT_CACHE", str(work / "cache"))
    ref_run, ref_log = work / "ref", work / "ref.jsonl"
    # the reference run in this process: it also imports everything once (torch's optimizers pull in
    # torch._dynamo, ~7 s here), so the forked trial runs start warm
    with open(work / "ref.out", "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = cli_main(train_args(ref_run, ref_log))
    assert rc == 0, (work / "ref.out").read_text()[-2000:]
    ref_losses = _losses(ref_log)
    ref_final = _weights(ref_run / ck.step_dir_name(TOTAL_STEPS))
    rng = random.Random(seed)
    results = []
    for i in range(n):
        kind = "timer" if i >= n - timer_trials else "point"
        d = work / f"trial{i:02d}"
        run, log = d / "run", d / "log.jsonl"
        d.mkdir()
        r: dict = {"trial": i, "kind": kind}
        if kind == "point":
            point = POINTS[i % len(POINTS)]  # every point at least twice in 22 trials
            first = 3 if point == "prune_midway" else 2  # pruning starts at the 3rd save (keep 2)
            save = rng.randint(first, TOTAL_STEPS)
            r.update(save=save, point=point)
            expected = save if point in COMPLETE_AFTER else save - 1
            rc = _wait(_fork(functools.partial(_train_child, train_args(run, log), save, point), d / "kill.out"))
        else:
            save, delay = rng.randint(2, TOTAL_STEPS - 1), rng.uniform(0.0, 0.05)  # leave one to resume
            r.update(save=save, delay_ms=round(delay * 1000, 1))
            expected = None
            pid = _fork(functools.partial(_train_child, train_args(run, log), slow_s=0.004), d / "kill.out")
            prefix = f".tmp-{ck.step_dir_name(save)}-"
            t_end = time.monotonic() + 60
            rc = None  # set if the child ended before the kill (then reaped here, not in _wait)
            while time.monotonic() < t_end and not any(p.name.startswith(prefix) for p in run.glob(".tmp-*")):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    rc = os.waitstatus_to_exitcode(status)
                    break
                time.sleep(0.0005)
            if rc is None:
                time.sleep(delay)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                rc = _wait(pid)
            else:  # not killed: say why in the trial's record
                r["child_exit"] = rc
                r["child_output"] = (d / "kill.out").read_text(errors="replace")[-1500:]
        r["killed"] = rc == -signal.SIGKILL
        stale = sorted(p.name for p in run.iterdir() if ck.STALE.match(p.name)) if run.is_dir() else []
        complete = ck.list_checkpoints(run)
        newest = int(complete[-1].name[5:]) if complete else 0
        r.update(stale_before=stale, newest=newest)
        try:
            picked = ck.resolve_checkpoint(run).name if complete else None
            r["picked_is_step_dir"] = picked is None or picked.startswith("step_")
            r["loadable"] = _check_all_loadable(run)
        except Exception as e:  # noqa: BLE001 - reported, not raised
            r["picked_is_step_dir"], r["loadable"] = False, f"{type(e).__name__}: {e}"
        ok = r["killed"] and r["picked_is_step_dir"] and r["loadable"] is True
        if expected is not None:
            r["expected"] = expected
            ok = ok and newest == expected
        if newest > 0:  # resume what is there
            rlog = d / "resume.jsonl"
            rrc = _wait(_fork(functools.partial(_train_child, ["train", "--resume", str(run), "--log-file", str(rlog)]),
                              d / "resume.out"))
            got = _losses(rlog)
            diffs = [abs(got[s] - ref_losses[s]) for s in got]
            r.update(resume_rc=rrc, resumed_steps=sorted(got), max_loss_diff=max(diffs, default=0.0))
            final = run / ck.step_dir_name(TOTAL_STEPS)
            r["final_weights_equal"] = final.is_dir() and all(
                torch.equal(v, ref_final[k]) for k, v in _weights(final).items())
            r["leftovers_after"] = sorted(p.name for p in run.iterdir() if ck.STALE.match(p.name))
            ok = (ok and rrc == 0 and sorted(got) == list(range(newest + 1, TOTAL_STEPS + 1))
                  and r["max_loss_diff"] == 0.0 and r["final_weights_equal"] and not r["leftovers_after"])
        r["ok"] = bool(ok)
        results.append(r)
    return results


# ---------------------------------------------------------------------------------------------
# a failing rank under torchrun


def _install_rank_fault(spec: str) -> None:
    """``raise@rank1:step5`` / ``kill@rank1:step5``: that rank fails while computing that step."""
    from nanochat_ternary.train.trainer import Trainer

    action, where = spec.split("@")
    rank_s, step_s = where.split(":")
    rank, at_step = int(rank_s.removeprefix("rank")), int(step_s.removeprefix("step"))
    orig = Trainer.train_step

    def train_step(self, step, source=None):
        if self.rt.rank == rank and step + 1 == at_step:
            print(f"fault-time {time.time():.3f}", file=sys.stderr, flush=True)
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault: rank {rank} failed at step {at_step}")
        return orig(self, step, source)

    Trainer.train_step = train_step


def main(argv: list[str]) -> int:
    if argv and argv[0] == "kill-trials":
        # The trials train on the CPU in forked children. On a CUDA host the parent's own backward
        # (the reference run) would start autograd's per-device worker threads, after which no forked
        # child can run a backward ("Unable to handle autograd's threading in combination with
        # fork-based multiprocessing"): hide the GPUs before anything touches CUDA.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        p = argparse.ArgumentParser()
        p.add_argument("cmd")
        p.add_argument("--trials", type=int, default=24)
        p.add_argument("--timer-trials", type=int, default=6)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--dir", required=True)
        a = p.parse_args(argv)
        for r in run_trials(a.trials, a.seed, Path(a.dir), a.timer_trials):
            print(json.dumps(r), flush=True)
        return 0
    if os.environ.get("NANOCHAT_FAULT"):
        _install_rank_fault(os.environ["NANOCHAT_FAULT"])
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
