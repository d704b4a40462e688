"""Checkpoints: atomic, resumable, and safe to load.

Layout of one checkpoint (``<run>/step_000500/``)::

    model.safetensors   model weights (tied weights stored once)
    trainer.pt          optimizer states + RNG states: only tensors and plain containers, so it
                        loads with ``torch.load(weights_only=True)`` (no arbitrary unpickling)
    meta.json           format version, resolved config, step, tokens seen, data position, metrics
    tokenizer.json      the data's tokenizer, when it has one, so ``generate`` needs nothing else

It is written into a hidden temp dir beside its final name and renamed into place as the last
act, so a crash never leaves a ``step_*`` dir that looks whole. Every file and the temp dir are
fsynced before the rename and the run dir after it: without that, a power loss can persist the
rename (metadata) but not the file contents, leaving a ``step_*`` dir of empty files that resume
would pick. A crashed save leaves only a hidden ``.tmp-step_*`` dir (a crashed prune a hidden
``.trash-step_*``), which discovery never matches and the next run in the dir deletes
(:func:`remove_stale_temp`, called under the run lock). A complete checkpoint is never overwritten,
and one holding NaN/inf is never written.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from ..errors import CheckpointError, UserError

FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step_(\d{6,})$")
REQUIRED_FILES = ("model.safetensors", "trainer.pt", "meta.json")
STALE = re.compile(r"^\.(tmp|trash)-step_\d{6,}")


class CheckpointWriteError(CheckpointError):
    """The filesystem refused a save (full, read-only, quota...); nothing partial was left behind."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints in ``run_dir``, oldest first."""
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and all((p / f).is_file() for f in REQUIRED_FILES):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir itself, or a run dir (then its latest complete checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if (p / "meta.json").is_file():
        missing = [f for f in REQUIRED_FILES if not (p / f).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {p} is incomplete: missing {', '.join(missing)}")
        return p
    ckpts = list_checkpoints(p)
    if not ckpts:
        raise CheckpointError(f"no complete checkpoint (step_NNNNNN/ with meta.json) in {p}")
    return ckpts[-1]


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: unreadable meta.json ({e})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {ckpt}: unsupported format_version {meta.get('format_version')!r} "
            f"(this version reads {FORMAT_VERSION})"
        )
    for key in ("config", "step"):
        if key not in meta:
            raise CheckpointError(f"checkpoint {ckpt}: meta.json has no '{key}'")
    return meta


def ensure_writable_dir(run_dir: Path) -> None:
    """Fail before training starts, not at the first checkpoint, if ``run_dir`` can't be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"checkpoint dir {run_dir} is not writable ({e.strerror or e})") from None


def remove_stale_temp(run_dir: Path) -> list[str]:
    """Delete ``.tmp-step_*`` / ``.trash-step_*`` dirs left by a save or prune that was killed.

    Only safe while holding the run dir's lock: a live run's temp dir looks the same."""
    removed = []
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            if STALE.match(p.name) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return sorted(removed)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync a directory; files must succeed
        if not (path.is_dir() and e.errno in (errno.EINVAL, errno.EBADF, errno.ENOTSUP)):
            raise
    finally:
        os.close(fd)


def _first_nonfinite(obj: Any, name: str) -> str | None:
    """Name of the first floating tensor in ``obj`` (nested dicts/lists) holding NaN or inf."""
    if isinstance(obj, torch.Tensor):
        try:
            bad = obj.is_floating_point() and not bool(torch.isfinite(obj).all())
        except (NotImplementedError, RuntimeError, TypeError):
            return None  # a tensor subclass without isfinite (torchao's 8-bit states): not checkable here
        return name if bad else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        found = _first_nonfinite(v, f"{name}.{k}" if name else str(k))
        if found:
            return found
    return None


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    tokenizer_path: Path | None = None,
    keep_last: int = 0,
) -> Path:
    """Write ``run_dir/step_NNNNNN`` atomically and durably; prune old ones beyond ``keep_last`` (0 = keep all).

    Raises ``CheckpointError`` before writing anything if a weight or optimizer state is not finite,
    and ``CheckpointWriteError`` (one line, partial files removed) when the filesystem refuses."""
    final = run_dir / step_dir_name(step)
    if final.exists():
        raise CheckpointError(f"refusing to overwrite existing checkpoint {final}")
    bad = _first_nonfinite(model.state_dict(), "") or _first_nonfinite(trainer_state, "trainer")
    if bad:
        raise CheckpointError(f"refusing to write checkpoint {final.name}: {bad} holds NaN/inf values "
                              f"(earlier checkpoints are untouched)")
    tmp: Path | None = None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=run_dir))
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(trainer_state, tmp / "trainer.pt")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        meta = {"format_version": FORMAT_VERSION, "step": step, "created": time.time(), **meta}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=_json_default))
        for f in sorted(tmp.iterdir()):
            _fsync(f)  # contents on disk before the rename can be
        _fsync(tmp)
        os.rename(tmp, final)
        tmp = None
        _fsync(run_dir)  # the rename itself on disk
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"could not write checkpoint {final} ({e.strerror or e}); "
                                   f"partial files removed") from None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(run_dir, keep_last)
    return final


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (0: keep all)."""
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            # rename first (atomic): a prune killed midway leaves a hidden .trash dir, never a step_
            # dir with some files gone that could look complete
            trash = run_dir / f".trash-{old.name}-{os.getpid()}"
            try:
                os.rename(old, trash)
            except OSError:
                continue
            shutil.rmtree(trash, ignore_errors=True)


def _json_default(o: Any) -> Any:
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def load_model_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Load ``model.safetensors`` into ``model``; any mismatch is a one-line CheckpointError."""
    try:
        missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False)
    except SafetensorError as e:
        raise CheckpointError(f"checkpoint {ckpt}: corrupt model.safetensors ({e})") from None
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = next((ln.strip() for ln in first if "size mismatch" in ln), first[-1] if first else "")
        raise CheckpointError(f"checkpoint {ckpt} does not match the model: {detail}") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {ckpt}: cannot read model.safetensors ({e})") from None
    if missing or unexpected:
        what = (f"missing {missing[:3]}" if missing else "") + (f" unexpected {unexpected[:3]}" if unexpected else "")
        raise CheckpointError(f"checkpoint {ckpt} does not match the model: {what.strip()}")


def _last_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and "documentation" not in ln]
    return lines[-1] if lines else type(e).__name__


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """Optimizer and RNG state; plain tensors and containers only (``weights_only=True``).

    A pickle can name any importable callable (``os.system``...) to be called while loading; the
    weights-only unpickler refuses every global outside torch's tensor types and plain containers
    before calling anything, so a crafted ``trainer.pt`` is an error here, never code that runs.
    This is the only unpickling in the package: weights are safetensors, metadata JSON."""
    try:
        return torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message opens with advice to retry with weights_only=False: exactly what not to do
        detail = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), None)
        if detail is None:  # not a refused object: a truncated or garbled file
            raise CheckpointError(f"checkpoint {ckpt}: unreadable trainer.pt (corrupt or truncated: "
                                  f"{_last_line(e)})") from None
        raise CheckpointError(f"checkpoint {ckpt}: refused trainer.pt, a pickle that could run code when loaded "
                              f"({detail}); nothing from it was loaded or run") from None
    except Exception as e:  # torch raises several types for truncated/corrupt/pickled files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {ckpt}: unreadable trainer.pt ({msg})") from None
