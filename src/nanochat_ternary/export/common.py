"""What every export format shares: load a checkpoint, read its ternary weights, write atomically.

The ternary weights come from the model's own quantizer (``BitLinear.quantized_weight``, the weight
the forward multiplies with), never from a second copy of its maths, so an export holds exactly
what the training forward computed::

    W_q[i] = t[i] * s[group(i)]       t in {-1, 0, +1},  s = mean |W| over the group (fp32)

where ``group(i) = i // group_size`` over the row-major flattened ``[out, in]`` weight. Formats
differ only in how many weights share one stored scale (their *block*): a format with block ``B``
holds a tensor exactly iff the scale is constant inside every block of ``B`` consecutive weights
of a row, which :meth:`TernaryTensor.block_scales` checks element by element rather than from
the config, so a permuted (llama.cpp q/k) or odd-shaped tensor is checked on what is written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..checkpoint import OpenedModel, open_checkpoint
from ..errors import UserError
from ..model.bitlinear import BitLinear
from ..model.gpt import GPT
from ..model.ternary import BLOCK_LINEARS, TernaryTensor, split_quantized

# what an export reads: a checkpoint's model and what came with it (checkpoint/open.py)
LoadedCheckpoint = OpenedModel

__all__ = ["BLOCK_LINEARS", "ExportError", "LoadedCheckpoint", "TernaryTensor", "atomic_output", "block_scales",
           "check_not_overlapping", "file_size", "llama_qk_permutation", "load_checkpoint", "split_quantized",
           "ternary_weights"]


class ExportError(UserError):
    """An export that cannot be done as asked; the message is one line that says why and what to do."""


def load_checkpoint(path: str | Path) -> OpenedModel:
    """A run dir (its newest complete checkpoint) or a step dir -> the model, on CPU in fp32."""
    return open_checkpoint(path, kinds=("checkpoint",))


def ternary_weights(model: GPT) -> dict[str, TernaryTensor]:
    """Every BitLinear of the blocks, keyed ``blocks.{i}.{attn.wq|...}``, as codes + scales."""
    if model.cfg.quantization != "ternary":
        raise ExportError("this checkpoint is a full-precision model (quantization = 'none'): it has no "
                          "ternary weights to pack; use --format hf, or --format gguf --quant f16|f32")
    out: dict[str, TernaryTensor] = {}
    for i, block in enumerate(model.blocks):
        for attr in BLOCK_LINEARS:
            lin = block.get_submodule(attr)
            assert isinstance(lin, BitLinear)
            out[f"blocks.{i}.{attr}"] = split_quantized(lin.quantized_weight().float(), lin.group_size)
    return out


def block_scales(codes: Tensor, scale_map: Tensor, block: int, name: str, fmt: str,
                 group_size: int) -> np.ndarray:
    """One scale per ``block`` consecutive weights of each row, or an ExportError naming why not.

    A block holds one scale, so the tensor is representable exactly iff every weight of a block
    whose code is non-zero has the same scale (a zero code contributes 0 whatever the scale).
    Returns fp32 ``[out, in // block]``.
    """
    rows, cols = codes.shape
    if cols % block:
        raise ExportError(f"{name}: rows of {cols} weights are not a multiple of {fmt}'s block of {block} "
                          f"weights, which llama.cpp requires; use a model whose dim and ffn_hidden are "
                          f"multiples of {block}, or --quant q8_0")
    s = scale_map.reshape(rows, cols // block, block)
    nz = codes.reshape(rows, cols // block, block) != 0
    hi = torch.where(nz, s, torch.full_like(s, -torch.inf)).amax(dim=-1)
    lo = torch.where(nz, s, torch.full_like(s, torch.inf)).amin(dim=-1)
    any_nz = nz.any(dim=-1)
    if bool(((hi != lo) & any_nz).any()):
        raise ExportError(f"{fmt} stores one scale per {block} weights but this model was trained with one per "
                          f"{group_size} ({name} has blocks with two scales), so {fmt} would change its "
                          f"weights; use --quant q8_0 (exact, 8.5 bits/weight) or retrain with "
                          f"--set group_size=256")
    return torch.where(any_nz, hi, torch.zeros_like(hi)).numpy().astype(np.float32)


# --------------------------------------------------------------------------------------------
# Output: nothing half-written at --out


def check_not_overlapping(out: Path, checkpoint: Path) -> None:
    """Refuse an ``--out`` that overlaps what the export reads, ``--force`` or not.

    Replacing ``out`` would destroy the source when ``out`` is one of the checkpoint's files, its
    step dir, its run dir or any dir above them; and ``--force`` is for replacing an earlier
    export, never a checkpoint: an existing ``out`` that is (or holds) a checkpoint is refused too.
    Paths are compared resolved (symlinks and ``..`` followed)."""
    try:  # a name the filesystem refuses (over 255 bytes, a file used as a dir): one line, now
        os.lstat(out)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ExportError(f"--out {out}: cannot write it ({e.strerror or e})") from None
    src = checkpoint.resolve()
    dst = Path(out).resolve()
    if dst == src or dst in src.parents:
        raise ExportError(f"--out {out} would replace the checkpoint being exported ({checkpoint} is "
                          f"{'it' if dst == src else 'inside it'}); choose a path outside it")
    if dst.parent == src and dst.exists():
        raise ExportError(f"--out {out} is a file of the checkpoint being exported; choose another path")
    if dst.is_dir() and ((dst / "meta.json").is_file() or any(
            (c / "meta.json").is_file() for c in dst.iterdir() if c.name.startswith("step_"))):
        raise ExportError(f"--out {out} is a checkpoint or a run dir; an export never replaces one "
                          f"(choose another path)")


@contextmanager
def atomic_output(out: Path, force: bool = False, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``out``; on success it is renamed to ``out``, on failure removed.

    ``out`` existing is an error unless ``force`` (then it is replaced only once the new one is
    complete). The temp path lives in ``out``'s directory so the final rename never crosses a
    filesystem. The temp is created with ``mkstemp`` / ``mkdtemp`` (``O_EXCL``, a fresh name: never
    something already there). A filesystem error (full disk, a name too long, no permission) is one
    ``ExportError`` line, with the temp removed and ``out`` as it was.
    """
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not force:
        raise ExportError(f"--out {out} already exists (remove it, choose another path, or pass --force)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"--out {out}: directory {parent} does not exist")
    prefix = f".tmp-{out.name[:200]}-"  # a 255-byte name stays one: the temp's name must fit too
    tmp: Path | None = None
    try:
        if is_dir:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=parent)
            os.close(fd)
            tmp = Path(name)
        yield tmp
        umask = os.umask(0)
        os.umask(umask)  # mkstemp/mkdtemp create 0600/0700; give the result the usual permissions
        os.chmod(tmp, (0o777 if is_dir else 0o666) & ~umask)
        if out.exists() or out.is_symlink():  # --force: move the old one aside only now that the new one is whole
            old = parent / f".old-{out.name[:200]}-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
        else:
            os.rename(tmp, out)
        tmp = None
    except OSError as e:
        raise ExportError(f"--out {out}: cannot write it ({e.strerror or e}); nothing was left there") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def llama_qk_permutation(n_heads: int, head_dim: int) -> Tensor:
    """Row order that turns our half-split RoPE layout into llama.cpp's interleaved one.

    Our q/k rows within a head are ``[x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}]`` with pairs ``(x_i, y_i)``
    rotated together (HF Llama's ``rotate_half`` layout); llama.cpp's ``llama`` architecture rotates
    adjacent pairs ``(r_{2i}, r_{2i+1})``. So new row ``2i`` is old row ``i`` and new row ``2i+1`` is
    old row ``i + d/2``, in every head (the permutation llama.cpp's HF converter applies).
    """
    half = head_dim // 2
    within = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)  # [hd]
    return (torch.arange(n_heads)[:, None] * head_dim + within[None, :]).reshape(-1)


def file_size(path: Path) -> int:
    """Bytes of a file, or of every file under a directory."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
