"""The measurement kit every ``benchmarks/*.py`` script shares.

* :func:`header` — the first lines of every output: code provenance (version, commit, dirty), date,
  machine (CPU model, torch's CPU capability, cores, load average), torch version, threads.
* :func:`interleaved` — time several callables round-robin (A B C A B C ...), so machine noise
  lands on all of them alike; median and spread per callable, ratios against a baseline.
* :func:`peak_memory` — one peak-memory method per device: CUDA's allocator peak, or on CPU the
  process's peak RSS growth read from ``/proc/self/status`` (VmHWM) around the call.
* :func:`run_cli` — run ``nanochat-train`` in its own process and read back its JSONL records.

Run a script from the checkout root (``python benchmarks/x.py``); ``kit`` is imported beside it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanochat_ternary.bench.runner import machine_info
from nanochat_ternary.provenance import describe, provenance


def machine() -> dict[str, Any]:
    """What a figure was measured on: ``bench``'s machine record plus torch's CPU capability, threads, load."""
    info = machine_info()
    info.update(cpu_capability=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads(),
                cpus=info["cores"])
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if info.get("cuda_device"):
        info["gpu"] = info["cuda_device"]
    return info


def header(name: str, **settings: Any) -> dict[str, Any]:
    """Print the provenance lines of a benchmark's output and return them as a dict (for its JSON)."""
    prov = provenance()
    mach = machine()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# {name}: {describe(prov)}; {when}")
    load = " load {:.2f} {:.2f} {:.2f},".format(*mach["load_average"]) if "load_average" in mach else ""
    print(f"# machine: {mach['cpu']}, {mach['cpus']} CPUs ({mach['cpu_capability']}),{load} torch {mach['torch']}, "
          f"{mach['threads']} thread(s)" + (f", {mach['gpu']}" if "gpu" in mach else ""))
    if settings:
        print("# settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    return {"name": name, "provenance": prov, "date": when, "machine": mach, "settings": settings}


@dataclass
class Timing:
    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / median: how much the machine moved under this one."""
        return (max(self.samples) - min(self.samples)) / self.median if self.median > 0 else 0.0


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1,
                sync: Callable[[], None] | None = None) -> dict[str, Timing]:
    """Seconds per call of each of ``fns``, timed round-robin ``reps`` times after ``warmup`` rounds.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock read on an asynchronous device."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            out[name].append(time.perf_counter() - t0)
    return {k: Timing(v) for k, v in out.items()}


def print_ratios(timings: dict[str, Timing], baseline: str, unit: str = "s/call") -> None:
    base = timings[baseline].median
    print(f"{'':<24} {unit + ' (median)':>18} {'spread':>8} {'vs ' + baseline:>14}")
    for name, t in timings.items():
        print(f"{name:<24} {t.median:>18.4f} {t.spread:>7.0%} {t.median / base:>13.3f}x")


def _vm_hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_vm_hwm() -> bool:
    try:  # writing 5 to clear_refs resets the peak RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], object], device: str | torch.device = "cpu") -> int | None:
    """Peak bytes ``fn`` adds: CUDA allocator peak above the memory in use before it, or on CPU the
    process's peak RSS (VmHWM, reset first) above its RSS before it. None where it cannot be read."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - before
    if not _reset_vm_hwm():
        return None
    before = _vm_hwm_bytes()
    fn()
    after = _vm_hwm_bytes()
    return None if before is None or after is None else max(0, after - before)


def run_cli(args: list[str], log_file: Path, env: dict[str, str] | None = None,
            timeout: float | None = None) -> tuple[subprocess.CompletedProcess, list[dict[str, Any]]]:
    """``python -m nanochat_ternary.cli ARGS --log-file LOG`` in its own process; its JSONL records."""
    log_file.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-m", "nanochat_ternary.cli", *args, "--log-file", str(log_file)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    records = [json.loads(x) for x in log_file.read_text().splitlines()] if log_file.exists() else []
    return proc, records
