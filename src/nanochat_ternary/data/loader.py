"""Training batches in the order the trainer consumes them, synchronously or prefetched.

Both sources yield ``(x, y)`` for micro-batch ``i`` = ``TokenBatches.get(i // accum, i % accum)``
starting at the resume step, so the sequence is identical whichever is used (resume stays exact).

:class:`AsyncBatches` wraps ``torch.utils.data.DataLoader`` over a map-style dataset of those
micro-batches: ``num_workers`` background processes, at most ``prefetch_batches`` micro-batches
prepared ahead (a bounded queue), results delivered in index order, a worker's exception re-raised in
the main process with its message, pinned memory on CUDA (the trainer then copies with
``non_blocking=True``). :meth:`close` shuts the workers down; the trainer calls it on normal exit,
on error and on Ctrl-C (it is also safe to call twice, and runs on garbage collection).
"""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .batches import TokenBatches


class _MicroBatches(Dataset):
    """Item ``i`` is micro-batch ``i % accum`` of step ``i // accum`` (a pure function)."""

    def __init__(self, batches: TokenBatches) -> None:
        self.batches = batches

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        accum = self.batches.grad_accum_steps
        return self.batches.get(i // accum, i % accum)

    def __len__(self) -> int:  # only for repr/introspection; the sampler decides the range
        return 2**62


class _Range(Sampler[int]):
    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


class SyncBatches:
    """The synchronous source: computes each micro-batch when asked."""

    def __init__(self, batches: TokenBatches, start_step: int, total_steps: int) -> None:
        self.batches = batches
        self._it = (batches.get(s, m) for s in range(start_step, total_steps)
                    for m in range(batches.grad_accum_steps))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        return next(self._it)

    def close(self) -> None:
        pass


def _leave_stop_signals_to_main(_worker_id: int) -> None:
    """Ctrl-C reaches the whole process group: a worker it killed would fail the step in flight.
    The main process stops at a step boundary on these signals and shuts the workers down itself
    (and a worker exits on its own if the main process dies)."""
    for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


class AsyncBatches:
    """Micro-batches ``start_step * accum ..`` prefetched by ``num_workers`` worker processes."""

    def __init__(self, batches: TokenBatches, start_step: int, total_steps: int, num_workers: int,
                 prefetch_batches: int, pin_memory: bool = False) -> None:
        accum = batches.grad_accum_steps
        # DataLoader's queue holds prefetch_factor items per worker: spread the budget over workers
        prefetch_factor = max(1, math.ceil(prefetch_batches / num_workers))
        self.loader = DataLoader(_MicroBatches(batches), batch_size=None,
                                 sampler=_Range(start_step * accum, total_steps * accum),
                                 num_workers=num_workers, prefetch_factor=prefetch_factor,
                                 pin_memory=pin_memory, persistent_workers=False,
                                 worker_init_fn=_leave_stop_signals_to_main)
        self._it = iter(self.loader)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        return next(self._it)

    def close(self) -> None:
        it, self._it = getattr(self, "_it", None), None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()  # joins the workers and their queues

    def __del__(self) -> None:
        self.close()


def make_batch_source(batches: TokenBatches, start_step: int, total_steps: int, *, use_async: bool,
                      num_workers: int, prefetch_batches: int,
                      device: torch.device) -> SyncBatches | AsyncBatches:
    if not use_async:
        return SyncBatches(batches, start_step, total_steps)
    return AsyncBatches(batches, start_step, total_steps, num_workers, prefetch_batches,
                        pin_memory=device.type == "cuda")
