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

from ..config import Config
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


def _fail(ckpt: Path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {ckpt}: meta.json {what}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# meta.json fields a reader uses, and the JSON types they may have (None: absent or null)
_META_TYPES: dict[str, tuple[type, ...]] = {
    "tokens_seen": (int,), "total_steps": (int,), "created": (int, float), "data_position": (dict,),
    "data": (dict,), "data_fingerprint": (dict,), "metrics": (dict,), "warm_start": (dict,), "fire": (dict,),
    "torch_version": (str,),
}


def read_meta(ckpt: Path) -> dict[str, Any]:
    """``meta.json``, checked at the boundary: a JSON object with the format version, a ``config``
    object (its fields are checked by ``Config.from_dict``), an integer ``step >= 0`` and the optional
    fields of the types in ``_META_TYPES``. Anything else is one ``CheckpointError`` line naming the
    file and the field, never an exception from deeper down."""
    try:
        raw = (ckpt / "meta.json").read_bytes()
        if len(raw) > 64 * 2**20:
            raise _fail(ckpt, f"is {len(raw):,} bytes, too large to be a checkpoint's metadata")
        meta = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or bad UTF-8
        detail = "nested too deeply" if isinstance(e, RecursionError) else (e.strerror if isinstance(e, OSError)
                                                                             else str(e).splitlines()[0][:160])
        raise CheckpointError(f"checkpoint {ckpt}: unreadable meta.json ({detail})") from None
    if not isinstance(meta, dict):
        raise _fail(ckpt, f"is a JSON {type(meta).__name__}, not an object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {ckpt}: unsupported format_version {meta.get('format_version')!r:.40} "
            f"(this version reads {FORMAT_VERSION})"
        )
    for key in ("config", "step"):
        if key not in meta:
            raise CheckpointError(f"checkpoint {ckpt}: meta.json has no '{key}'")
    if not isinstance(meta["config"], dict):
        raise _fail(ckpt, f"'config' is a {type(meta['config']).__name__}, not an object")
    for section in ("model", "training"):
        if not isinstance(meta["config"].get(section, {}), dict):
            raise _fail(ckpt, f"'config.{section}' is a {type(meta['config'][section]).__name__}, not an object")
    if not _is_int(meta["step"]) or not 0 <= meta["step"] < 10**15:
        raise _fail(ckpt, f"'step' = {meta['step']!r:.40} is not a step number (an integer >= 0)")
    for key, types in _META_TYPES.items():
        v = meta.get(key)
        if v is not None and (not isinstance(v, types) or isinstance(v, bool)):
            raise _fail(ckpt, f"'{key}' is a {type(v).__name__}, expected {' or '.join(t.__name__ for t in types)}")
    if meta.get("fire") is not None and not _is_int(meta["fire"].get("step")):
        raise _fail(ckpt, "'fire' has no integer 'step'")
    return meta


def read_config(ckpt: Path, meta: dict[str, Any] | None = None) -> Config:
    """The config saved in a checkpoint, validated like any other source; errors name the file."""
    meta = read_meta(ckpt) if meta is None else meta
    try:
        return Config.from_dict(meta["config"])
    except UserError as e:
        raise CheckpointError(f"checkpoint {ckpt}: meta.json config: {e}") from None


# where a run writes: the user's choice on the command line, never a value read from a file
OUTPUT_FIELDS = ("checkpoint_dir", "log_file", "tensorboard", "resume", "init_from")


def resume_config(path: str | Path) -> Config:
    """The config a ``--resume`` continues with when no ``--config`` is given: the checkpoint's,
    with every output path cleared (:data:`OUTPUT_FIELDS`). A moved run (``mv run1 run2``) or a
    crafted ``meta.json`` must not decide where the resumed run writes: it writes into the dir it
    resumes from, or where the command line points."""
    cfg = read_config(resolve_checkpoint(path))
    for key in OUTPUT_FIELDS:
        setattr(cfg.training, key, "")
    return cfg


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
    protect: tuple[Path, ...] = (),
) -> Path:
    """Write ``run_dir/step_NNNNNN`` atomically and durably; prune old ones beyond ``keep_last`` (0 = keep
    all) with :func:`prune_checkpoints`, never removing the new one or any in ``protect``.

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
    if keep_last > 0:
        prune_checkpoints(run_dir, keep_last, final, protect)
    return final


def prune_checkpoints(run_dir: Path, keep_last: int, written: Path, protect: tuple[Path, ...] = ()) -> list[str]:
    """Keep-last-N after writing ``written`` (step S): what "the last N" means when steps go backwards.

    A run resumed from an earlier checkpoint (``--resume RUN/step_000003`` while ``step_000006``
    exists) writes a new line of history. Its last N are the N highest steps among the complete
    checkpoints with step <= S; those always include ``written`` itself. Checkpoints with a higher
    step belong to the other line (the run that went further) and are never pruned by this one, and
    nothing in ``protect`` (the checkpoint this run resumed from) is pruned while this run lives.
    Returns the names removed."""
    s_new = int(STEP_DIR.match(written.name).group(1))
    keep = {p.resolve() for p in protect} | {written.resolve()}
    line = [p for p in list_checkpoints(run_dir) if int(STEP_DIR.match(p.name).group(1)) <= s_new]
    removed = []
    for old in line[:-keep_last]:
        if old.resolve() in keep:
            continue
        # rename first (atomic): a prune killed midway leaves a hidden .trash dir, never a step_
        # dir with some files gone that could look complete
        trash = run_dir / f".trash-{old.name}-{os.getpid()}"
        try:
            os.rename(old, trash)
        except OSError:
            continue
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(old.name)
    return removed


def check_destination(run_dir: Path, start: int, total: int) -> None:
    """Refuse, before training starts, a run whose saves would collide with what is in ``run_dir``.

    A run from ``start`` to ``total`` may save any step in ``(start, total]`` (intervals, a stop
    signal, the end). An entry of that name already there (a complete checkpoint of another line of
    history, a step dir missing a file, a stray file) would make that save fail, the final one only
    after the whole training: so it is an error now, naming the entry."""
    if not run_dir.is_dir():
        return
    clash = sorted((int(m.group(1)), p) for p in run_dir.iterdir()
                   if (m := STEP_DIR.match(p.name)) and start < int(m.group(1)) <= total)
    if clash:
        step, p = clash[0]
        kind = ("a complete checkpoint" if p in list_checkpoints(run_dir) else
                "an incomplete step dir (missing " + ", ".join(f for f in REQUIRED_FILES if not (p / f).is_file())
                + ")" if p.is_dir() else "a file, not a checkpoint")
        more = f" and {len(clash) - 1} more" if len(clash) > 1 else ""
        raise CheckpointError(f"checkpoint dir {run_dir}: {p.name}{more} already exists ({kind}); this run "
                              f"(steps {start + 1}-{total}) would have to write it. Move it away, resume from "
                              f"the newest checkpoint, or choose another --checkpoint-dir")


def _json_default(o: Any) -> Any:
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def check_weights_header(ckpt: Path, cfg: Config) -> None:
    """``model.safetensors``'s header (names and shapes, no data read) agrees with the config on the
    embedding shape and the number of blocks: a crafted ``meta.json`` claiming a huge model is
    refused before that model is allocated."""
    from safetensors import safe_open

    try:
        with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
            keys = set(f.keys())
            # tied weights are stored once, under either name
            name = next((k for k in ("tok_emb.weight", "lm_head.weight") if k in keys), None)
            emb = list(f.get_slice(name).get_shape()) if name else None
    except Exception as e:  # safetensors raises its own types for a bad header
        raise CheckpointError(f"checkpoint {ckpt}: corrupt model.safetensors ({_last_line(e)[:160]})") from None
    m = cfg.model
    if emb != [m.vocab_size, m.dim]:
        raise CheckpointError(f"checkpoint {ckpt}: model.safetensors' embedding is {emb}, its meta.json "
                              f"config says [{m.vocab_size}, {m.dim}]")
    blocks = {int(k.split(".")[1]) for k in keys if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if blocks != set(range(m.n_layers)):
        raise CheckpointError(f"checkpoint {ckpt}: model.safetensors holds {len(blocks)} blocks, its meta.json "
                              f"config says n_layers = {m.n_layers}")


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
    if missing or unexpected:  # lists or sets, by safetensors version
        missing, unexpected = sorted(missing), sorted(unexpected)
        what = (f"missing {missing[:3]}" if missing else "") + (f" unexpected {unexpected[:3]}" if unexpected else "")
        raise CheckpointError(f"checkpoint {ckpt} does not match the model: {what.strip()}")
    bad = _first_nonfinite(model.state_dict(), "")
    if bad:  # never written by save_checkpoint: a corrupt or crafted file, whose outputs would be NaN
        raise CheckpointError(f"checkpoint {ckpt}: model.safetensors holds NaN/inf values in {bad}; "
                              f"use an earlier checkpoint")


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
        state = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message opens with advice to retry with weights_only=False: exactly what not to do
        detail = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), None)
        if detail is None:  # not a refused object: a truncated or garbled file
            raise CheckpointError(f"checkpoint {ckpt}: unreadable trainer.pt (corrupt or truncated: "
                                  f"{_last_line(e)})") from None
        raise CheckpointError(f"checkpoint {ckpt}: refused trainer.pt, a pickle that could run code when loaded "
                              f"({detail}); nothing from it was loaded or run") from None
    except Exception as e:  # torch raises several types for truncated/corrupt/pickled files
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {ckpt}: unreadable trainer.pt ({msg})") from None
    # a sharded (fsdp) checkpoint keeps its optimizer state in dcp/ (checkpoint/dcp.py): trainer.pt holds the rest
    problem = _trainer_state_problem(state, sharded=(ckpt / "dcp" / ".metadata").is_file())
    if problem:
        raise CheckpointError(f"checkpoint {ckpt}: trainer.pt is not a trainer state ({problem})")
    bad = _first_nonfinite(state, "trainer")
    if bad:
        raise CheckpointError(f"checkpoint {ckpt}: trainer.pt holds NaN/inf values in {bad}; use an earlier checkpoint")
    return state


def _trainer_state_problem(state: Any, sharded: bool = False) -> str | None:
    """What is wrong with the structure of a loaded ``trainer.pt`` (None: the shape the trainer
    writes): ``{"optimizers": [optimizer state_dict...], "rng": {"torch": uint8 tensor, ...},
    "in_backward"?: dict}``. Values inside an optimizer's state are checked by its
    ``load_state_dict`` and by the trainer against the model."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a dict"
    opts = state.get("optimizers", [] if sharded else None)
    if not isinstance(opts, list):
        return f"'optimizers' is a {type(opts).__name__}, not a list"
    for i, sd in enumerate(opts):
        if not isinstance(sd, dict) or not isinstance(sd.get("state"), dict) \
                or not isinstance(sd.get("param_groups"), list):
            return f"optimizers[{i}] is not an optimizer state (a dict with 'state' and 'param_groups')"
        for g in sd["param_groups"]:
            if not isinstance(g, dict) or not isinstance(g.get("params"), list) \
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in g["params"]):
                return f"optimizers[{i}] has a param group without a list of parameter ids"
    rng = state.get("rng", {})
    if not isinstance(rng, dict):
        return f"'rng' is a {type(rng).__name__}, not a dict"
    for k, v in rng.items():
        if not isinstance(v, torch.Tensor) or v.dtype != torch.uint8 or v.dim() != 1:
            return f"rng[{k!r}] is not a generator state (a 1-d uint8 tensor)"
    if "torch" in rng and rng["torch"].numel() != torch.get_rng_state().numel():
        return f"rng['torch'] holds {rng['torch'].numel()} bytes, a CPU generator state {torch.get_rng_state().numel()}"
    if "in_backward" in state and not isinstance(state["in_backward"], dict):
        return f"'in_backward' is a {type(state['in_backward']).__name__}, not a dict"
    return None
