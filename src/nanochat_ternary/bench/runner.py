"""Run a benchmark suite: every (configuration, seed) in a fresh subprocess, one at a time.

    settings  = model, steps, data, seeds, batch shape: the same for every configuration
    prepare the data once (tokenizer + token cache), so no run pays for it
    for each configuration, for each seed:
        worker process: build config (suite model + the TOML's features + settings) -> train -> result
        progress bar from the run's JSONL log; one line when it ends
    aggregate over seeds -> results.json, REPORT.md, loss.png, memory.png

Runs go one at a time with all the suite's threads, so their timings are comparable (two runs
sharing cores would each measure the other). A run that fails or dies is recorded as failed with
its error, and the suite goes on.

:func:`run_one` is the matched run itself (one configuration, one seed, the suite's settings, a
fresh worker process); the convergence scripts in ``benchmarks/`` call it for their variants
(an :class:`Entry` with ``overrides`` instead of a TOML) and schedule the runs themselves.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..config import build_config, packaged_config_dir, resolve_config_path
from ..errors import UserError
from ..provenance import describe, provenance
from . import report
from .peers import PEERS, peer_unavailable

SUITES: dict[str, list[str]] = {
    "e3": ["e3/baseline.toml", "e3/mtp_only.toml", "e3/muon_8bit.toml", "e3/galore2.toml", "e3/full.toml"],
    "nano-125m": ["e3/baseline.toml", "nano_125m_8bit.toml", "nano_125m_galore.toml", "nano_125m_8bit_galore.toml"],
}
PEER_BASE = "e3/baseline.toml"  # the peers replace the optimizer of this configuration


@dataclass
class BenchSettings:
    """What every configuration shares. ``quick`` shrinks the defaults to a smoke-test size."""

    model: str = "tiny-cpu"
    steps: int = 150
    seeds: int = 2
    dataset: str = ""
    data_path: str = ""
    batch_size: int | None = 8  # None: the model preset's
    seq_len: int | None = None
    grad_accum_steps: int | None = None
    eval_points: int = 10  # evaluations per run (the val-loss curve's points)
    eval_batches: int | None = None
    threads: int = 0
    device: str = "auto"
    overrides: list[str] = field(default_factory=list)  # --set KEY=VALUE for every configuration
    keep_checkpoints: bool = False
    float_twin: bool = True  # also train the baseline with quantization=none: what ternary costs
    tasks: str = "stdlib-next-line"  # scored once on each run's final model (eval_tasks' syntax); "": none
    task_items: int = 200  # items (bpb: documents) per task

    @classmethod
    def quick(cls, **kw: Any) -> BenchSettings:
        base = dict(steps=30, seeds=1, batch_size=8, seq_len=64, eval_points=3, eval_batches=2, tasks="")
        base.update({k: v for k, v in kw.items() if v is not None})
        return cls(**base)

    def config_overrides(self) -> list[str]:
        """``key=value`` settings applied to every configuration (after its TOML)."""
        eval_interval = max(1, self.steps // self.eval_points)
        sets = [f"total_steps={self.steps}", f"eval_interval={eval_interval}", "sample_tokens=0",
                "checkpoint_interval=0", "keep_last_checkpoints=1", f"threads={self.threads}",
                f"device={self.device}", f"log_interval={max(1, self.steps // 100)}"]
        for key in ("dataset", "data_path"):
            if getattr(self, key):
                sets.append(f"{key}={getattr(self, key)}")
        for key in ("batch_size", "seq_len", "grad_accum_steps", "eval_batches"):
            if getattr(self, key) is not None:
                sets.append(f"{key}={getattr(self, key)}")
        return sets + list(self.overrides)


@dataclass
class Entry:
    name: str
    kind: str  # "config" | "twin" | "peer"
    config: str  # TOML path ("": the model preset alone)
    peer: str = ""
    source: str = ""
    overrides: list[str] = field(default_factory=list)  # key=value after the settings' (a variant's own)


TWIN_SUFFIX = "-float"


def float_twin(base: Entry, model: str, overrides: list[str]) -> Entry | None:
    """``base`` trained with full-precision weights (``quantization=none``), everything else the
    same; None when ``base`` is not quantized (it is its own twin)."""
    try:
        cfg = build_config(base.config, overrides=overrides, preset=model)
    except UserError:  # the baseline itself is broken: its own run reports why
        return None
    if cfg.model.quantization == "none":
        return None
    return Entry(base.name + TWIN_SUFFIX, "twin", base.config, source=f"{base.source} with quantization=none",
                 overrides=["quantization=none"])


def suite_entries(configs: list[str], peers: bool, twin_of: BenchSettings | None = None) -> list[Entry]:
    """The suite's runs in order; ``twin_of``: add the baseline's full-precision twin right after
    the baseline (the baseline: the config named ``baseline``, else the first)."""
    entries: list[Entry] = []
    names: set[str] = set()
    for spec in configs:
        path = resolve_config_path(spec)
        if path is None:
            raise UserError(f"bench: config not found: {spec} (shipped: e3/baseline.toml, e3/full.toml, ...)")
        name, k = path.stem, 2
        while name in names:  # the same stem twice (e.g. two dirs' full.toml): full, full-2
            name, k = f"{path.stem}-{k}", k + 1
        names.add(name)
        entries.append(Entry(name, "config", str(path), source=_display_path(path)))
    if twin_of is not None and entries:
        base = next((e for e in entries if e.name == "baseline"), entries[0])
        twin = float_twin(base, twin_of.model, twin_of.config_overrides())
        if twin is not None and twin.name not in names:
            entries.insert(entries.index(base) + 1, twin)
    if peers:
        base = resolve_config_path(PEER_BASE)
        assert base is not None
        for peer, (desc, _need, _f) in PEERS.items():
            entries.append(Entry(f"peer:{peer}", "peer", str(base), peer=peer, source=desc))
    return entries


def _display_path(path: Path) -> str:
    """``configs/e3/full.toml`` for a shipped config, the path as given otherwise."""
    try:
        return "configs/" + str(path.resolve().relative_to(packaged_config_dir()))
    except ValueError:
        return str(path)


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    info = {"platform": platform.platform(), "cpu": cpu, "cores": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity") else os.cpu_count(), "memory_bytes": mem,
            "python": platform.python_version(), "torch": torch.__version__, "cuda_device": None}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def _prepare_data(settings: BenchSettings) -> tuple[dict[str, Any], dict[str, int]]:
    """Tokenize/cache the suite's data once (in this process) and describe it; also the resolved
    batch shape of the baseline, for the report."""
    from ..train.dataset import load_training_data
    from ..train.runtime import setup_runtime

    cfg = build_config(None, overrides=settings.config_overrides(), preset=settings.model)
    rt = setup_runtime("cpu", 0)
    data = load_training_data(cfg, rt)
    t = cfg.training
    shape = {"batch_size": t.batch_size, "seq_len": t.seq_len, "grad_accum_steps": t.grad_accum_steps,
             "tokens_per_step": t.batch_size * t.seq_len * t.grad_accum_steps}
    return {"name": data.describe()["name"], "train_tokens": len(data.train), "val_tokens": len(data.val)}, shape


WORKER_PARENT_ENV = "NANOCHAT_BENCH_PARENT"
WORKER_STOP_GRACE_S = 30.0  # a stopped worker saves nothing (checkpoint_interval=0): it ends in seconds


class BenchStopped(UserError):
    """``bench`` got SIGTERM / SIGHUP: its worker was stopped (with its process group); nothing runs on."""

    prefix = "stopped"

    def __init__(self, signum: int) -> None:
        super().__init__(f"bench: stopped by {signal.Signals(signum).name}; the run in progress was stopped "
                         f"with its worker processes, no report written")
        self.exit_status = 128 + signum


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    """While a worker runs, SIGTERM / SIGHUP raise :class:`BenchStopped` here (default handling would
    kill only this process and leave the worker training into an abandoned dir)."""
    def handle(signum: int, _frame: Any) -> None:
        raise BenchStopped(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {sig: signal.signal(sig, handle) for sig in sigs}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _stop_worker(proc: subprocess.Popen) -> None:
    """SIGTERM the worker's process group, SIGKILL it after a grace period; return once it is gone."""
    for sig, wait_s in ((signal.SIGTERM, WORKER_STOP_GRACE_S), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # the group's other members (loader workers) may outlive the leader
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_one(entry: Entry, seed: int, settings: BenchSettings, run_dir: Path, label: str,
            progress: bool = True) -> dict[str, Any]:
    """Train one (configuration, seed) in a worker subprocess, with a progress bar fed by its JSONL log.

    ``run_dir`` gets ``spec.json``, ``metrics.jsonl`` (the run's log), ``train.log`` (its output),
    ``result.json`` and, with ``settings.keep_checkpoints``, ``checkpoints/``. A run into a dir that
    holds an earlier one's checkpoints starts afresh (they are removed first). ``progress=False``:
    no bar and no "running" line (a caller running several at once prints its own)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    log_file = run_dir / "metrics.jsonl"
    spec = {"name": entry.name, "config": entry.config, "peer": entry.peer, "model": settings.model,
            "seed": seed, "overrides": settings.config_overrides() + list(entry.overrides),
            "run_dir": str(run_dir / "checkpoints"), "log_file": str(log_file), "tasks": settings.tasks,
            "task_items": settings.task_items}
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=1))
    result_path = run_dir / "result.json"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "nanochat_ternary.bench.worker", str(run_dir / "spec.json"), str(result_path)]
    live = progress and sys.stderr.isatty()
    if progress and not live:  # a log file gets one line when the run starts instead of a redrawn bar
        print(f"{label}: running", flush=True)
    bar = tqdm(total=settings.steps, desc=label, unit="step", dynamic_ncols=True, leave=False, file=sys.stderr,
               disable=not live)
    with open(run_dir / "train.log", "w") as log:
        # its own process group (start_new_session), so stopping it reaches its data-loader workers
        # too; it also dies with this process (worker.py: parent-death signal), even on a kill -9 here
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", WORKER_PARENT_ENV: str(os.getpid())})
        pos = 0
        try:
            with _stop_signals():
                while proc.poll() is None:
                    time.sleep(0.5)
                    pos = _follow(log_file, pos, bar)
        except (KeyboardInterrupt, BenchStopped):
            _stop_worker(proc)
            raise
        finally:
            _follow(log_file, pos, bar)
            bar.close()
    if result_path.is_file():
        result = json.loads(result_path.read_text())
    else:  # killed (OOM, signal) before it could write
        result = {"status": "failed", "error": f"worker exited with status {proc.returncode} and no result"}
    if result.get("status") == "failed" and not result.get("error"):
        result["error"] = f"worker exited with status {proc.returncode}"
    if not settings.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return result


def _follow(log_file: Path, pos: int, bar: tqdm) -> int:
    """Advance ``bar`` to the last step logged in ``log_file`` (read from byte ``pos``)."""
    if bar.disable or not log_file.is_file():
        return pos
    with open(log_file) as fh:
        fh.seek(pos)
        chunk = fh.read()
    last = chunk.rfind("\n")
    if last < 0:
        return pos
    for line in chunk[:last].splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        bar.n = rec.get("step", bar.n)
        bar.set_postfix(loss=f"{rec.get('loss', float('nan')):.3f}", refresh=False)
    bar.refresh()
    return pos + last + 1


def _one_line(label: str, r: dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return f"{label}: {r.get('status', 'failed').upper()}: {r.get('error')}"
    bpb = f" (bpb {r['val_bpb']:.3f})" if r.get("val_bpb") is not None else ""
    kept = f", kept {r['kept_frac']:.2f}" if r.get("kept_frac") is not None else ""
    kept += f", GPU busy {r['gpu_util']:.0f}%" if r.get("gpu_util") is not None else ""
    return (f"{label}: val {r['val_loss']:.4f}{bpb}, train {r['final_train_loss']:.4f}, "
            f"{r['tokens_per_s']:,.0f} tok/s, state {r['optimizer_state_bytes'] / 2**20:.2f} MiB, "
            f"peak {r['peak_memory_bytes'] / 2**20:,.0f} MiB, data wait {r['data_wait_share']:.1%}{kept}, "
            f"{r['wall_s']:.0f} s")


def run_bench(settings: BenchSettings, configs: list[str], peers: bool, out: Path,
              command: str | None = None) -> dict[str, Any]:
    """Run the suite and write its report into ``out`` (which must not hold a report already)."""
    if out.exists() and any(out.iterdir()):
        raise UserError(f"bench: output dir {out} is not empty (choose another --out; nothing was overwritten)")
    entries = suite_entries(configs, peers, twin_of=settings if settings.float_twin else None)
    t0 = time.perf_counter()
    date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    prov = provenance()  # at the start: the code every run of the suite imports
    seeds = list(range(1, settings.seeds + 1))
    print(f"bench: {len(entries)} configurations x {len(seeds)} seed(s) on {settings.model}, "
          f"{settings.steps} steps each; output in {out}; code: {describe(prov)}", flush=True)
    data, shape = _prepare_data(settings)
    print(f"bench: data {data['name']}: {data['train_tokens']:,} train / {data['val_tokens']:,} val tokens; "
          f"{shape['tokens_per_step']:,} tokens/step", flush=True)
    out.mkdir(parents=True, exist_ok=True)

    configs_out: list[dict[str, Any]] = []
    total = len(entries) * len(seeds)
    i = 0
    for entry in entries:
        runs: list[dict[str, Any]] = []
        why_not = peer_unavailable(entry.peer) if entry.peer else None
        for seed in seeds:
            i += 1
            label = f"[{i}/{total}] {entry.name} seed {seed}"
            if why_not:
                r = {"status": "unavailable", "error": why_not, "seed": seed}
            else:
                r = run_one(entry, seed, settings, out / "runs" / entry.name.replace(":", "_") / f"seed{seed}",
                             label)
            r["seed"] = seed
            runs.append(r)
            tqdm.write(_one_line(label, r), file=sys.stdout)
            sys.stdout.flush()
        status, error = report.config_status(runs)
        configs_out.append({"name": entry.name, "kind": entry.kind, "source": entry.source, "status": status,
                            "error": error, "runs": runs, "summary": report.summarize(runs)})

    names = [c["name"] for c in configs_out if c["kind"] == "config"]
    baseline = "baseline" if "baseline" in names else (names[0] if names else None)
    twin = next((c["name"] for c in configs_out if c["kind"] == "twin"), None)
    results = {
        "schema_version": 2,
        "provenance": prov,
        "date": date,
        "command": command or "nanochat-train bench",
        "machine": machine_info(),
        "settings": {"model": settings.model, "steps": settings.steps, "seeds": seeds,
                     "dataset": settings.dataset or "auto", "data_path": settings.data_path, **shape,
                     "threads": settings.threads, "device": settings.device, "overrides": settings.overrides,
                     "tasks": settings.tasks, "task_items": settings.task_items},
        "data": data,
        "baseline": baseline,
        "float_twin": twin,
        "configs": configs_out,
        "wall_s": time.perf_counter() - t0,
    }
    report.write_results(results, out)
    try:
        plots = report.write_plots(results, out)
    except ImportError:
        plots = []
        print("bench: matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
    path = report.write_report(results, out, plots)
    print(f"bench: done in {results['wall_s'] / 60:.1f} min: {path}, {out / 'results.json'}"
          + "".join(f", {out / p}" for p in plots))
    return results


def command_line(argv: list[str]) -> str:
    return "nanochat-train " + " ".join(shlex.quote(a) for a in argv)
