"""Hostile and broken inputs (issue #22): no data loss, no writes outside the run, no exit 0 on a
broken result, and one ``error:`` line instead of a traceback (docs/reliability.md, "Hostile inputs").

Each test is a case the adversarial pass found; each failed on the code before the fix. Tiny models
on synthetic data (tests/faults.py's TINY), one thread; a shared 2-step checkpoint is copied by the
tests that damage it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from faults import TINY
from safetensors.torch import load_file, save_file

import nanochat_ternary
from nanochat_ternary.checkpoint import files as ck
from nanochat_ternary.cli import main
from nanochat_ternary.config import build_config
from nanochat_ternary.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
HERE = Path(__file__).parent
SRC = Path(nanochat_ternary.__file__).resolve().parents[1]  # subprocesses run the code under test


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NANOCHAT_CACHE", str(tmp_path_factory.getbasetemp() / "nanochat-cache"))
    monkeypatch.setenv("NANOCHAT_CRASH_DIR", str(tmp_path_factory.getbasetemp()))


def _train(run: Path, *args: str) -> int:
    return main(["train", *TINY, "--checkpoint-dir", str(run), *args])


def _one_error(capsys, rc: int, *needles: str) -> str:
    """The command failed with exit 1 and exactly one ``error:`` line, no traceback; returns it."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith(("error:", "internal error:"))]
    assert rc == 1, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error:"), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 2-step run on synthetic data (no tokenizer): ``run/step_000002``."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", *TINY, "--checkpoint-dir", str(run), "--total-steps", "2"]) == 0
    return run / "step_000002"


def _copy(ckpt: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy" / ckpt.name
    shutil.copytree(ckpt, dst)
    return dst


def _digest(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


# ---------------------------------------------------------------------------------------------
# data loss


def test_resume_with_a_lower_total_never_prunes_what_it_wrote_or_resumed_from(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "--total-steps", "6", "--checkpoint-interval", "3") == 0
    assert [p.name for p in ck.list_checkpoints(run)] == ["step_000003", "step_000006"]
    rc = _train(run, "--resume", str(run / "step_000003"), "--total-steps", "5", "--keep-last-checkpoints", "1")
    assert rc == 0
    # before: only step_000006 was left, the new step_000005 and the resumed-from step_000003 pruned
    assert [p.name for p in ck.list_checkpoints(run)] == ["step_000003", "step_000005", "step_000006"]
    assert f"checkpoint: {run / 'step_000005'}" in capsys.readouterr().out


def test_keep_last_counts_the_line_being_written(tmp_path):
    """Unit: the N highest steps <= the one written; higher steps (another line) and protected ones stay."""
    model = torch.nn.Linear(2, 2)
    for s in (1, 2, 3, 8):
        ck.save_checkpoint(tmp_path, s, model, {"optimizers": []}, {"config": {}})
    ck.save_checkpoint(tmp_path, 4, model, {"optimizers": []}, {"config": {}}, keep_last=2,
                       protect=(tmp_path / "step_000001",))
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_000001", "step_000003", "step_000004",
                                                               "step_000008"]


@pytest.mark.parametrize("missing", ["trainer.pt", "all"])
def test_a_step_dir_the_run_would_write_is_refused_before_training(tmp_path, capsys, trained, missing):
    run = tmp_path / "run"
    clash = run / "step_000004"
    clash.mkdir(parents=True)
    if missing == "trainer.pt":
        for f in ("model.safetensors", "meta.json"):
            shutil.copyfile(trained / f, clash / f)
    log = tmp_path / "log.jsonl"
    rc = _train(run, "--total-steps", "4", "--log-file", str(log))
    _one_error(capsys, rc, "step_000004", "already exists")
    assert not log.exists() or log.read_text() == ""  # before: all 4 steps trained, then the save failed


@pytest.mark.parametrize("target", ["file", "step_dir", "run_dir", "parent", "other_step"])
def test_export_force_never_replaces_its_own_source(tmp_path, capsys, trained, target):
    run = tmp_path / "top" / "run"
    shutil.copytree(trained.parent, run)
    ckpt = run / "step_000002"
    shutil.copytree(ckpt, run / "step_000001")
    before = _digest(ckpt)
    out = {"file": ckpt / "model.safetensors", "step_dir": ckpt, "run_dir": run, "parent": tmp_path / "top",
           "other_step": run / "step_000001"}[target]
    rc = main(["export", "--checkpoint", str(ckpt), "--format", "hf", "--out", str(out), "--force"])
    _one_error(capsys, rc, "--out")
    assert _digest(ckpt) == before and (run / "step_000001" / "meta.json").is_file()


def test_an_unwritable_log_file_is_a_warning_and_the_run_goes_on(tmp_path, capsys):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    run = tmp_path / "run"
    rc = _train(run, "--total-steps", "3", "--log-file", "/dev/full")
    err = capsys.readouterr().err
    assert rc == 0, err
    assert err.count("warning: cannot write the metrics log /dev/full") == 1
    assert [p.name for p in ck.list_checkpoints(run)] == ["step_000003"]


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_bench_leaves_no_worker_running(tmp_path, sig):
    """SIGTERM: bench stops its worker's process group and waits for it, so the worker is gone by the
    time bench has exited. SIGKILL (nothing can be caught): the worker's parent-death signal ends it."""
    out = tmp_path / "bench"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "nanochat_ternary.cli", "bench", "--configs", "e3/baseline.toml", "--seeds", "1",
           "--steps", "100000", "--dataset", "synthetic", "--batch-size", "2", "--seq-len", "16", "--threads", "1",
           "--device", "cpu", "--out", str(out)] + [a for kv in ("dim=32", "n_layers=1", "n_heads=2", "n_kv_heads=1",
                                                                  "group_size=32", "n_samples=60", "eval_batches=1")
                                                     for a in ("--set", kv)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log = next(iter(out.glob("runs/*/seed1/metrics.jsonl")), None)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            log = next(iter(out.glob("runs/*/seed1/metrics.jsonl")), None)
            if log is not None and log.stat().st_size > 0:
                break
            time.sleep(0.5)
        assert log is not None and proc.poll() is None, proc.stdout.read() if proc.poll() is not None else "slow"
        workers = _children(proc.pid)
        assert workers, "no worker process found"
        proc.send_signal(sig)
        rc = proc.wait(timeout=90)
        deadline = time.monotonic() + (30 if sig == signal.SIGKILL else 0)
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.2)
        alive = [w for w in workers if _alive(w)]
        for w in alive:  # before the fix: the worker trained on after bench had gone
            os.kill(w, signal.SIGKILL)
        assert not alive, "the worker outlived bench"
        assert rc == (128 + sig if sig == signal.SIGTERM else -sig), proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------
