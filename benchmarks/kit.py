"""The measurement kit every ``benchmarks/*.py`` script shares.

* :func:`header` — the first lines of every output: code provenance (version, commit, dirty), date,
  machine (CPU model, torch's CPU capability, cores, load average), torch version, threads.
* :func:`interleaved` — time several callables round-robin (A B C A B C ...; optionally rotating
  the order each round), so machine noise lands on all of them alike; median, best and spread per
  callable (:class:`Timing`), ratios against a baseline (:func:`print_ratios`). A callable that
  must leave set-up out of its time times itself and returns seconds (``self_timed=True``).
* :func:`peak_memory` — one peak-memory method per device: CUDA's allocator peak, or on CPU the
  process's peak RSS (VmHWM, reset first) around the call. For a whole child process,
  :func:`run_process` reads the same counter (the child's peak RSS, ``ru_maxrss``) from ``wait4``;
  :func:`rss_bytes` is the current RSS, for "what a forward keeps alive" style differences.
* :func:`run_cli` — run ``nanochat-train`` in its own process and read back its JSONL records.

Run a script from the checkout root (``python benchmarks/x.py``); ``kit`` is imported beside it.
"""

from __future__ import annotations

import json
import os
import signal
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
from nanochat_ternary.bench.worker import vm_hwm_bytes
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
    samples: list[float]  # seconds per call, in the order they were taken (warm-up rounds left out)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def best(self) -> float:
        """The fastest call: for micro-benchmarks where noise only ever adds time."""
        return min(self.samples)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / median: how much the machine moved under this one."""
        return (max(self.samples) - min(self.samples)) / self.median if self.median > 0 else 0.0


def round_order(names: list[str], r: int, rotate: bool) -> list[str]:
    """The order of round ``r``: as given, or rotated left by ``r`` (so no callable always runs
    first, after the others have warmed or cooled the caches)."""
    k = r % len(names) if rotate and names else 0
    return names[k:] + names[:k]


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1,
                sync: Callable[[], None] | None = None, rotate: bool = False,
                self_timed: bool = False) -> dict[str, Timing]:
    """Seconds per call of each of ``fns``, timed round-robin ``reps`` times after ``warmup`` rounds.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock read on an asynchronous device.
    ``rotate``: each round starts one callable later (:func:`round_order`). ``self_timed``: each
    callable returns its own seconds (it keeps set-up such as a prefill out of the clock), which are
    taken as the sample instead of the wall time of the call."""
    sync = sync or (lambda: None)
    names = list(fns)
    for r in range(warmup):
        for name in round_order(names, r, rotate):
            fns[name]()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(reps):
        for name in round_order(names, r, rotate):
            sync()
            t0 = time.perf_counter()
            ret = fns[name]()
            sync()
            out[name].append(float(ret) if self_timed else time.perf_counter() - t0)  # type: ignore[arg-type]
    return {k: Timing(v) for k, v in out.items()}


def print_ratios(timings: dict[str, Timing], baseline: str, unit: str = "s/call") -> None:
    base = timings[baseline].median
    print(f"{'':<24} {unit + ' (median)':>18} {'spread':>8} {'vs ' + baseline:>14}")
    for name, t in timings.items():
        print(f"{name:<24} {t.median:>18.4f} {t.spread:>7.0%} {t.median / base:>13.3f}x")


_vm_hwm_bytes = vm_hwm_bytes  # the bench worker's reader: one VmHWM parser

def _reset_vm_hwm() -> bool:
    try:  # writing 5 to clear_refs resets the peak RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_bytes() -> int:
    """This process's resident set size now (``/proc/self/statm``)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn: Callable[[], object], device: str | torch.device = "cpu", relative: bool = True) -> int | None:
    """Peak bytes during ``fn``: CUDA allocator peak, or on CPU the process's peak RSS (VmHWM, reset
    first). ``relative``: minus the memory in use before it (what ``fn`` adds); otherwise the
    high-water mark itself. None where it cannot be read."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - (before if relative else 0)
    if not _reset_vm_hwm():
        return None
    before = _vm_hwm_bytes()
    fn()
    after = _vm_hwm_bytes()
    if before is None or after is None:
        return None
    return max(0, after - before) if relative else after


@dataclass
class Process:
    """A finished child process: its exit status, output, wall time and peak RSS."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    peak_rss_bytes: int  # the command's own peak RSS (ru_maxrss; its waited-for children's too)


# A bare interpreter that forks, execs the command and reports the child's ru_maxrss. It exists because
# a child's ru_maxrss starts at the high-water mark of the process it was forked from (Linux carries
# it across fork and exec): forked from this (large, torch-importing) process, every child would
# report at least our own peak. Forked from the launcher, the floor is a bare interpreter's ~10 MB.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    except OSError as e:
        print(f"{sys.argv[2]}: {e}", file=sys.stderr)
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
code = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as fh:
    fh.write(f"{code} {usage.ru_maxrss}")
sys.exit(code if code >= 0 else 128 - code)
"""


def run_process(cmd: list[str], env: dict[str, str] | None = None, timeout: float | None = None,
                cwd: str | Path | None = None) -> Process:
    """Run ``cmd`` to the end; its output, wall seconds and peak RSS (its ``ru_maxrss`` from ``wait4``,
    what ``/usr/bin/time -f %M`` reports). ``env`` is added to this process's environment. Past
    ``timeout`` seconds the command is killed (its whole process group) and
    :class:`subprocess.TimeoutExpired` raised."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kit-run-") as td:
        report = Path(td) / "rusage"
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(report), *cmd], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=cwd, env={**os.environ, **(env or {})},
                                start_new_session=True)  # its own group: a timeout kills the command too
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:  # timeout, Ctrl-C: nothing of it runs on
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        wall = time.perf_counter() - t0
        code, kib = (int(x) for x in report.read_text().split()) if report.exists() else (proc.returncode, 0)
    return Process(list(cmd), code, out, err, wall, kib * 1024)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL log (none if it does not exist)."""
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def run_cli(args: list[str], log_file: Path, env: dict[str, str] | None = None,
            timeout: float | None = None) -> tuple[Process, list[dict[str, Any]]]:
    """``python -m nanochat_ternary.cli ARGS --log-file LOG`` in its own process (:func:`run_process`:
    output, wall time, peak RSS); its JSONL records."""
    log_file.unlink(missing_ok=True)
    proc = run_process([sys.executable, "-m", "nanochat_ternary.cli", *args, "--log-file", str(log_file)],
                       env=env, timeout=timeout)
    return proc, read_jsonl(log_file)
