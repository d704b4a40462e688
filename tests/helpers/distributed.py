"""gloo process groups for tests: ``W`` CPU ranks on this machine, each saving what it computed.

A worker is a module-level function ``worker(rank, world, port, out_dir)`` (``mp.spawn`` pickles it
by name); it opens its group with :func:`gloo_group` and saves ``out_dir/rank{r}.pt`` (and rank 0,
where the test wants one, the single-process reference ``single.pt``); :func:`spawn_ranks` runs
the ranks and reads those back.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from .net import free_port


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int) -> Iterator[None]:
    """This process as rank ``rank`` of ``world`` in a gloo group on 127.0.0.1:``port``; destroyed after."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def spawn_ranks(worker: Callable[..., None], out_dir: Path, world: int = 2) -> list[Any]:
    """Run ``worker(rank, world, port, out_dir)`` on ``world`` processes; what each saved as
    ``rank{r}.pt``. Skips the test where torch.distributed is not available."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    mp.spawn(worker, args=(world, free_port(), str(out_dir)), nprocs=world, join=True)
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def saved(out_dir: Path, name: str = "single") -> Any:
    """What a rank saved as ``out_dir/NAME.pt`` (the single-process reference by default)."""
    return torch.load(Path(out_dir) / f"{name}.pt", weights_only=False)