# writes outside the run


@pytest.mark.parametrize("kind", ["symlink", "dir", "fifo"])
def test_a_lock_that_is_not_a_regular_file_is_refused_and_never_written(tmp_path, capsys, kind):
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    lock = run / ".lock"
    if kind == "symlink":
        lock.symlink_to(victim)
    elif kind == "dir":
        lock.mkdir()
    else:
        os.mkfifo(lock)
    rc = _train(run, "--total-steps", "1")
    _one_error(capsys, rc, "run lock")
    assert victim.read_text() == "precious\n"
    assert not ck.list_checkpoints(run)


def test_resume_of_a_moved_run_writes_into_the_dir_it_resumes_from(tmp_path, capsys):
    run1, run2 = tmp_path / "run1", tmp_path / "run2"
    assert _train(run1, "--total-steps", "2", "--log-file", str(run1 / "log.jsonl")) == 0
    shutil.move(run1, run2)
    rc = main(["train", "--resume", str(run2), "--total-steps", "3"])
    assert rc == 0, capsys.readouterr().err
    assert not run1.exists()  # before: step_000003 and the log went to run1/, named in meta.json
    assert [p.name for p in ck.list_checkpoints(run2)] == ["step_000002", "step_000003"]


# ---------------------------------------------------------------------------------------------
# exit 0 on a broken result


def test_gguf_export_of_a_model_without_a_tokenizer_is_an_error(tmp_path, capsys, trained):
    rc = main(["export", "--checkpoint", str(trained), "--format", "gguf", "--quant", "f32",
               "--out", str(tmp_path / "m.gguf")])
    _one_error(capsys, rc, "tokenizer")
    assert not list(tmp_path.iterdir())


def test_a_checkpoint_with_nan_weights_refuses_to_export(tmp_path, capsys, trained):
    ckpt = _copy(trained, tmp_path)
    w = load_file(str(ckpt / "model.safetensors"))
    name = next(k for k in w if k.startswith("blocks."))
    w[name][0, 0] = float("nan")
    save_file(w, str(ckpt / "model.safetensors"))
    rc = main(["export", "--checkpoint", str(ckpt), "--format", "packed", "--out", str(tmp_path / "m.safetensors")])
    _one_error(capsys, rc, "NaN", name)
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("setting", ["lr=inf", "adam_lr=nan", "mtp_weight=inf", "epochs=inf", "ffn_mult=1e30",
                                     "n_layers=1e12", "seed=1e30", "dim=1048576", "adam_betas=0.9,nan",
                                     "grad_clip=-inf", "rope_theta=inf"])
