"""Training and evaluation batches cut from a token stream.

The central property: ``TokenBatches.get(step, micro)`` is a *pure function* of
``(seed, step, micro, rank, world_size, batch_size, seq_len, grad_accum_steps)`` and the tokens.
There is no iterator state, so

* resuming from a checkpoint needs only the step number to continue with exactly the batches an
  uninterrupted run would have seen;
* ``torchrun`` ranks shard the data without talking to each other;
* an async prefetcher may compute any future batch in any order.

Sampling scheme. The stream is cut into ``W = (N - 1 - slack) // seq_len`` windows of
``seq_len + 1`` tokens at stride ``seq_len`` (consecutive windows share one boundary token: the
last target of one is the first input of the next, so no token is wasted). Epoch ``e`` shifts
all window starts by a seeded offset in ``[0, (N - 1) mod seq_len]`` (the tokens left over at the
end), so over several epochs the boundaries move and the tail is used, while W stays constant.
Windows are visited in the order of a per-epoch permutation drawn from
``np.random.Generator(np.random.PCG64([seed, e]))``. Every sample in the run has a global index::

    g = ((step * grad_accum_steps + micro) * world_size + rank) * batch_size + i

sample g is window ``perm_e[g mod W]`` of epoch ``e = g // W``. Consecutive global indices cover
a whole permutation before the next epoch starts, so within an epoch every window is used
exactly once across all ranks and micro-steps, and different ranks never share a window within
an epoch.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DataError


def _windows_check(n_tokens: int, seq_len: int, what: str) -> int:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    n_windows = (n_tokens - 1) // seq_len if n_tokens > 0 else 0
    if n_windows < 1:
        raise DataError(
            f"{what} has {n_tokens} tokens, too few for one sequence of seq_len+1 = {seq_len + 1}"
            " tokens; use more data or a smaller --seq-len"
        )
    return n_windows


def _gather(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``tokens[s : s + seq_len + 1]`` for each start, split into inputs and shifted targets."""
    idx = starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
    buf = torch.from_numpy(np.asarray(tokens[idx]).astype(np.int64, copy=False))
    return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()


class TokenBatches:
    """Deterministic, stateless sampler of ``(x, y)`` training batches; see the module docstring."""

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        grad_accum_steps: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.grad_accum_steps = grad_accum_steps
        self.windows_per_epoch = _windows_check(len(tokens), seq_len, "training data")
        # Tokens not covered by the windows at offset 0: the range of the per-epoch shift.
        self._slack = (len(tokens) - 1) - self.windows_per_epoch * seq_len
        # Memoised per-epoch permutations: a cache only, results never depend on call order.
        # A plain dict (not lru_cache) keeps the object picklable for loader worker processes.
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def samples_per_step(self) -> int:
        """Sequences consumed by one optimizer step across all ranks and micro-steps."""
        return self.batch_size * self.grad_accum_steps * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.samples_per_step * self.seq_len

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one pass over the windows (at least 1; the last partial step spills
        into the next epoch)."""
        return max(1, self.windows_per_epoch // self.samples_per_step)

    def epoch_of(self, step: int) -> int:
        """The epoch that the first sample of ``step`` belongs to."""
        return (step * self.samples_per_step) // self.windows_per_epoch

    def epochs_done(self, step: int) -> float:
        """Fractional epochs completed before ``step`` (for logging)."""
        return step * self.samples_per_step / self.windows_per_epoch

    def _perm(self, epoch: int) -> tuple[int, np.ndarray]:
        """(start offset, window permutation) of ``epoch``."""
        hit = self._perm_cache.get(epoch)
        if hit is None:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            offset = int(rng.integers(0, self._slack + 1)) if self._slack > 0 else 0
            hit = (offset, rng.permutation(self.windows_per_epoch))
            if len(self._perm_cache) >= 4:
                self._perm_cache.pop(next(iter(self._perm_cache)))
            self._perm_cache[epoch] = hit
        return hit

    def window_starts(self, step: int, micro: int = 0) -> np.ndarray:
        """Token offsets of the rows of batch ``(step, micro)`` on this rank."""
        if step < 0 or not 0 <= micro < self.grad_accum_steps:
            raise ValueError(f"need step >= 0 and 0 <= micro < {self.grad_accum_steps}, got {step}, {micro}")
        b = self.batch_size
        first = ((step * self.grad_accum_steps + micro) * self.world_size + self.rank) * b
        g = first + np.arange(b, dtype=np.int64)
        epochs = g // self.windows_per_epoch
        within = g % self.windows_per_epoch
        starts = np.empty(b, dtype=np.int64)
        for e in np.unique(epochs):  # a batch spans at most a few epochs
            offset, perm = self._perm(int(e))
            sel = epochs == e
            starts[sel] = offset + perm[within[sel]] * self.seq_len
        return starts

    def get(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``: int64 tensors of shape ``[batch_size, seq_len]``, ``y`` is ``x`` shifted by one."""
        return _gather(self.tokens, self.window_starts(step, micro), self.seq_len)


def val_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, n_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed evaluation set: ``n_batches`` batches of windows spread evenly over ``tokens``.

    Deterministic (no seed), so every evaluation in a run, and across runs with the same data,
    scores the same text. Evenly spaced rather than the first windows, so a val split made of
    several documents is sampled across all of them. If the split has fewer windows than
    ``n_batches * batch_size``, every window is used once and the last batch may be smaller.
    """
    if batch_size < 1 or n_batches < 1:
        raise ValueError(f"batch_size and n_batches must be >= 1, got {batch_size}, {n_batches}")
    n_windows = _windows_check(len(tokens), seq_len, "validation data")
    wanted = n_batches * batch_size
    if wanted <= n_windows:
        # floor(j * n / wanted) is strictly increasing for wanted <= n: distinct windows.
        windows = (np.arange(wanted, dtype=np.int64) * n_windows) // wanted
    else:
        windows = np.arange(n_windows, dtype=np.int64)
    starts = windows * seq_len
    return [_gather(tokens, starts[i : i + batch_size], seq_len) for i in range(0, len(starts), batch_size)]
