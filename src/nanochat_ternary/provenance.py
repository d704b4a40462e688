"""Where a figure came from: the package version and, in a git checkout, the commit and whether the
tracked files differ from it. Every benchmark output (``bench``'s results.json and REPORT.md, the
``benchmarks/*.py`` scripts) records this, so a number can be traced to the code that made it.

``commit`` and ``dirty`` are None when the package does not run from a git checkout of this
project (an installed wheel): the version is then all there is. The checkout is recognised by its
``src/nanochat_ternary`` being this very package, so a wheel installed inside some other repository
does not report that repository's commit.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from . import __version__

_PKG_DIR = Path(__file__).resolve().parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(_PKG_DIR), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):  # no git on this machine, or it hung
        return None
    return out.stdout if out.returncode == 0 else None


def provenance() -> dict[str, Any]:
    """``{"version", "commit", "dirty"}``: ``dirty`` is True when the code differs from the commit:
    changed or new files under ``src/`` or ``benchmarks/``, or a changed ``pyproject.toml``. Other
    files (docs, benchmark outputs) do not count: they do not change a figure."""
    info: dict[str, Any] = {"version": __version__, "commit": None, "dirty": None}
    top = _git("rev-parse", "--show-toplevel")
    if top is None or (Path(top.strip()) / "src" / "nanochat_ternary").resolve() != _PKG_DIR:
        return info
    commit = _git("rev-parse", "HEAD")
    tracked = _git("status", "--porcelain", "--untracked-files=no", "--", ":/pyproject.toml")
    new_code = _git("status", "--porcelain", "--untracked-files=all", "--", ":/src", ":/benchmarks")
    if commit is not None:
        info["commit"] = commit.strip()
    if tracked is not None and new_code is not None:
        info["dirty"] = bool(tracked.strip() or new_code.strip())
    return info


def describe(info: dict[str, Any] | None = None) -> str:
    """One line for a report: ``nanochat-ternary 0.1.0, commit 1a2b3c4d5e6f (dirty)``."""
    p = info if info is not None else provenance()
    if p.get("commit") is None:
        return f"nanochat-ternary {p['version']}, commit unknown (not run from a git checkout)"
    state = {True: " (dirty: the code differs from it)", False: " (clean)"}.get(p.get("dirty"), "")
    return f"nanochat-ternary {p['version']}, commit {p['commit'][:12]}{state}"