def test_infinite_nan_and_huge_numbers_are_refused_at_config_time(setting):
    with pytest.raises(ConfigError, match=setting.split("=")[0]) as ei:
        build_config(None, None, None, [setting])
    assert "\n" not in str(ei.value)


def test_infinite_flags_are_one_line(tmp_path, capsys):
    rc = _train(tmp_path / "run", "--epochs", "inf")
    _one_error(capsys, rc, "epochs")
    rc = _train(tmp_path / "run", "--total-steps", str(10**30))
    _one_error(capsys, rc, "total_steps")


# ---------------------------------------------------------------------------------------------
# tracebacks -> one line: files read


META_CASES = {
    "list": "[1, 2]",
    "deep": "[" * 100_000 + "]" * 100_000,
    "not utf-8": b"\xff\xfe{}",
    "step is a string": None,  # filled from the real meta
    "config is a list": None,
    "model section is a number": None,
    "fire without step": None,
}


@pytest.mark.parametrize("case", list(META_CASES))
def test_a_crafted_meta_json_is_one_line(tmp_path, capsys, trained, case):
    ckpt = _copy(trained, tmp_path)
    meta = json.loads((trained / "meta.json").read_text())
    raw = META_CASES[case]
    if case == "step is a string":
        meta["step"] = "two"
    elif case == "config is a list":
        meta["config"] = [1]
    elif case == "model section is a number":
        meta["config"]["model"] = 3
    elif case == "fire without step":
        meta["fire"] = {"via": "x"}
    if raw is None:
        raw = json.dumps(meta)
    (ckpt / "meta.json").write_bytes(raw if isinstance(raw, bytes) else raw.encode())
    rc = main(["generate", "--checkpoint", str(ckpt), "--device", "cpu", "--max-tokens", "2"])
    _one_error(capsys, rc, "meta.json")
    rc = _train(tmp_path / "r2", "--resume", str(ckpt), "--total-steps", "3")
    _one_error(capsys, rc, "meta.json")


def test_a_tensor_missing_from_model_safetensors_is_one_line(tmp_path, capsys, trained):
    ckpt = _copy(trained, tmp_path)
    w = load_file(str(ckpt / "model.safetensors"))
    name = sorted(k for k in w if k.startswith("blocks.0.attn"))[0]
    del w[name]
    save_file(w, str(ckpt / "model.safetensors"))
    rc = main(["generate", "--checkpoint", str(ckpt), "--device", "cpu", "--max-tokens", "2"])
    _one_error(capsys, rc, "does not match the model", name)


def test_a_meta_json_claiming_a_huge_model_is_refused_before_building_it(tmp_path, capsys, trained):
    ckpt = _copy(trained, tmp_path)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["config"]["model"].update(n_layers=1000, dim=8192, n_heads=64, n_kv_heads=64)  # ~ 1e11 params
    (ckpt / "meta.json").write_text(json.dumps(meta))
    rc = main(["export", "--checkpoint", str(ckpt), "--format", "packed", "--out", str(tmp_path / "m.st")])
    _one_error(capsys, rc, "model.safetensors")


@pytest.mark.parametrize("state", [[1, 2], {"optimizers": 3}, {"optimizers": [{"state": {}, "param_groups": [
    {"params": ["x"]}]}]}, {"optimizers": [], "rng": {"torch": torch.zeros(3)}}, "wrong-count"])
def test_a_trainer_pt_of_the_wrong_structure_is_one_line(tmp_path, capsys, trained, state):
    ckpt = _copy(trained, tmp_path)
    if state == "wrong-count":
        state = {"optimizers": [{"state": {}, "param_groups": [{"params": [0]}]}] * 2, "rng": {}}
    torch.save(state, ckpt / "trainer.pt")
    rc = _train(ckpt.parent, "--resume", str(ckpt), "--total-steps", "3")
    _one_error(capsys, rc, str(ckpt))


