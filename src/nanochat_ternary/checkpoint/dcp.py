"""Checkpoints of sharded (``parallelism = "fsdp"``) runs: ``torch.distributed.checkpoint`` (DCP)
inside the usual atomic step dir, so they reshard on load and every reader still works.

Layout (``<run>/step_000500/``)::

    dcp/                 DCP: .metadata + one __<rank>_0.distcp per saving rank: every rank's
                         shards of the weights and of both optimizers' state, by parameter name
    model.safetensors    the whole model, consolidated by rank 0 at save time (files.py's format,
                         tied weights once): generate, chat, serve, export and init_from read it
    trainer.pt           RNG state (rank 0's, as for DDP), ``{"format": "dcp"}``
    meta.json            as files.py's, plus ``checkpoint_format: "dcp"`` and the saving world size

Why consolidate at save time: every reader (``open_checkpoint``, packed / HF / GGUF export) keeps
reading ``model.safetensors`` unchanged, at the cost of one gather of the weights to rank 0 per
save (rank 0 needs the model's fp32 size in host memory; the optimizer state is never gathered).

Atomic and durable like files.py's: rank 0 makes the hidden ``.tmp-step_N-*`` dir and tells the
others its name; every rank writes its DCP shard into it; rank 0 writes the rest, waits for all
ranks (DCP's save ends with a collective commit of ``.metadata``), fsyncs every file and dir, renames
the temp dir to ``step_N`` and fsyncs the run dir. A kill at any moment leaves either the previous
checkpoints only (plus a hidden temp dir the next run deletes) or the whole new one. The run dir
must be on a filesystem every rank sees (one host, or NFS / Lustre across nodes).

Resharding: DCP stores each tensor's global shape and every shard's offsets, and loads into
whatever the live state is made of: ``DTensor`` shards of another world size, or plain tensors in a
single process (no process group needed). Optimizer state is keyed by parameter name
(``torch.distributed.checkpoint.state_dict``), so sharded Muon state loads into plain Muon.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_model
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from ..errors import CheckpointError
from . import files

DCP_DIR = "dcp"


def is_dcp_checkpoint(ckpt: Path) -> bool:
    return (ckpt / DCP_DIR / ".metadata").is_file()


def _local(obj: Any) -> Any:
    """``obj`` with every DTensor replaced by this rank's shard (no collective)."""
    if isinstance(obj, DTensor):
        return obj.to_local()
    if isinstance(obj, dict):
        return {k: _local(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_local(v) for v in obj]
    return obj


def _all_ok(ok: bool) -> bool:
    """``ok`` ANDed over ranks (every rank takes the same branch after it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    t = torch.tensor([0.0 if ok else 1.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() == 0


def _broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, names in os.walk(root):
        for n in sorted(names):
            files._fsync(Path(dirpath) / n)
        files._fsync(Path(dirpath))


def _consolidated(model: torch.nn.Module, make_model: Any) -> torch.nn.Module | None:
    """The whole model on rank 0's CPU (a collective: every rank calls it); None elsewhere."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    cpu = make_model()
    cpu.load_state_dict(full)
    return cpu


def save_dcp_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
                        trainer_state: dict[str, Any], meta: dict[str, Any], make_model: Any,
                        tokenizer_path: Path | None = None, keep_last: int = 0,
                        protect: tuple[Path, ...] = ()) -> Path:
    """Write ``run_dir/step_NNNNNN`` from every rank (a collective); see the module docstring.

    ``make_model()`` builds an unsharded CPU copy of the model's architecture (rank 0 fills it with
    the gathered weights for ``model.safetensors``). Raises ``CheckpointError`` on every rank before
    anything is renamed if a weight or state is not finite, ``files.CheckpointWriteError`` when a
    filesystem refuses (the temp dir removed)."""
    final = run_dir / files.step_dir_name(step)
    main = dist.get_rank() == 0
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizers)}
    bad = files._first_nonfinite(_local(state), "")
    if not _all_ok(bad is None):
        raise CheckpointError(f"refusing to write checkpoint {final.name}: {bad or 'a shard on another rank'} "
                              f"holds NaN/inf values (earlier checkpoints are untouched)")
    tmp_name: str | None = None
    err = ""
    if main:
        try:
            if final.exists():
                err = f"refusing to overwrite existing checkpoint {final}"
            else:
                run_dir.mkdir(parents=True, exist_ok=True)
                tmp_name = tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=run_dir)
        except OSError as e:
            err = f"could not write checkpoint {final} ({e.strerror or e}); partial files removed"
    tmp_name, err = _broadcast((tmp_name, err))
    if tmp_name is None:
        raise (CheckpointError if "overwrite" in err else files.CheckpointWriteError)(err)
    tmp = Path(tmp_name)
    try:
        try:
            dcp.save(state, checkpoint_id=str(tmp / DCP_DIR))
            ok = True
        except Exception as e:  # DCP wraps every rank's failure in one CheckpointException on all ranks
            ok, err = False, str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        cpu = _consolidated(model, make_model) if _all_ok(ok) else None
        if main and ok:
            try:
                save_model(cpu, str(tmp / "model.safetensors"))
                torch.save({**trainer_state, "format": "dcp"}, tmp / "trainer.pt")
                if tokenizer_path is not None:
                    shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
                meta = {"format_version": files.FORMAT_VERSION, "step": step, "created": time.time(),
                        "checkpoint_format": "dcp", **meta}
                (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=files._json_default))
                _fsync_tree(tmp)  # contents on disk before the rename can be
                os.rename(tmp, final)
                files._fsync(run_dir)  # the rename itself on disk
            except OSError as e:
                ok, err = False, f"{e.strerror or e}"
        if not _all_ok(ok):
            raise files.CheckpointWriteError(f"could not write checkpoint {final} ({err or 'on another rank'}); "
                                             f"partial files removed")
    finally:
        if main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if main and keep_last > 0:
        files.prune_checkpoints(run_dir, keep_last, final, protect)
    return final


def load_dcp_checkpoint(ckpt: Path, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
    """Load a DCP step dir's weights and optimizer state into ``model`` / ``optimizers``, resharding
    to whatever they are (``DTensor`` shards of any world size, or plain tensors in one process).
    Every rank calls it. A mismatch (other model, other optimizer variant) is a one-line error."""
    try:
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizers)}
        with warnings.catch_warnings():  # one process, no process group: DCP says so, as intended here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(ckpt / DCP_DIR))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizers, state["optim"])
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {ckpt}: the DCP state does not match this model / optimizer setup "
                              f"({first})") from None
