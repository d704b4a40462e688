"""Checkpoints: atomic, resumable, and safe to load.

Layout of one checkpoint (``<run>/step_000500/``)::

    model.safetensors   model weights (tied weights stored once)
    trainer.pt          optimizer states + RNG states: only tensors and plain containers, so it
                        loads with ``torch.load(weights_only=True)`` (no arbitrary unpickling)
    meta.json           format version, resolved config, step, tokens seen, data position, metrics
    tokenizer.json      the data's tokenizer, when it has one, so ``generate`` needs nothing else

It is written into a hidden temp dir beside its final name and renamed into place as the last
act, so a crash never leaves a ``step_*`` dir that looks whole. A complete checkpoint is never
overwritten.
"""

from __future__ import annotations

import json
import os
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


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    tokenizer_path: Path | None = None,
    keep_last: int = 0,
) -> Path:
    """Write ``run_dir/step_NNNNNN`` atomically and prune old ones beyond ``keep_last`` (0 = keep all)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / step_dir_name(step)
    if final.exists():
        raise CheckpointError(f"refusing to overwrite existing checkpoint {final}")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=run_dir))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(trainer_state, tmp / "trainer.pt")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        meta = {"format_version": FORMAT_VERSION, "step": step, "created": time.time(), **meta}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=_json_default))
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


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


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """Optimizer and RNG state; plain tensors and containers only (``weights_only=True``)."""
    try:
        return torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/corrupt/pickled files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {ckpt}: unreadable trainer.pt ({msg})") from None