@pytest.fixture(scope="module")
def packed(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "m.safetensors"
    assert main(["export", "--checkpoint", str(trained), "--format", "packed", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("case", ["no config", "config not json", "config a list", "bad step", "missing tensor",
                                  "wrong codes size", "bad tokenizer"])
def test_a_crafted_packed_file_is_one_line(tmp_path, capsys, packed, case):
    from safetensors import safe_open

    with safe_open(str(packed), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if case == "no config":
        del meta["config"]
    elif case == "config not json":
        meta["config"] = "{oops"
    elif case == "config a list":
        meta["config"] = "[1]"
    elif case == "bad step":
        meta["step"] = "-1e9"
    elif case == "missing tensor":
        del tensors[next(k for k in tensors if k.endswith(".codes"))]
    elif case == "wrong codes size":
        k = next(k for k in tensors if k.endswith(".codes"))
        tensors[k] = tensors[k][:-1].clone()
    else:
        meta["tokenizer"] = "{not a tokenizer"
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    rc = main(["generate", "--checkpoint", str(bad), "--device", "cpu", "--max-tokens", "2", "--prompt", "a"])
    _one_error(capsys, rc, str(bad))


def test_a_corrupt_tokenizer_json_is_one_line(tmp_path, capsys, trained):
    ckpt = _copy(trained, tmp_path)
    (ckpt / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 7}}')
    rc = main(["generate", "--checkpoint", str(ckpt), "--device", "cpu", "--max-tokens", "2"])
    _one_error(capsys, rc, "tokenizer")


@pytest.mark.parametrize("content", [bytes(range(256)) * 4, b"a = " + b"[" * 50_000 + b"]" * 50_000,
                                     b"x = {" * 5000])
def test_binary_or_pathologically_nested_toml_is_one_line(tmp_path, capsys, content):
    cfg = tmp_path / "c.toml"
    cfg.write_bytes(content)
    rc = main(["info", "--config", str(cfg)])
    _one_error(capsys, rc, str(cfg))


@pytest.mark.parametrize("flags, needle", [(["--temperature", "1e-30"], "--temperature"),
                                           (["--temperature", "nan"], "--temperature"),
                                           (["--prompt", "caf\udce9"], "--prompt"),
                                           (["--seed", str(2**70)], "--seed")])
def test_bad_sampling_flags_and_non_utf8_prompts_are_one_line(capsys, trained, flags, needle):
    rc = main(["generate", "--checkpoint", str(trained), "--device", "cpu", "--max-tokens", "2", *flags])
    _one_error(capsys, rc, needle)


def test_export_to_a_name_too_long_or_a_full_disk_is_one_line(tmp_path, capsys, trained, monkeypatch):
    long_out = tmp_path / ("x" * 255)
    rc = main(["export", "--checkpoint", str(trained), "--format", "packed", "--out", str(long_out)])
    assert rc == 0 and long_out.is_file()  # the longest legal name works: the temp's name is bounded
    rc = main(["export", "--checkpoint", str(trained), "--format", "packed", "--out", str(tmp_path / ("y" * 256))])
    _one_error(capsys, rc, "cannot write")

    import errno

    import nanochat_ternary.export.packed as packed_mod

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(packed_mod, "save_file", full, raising=False)
    monkeypatch.setattr("safetensors.torch.save_file", full)
    rc = main(["export", "--checkpoint", str(trained), "--format", "packed", "--out", str(tmp_path / "full.st")])
    _one_error(capsys, rc, "No space left")
    assert [p.name for p in tmp_path.iterdir()] == [long_out.name]  # no temp left behind


def test_an_unusable_cache_dir_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NANOCHAT_CACHE", "/dev/null/cache")
    rc = _train(tmp_path / "run", "--total-steps", "1")
    _one_error(capsys, rc, "cache dir")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_device_as_data_is_refused_without_hanging(tmp_path, kind):
    """``--dataset text`` on a FIFO used to block forever in open(); checked with stat now."""
    path = tmp_path / "data.txt"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path = Path("/dev/zero")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    args = [a for a in TINY if a not in ("synthetic",)]
    args[args.index("--dataset") + 1: args.index("--dataset") + 1] = ["text"]
    r = subprocess.run([sys.executable, "-m", "nanochat_ternary.cli", "train", *args, "--data-path", str(path),
                        "--checkpoint-dir", str(tmp_path / "run")], env=env, capture_output=True, text=True,
                       timeout=90)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "not a regular file or directory" in r.stderr


# ---------------------------------------------------------------------------------------------
# the catch-all


def test_an_unexpected_exception_is_one_line_with_the_traceback_in_a_file(tmp_path, capsys, monkeypatch):
    import nanochat_ternary.cli as cli

    monkeypatch.setenv("NANOCHAT_CRASH_DIR", str(tmp_path))

    def boom(_args):
        raise ValueError("something\nunexpected")

    monkeypatch.setitem(cli.COMMANDS, "info", boom)
    rc = main(["info"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_INTERNAL == 70
    assert err.count("\n") == 1 and err.startswith("internal error: ValueError: something unexpected; details in ")
    report = Path(err.strip().rsplit("details in ", 1)[1])
    assert report.parent == tmp_path and "Traceback" in report.read_text() and "boom" in report.read_text()
