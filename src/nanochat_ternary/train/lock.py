"""One run per checkpoint dir: an exclusive ``flock`` on ``<run dir>/.lock``.

Two runs writing one dir would interleave checkpoints, prune each other's and each resume from the
other's state. The lock is a kernel ``flock`` rather than a pid file because the kernel drops it
when the holder dies in any way (exit, exception, kill -9, OOM killer), so a crashed run never
leaves it stuck and there is no liveness guess to get wrong (a recycled pid, a pid from another
host). The file's content (pid, host, start time) is only there to name the holder in the message.
The file itself stays: deleting it on release would let a third run lock a fresh inode while a
second still holds the old one.

Network filesystems: Linux emulates ``flock`` with POSIX record locks on NFS (which NFSv4 servers
enforce across hosts). Where the filesystem has no locking at all, the run goes on with a warning
rather than refusing to train.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs go unlocked (warned)
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


class RunLock:
    """Held from the start of a run until it ends; :meth:`release` is idempotent."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, warn: Callable[[str], None] = lambda _m: None) -> None:
        """Take the lock or raise a one-line ``UserError`` naming the run that holds it."""
        if fcntl is None:
            warn(f"warning: cannot lock {self.path.parent} on this platform; do not start two runs in it")
            return
        fd = _open_lock_file(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise UserError(f"checkpoint dir {self.path.parent} is in use by another run ({holder}); wait for "
                            f"it to end or choose another --checkpoint-dir") from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                warn(f"warning: {self.path.parent} does not support file locks ({e.strerror}); "
                     f"do not start two runs in it")
                return
            raise
        try:  # the content only names the holder in another run's message: a full disk is no reason to stop
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        except OSError:
            pass
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None


def _open_lock_file(path: Path) -> int:
    """Open (creating) the lock file without ever writing through something planted there.

    ``O_NOFOLLOW``: a symlink at ``.lock`` (to ``~/.bashrc``...) is refused, not truncated.
    ``O_NONBLOCK``: a FIFO there cannot hang the open. What opens must be a regular file (a FIFO,
    a device or a socket is refused before anything is written to it); a directory fails the open."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            why = "it is a symlink"
        elif e.errno == errno.EISDIR:
            why = "it is a directory"
        else:
            why = e.strerror or str(e)
        raise UserError(f"run lock {path}: cannot use it ({why}); remove it (a run creates its own) or "
                        f"choose another --checkpoint-dir") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"run lock {path}: not a regular file; remove it (a run creates its own) or choose "
                        f"another --checkpoint-dir")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return fd


def _describe_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"
