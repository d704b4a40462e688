"""The decode engine: one worker thread owns the model and decodes every live request in one batch.

Requests arrive from the HTTP side through :meth:`Engine.submit` (thread-safe, never blocks). The
worker loop, each iteration:

1. admits waiting requests into free rows (up to ``max_batch``): prefill the prompt alone, sample its
   first token;
2. runs one :func:`~.batched.decode_step` for all live rows together, samples one token per row with
   that request's own sampling settings and generator (its seed);
3. hands each token to its request's ``emit`` callback, and frees the rows that finished (stop id,
   token budget, or cancelled by the client).

At most ``max_batch`` requests decode and ``max_queue`` wait; one more is refused at once with
:class:`Busy` (the server answers 503), so a burst costs a retry, never an unbounded backlog.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..generate import sample_next
from ..model.gpt import GPT
from .batched import (
    SlotCache,
    decode_step,
    decode_step_fused,
    fused_decoder,
    prefill,
    prefill_fused,
    step_with_prefill,
)

log = logging.getLogger("nanochat_ternary.serve")

# emitted events: ("token", id) for each new token; ("done", "stop" | "length"); ("error", message)
Event = tuple[str, object]


class Busy(Exception):
    """Every decode row is taken and the waiting queue is full."""


@dataclass
class Job:
    """One generation: a prompt and how to sample its continuation."""

    prompt: list[int]
    max_new: int  # tokens to generate at most (already fitted to the context by the caller)
    emit: Callable[[Event], None]  # called on the worker thread
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    cancelled: threading.Event = field(default_factory=threading.Event)
    # worker-side state
    generator: torch.Generator | None = None
    produced: int = 0
    next_token: int = -1

    def cancel(self) -> None:
        """Ask the worker to drop this job at its next step (the client went away, or a stop string)."""
        self.cancelled.set()


class Engine:
    """A worker thread decoding up to ``max_batch`` requests per forward step; ``max_queue`` more wait."""

    def __init__(self, model: GPT, max_batch: int = 8, max_queue: int = 64, fused: bool = True) -> None:
        """``fused``: decode through model/decode.py's packed weights where they apply (see
        :func:`~.batched.fused_decoder`); False: always through the model's modules."""
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.model = model.eval()
        self.decoder = fused_decoder(model) if fused else None
        self.path = f"fused {self.decoder.mode}" if self.decoder is not None else "modules"
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.device = model.tok_emb.weight.device
        self.cache = SlotCache(model, max_batch)
        self._waiting: collections.deque[Job] = collections.deque()
        self._live: list[Job] = []  # row i of the cache is _live[i]
        self._cond = threading.Condition()
        self._stop = False
        self.steps = 0  # decode steps run (for stats)
        self.rows_decoded = 0  # sum over steps of the live rows (steps * mean batch)
        self._thread = threading.Thread(target=self._run, name="nanochat-decode", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- HTTP side (any thread)

    def submit(self, job: Job) -> None:
        """Queue ``job`` or raise :class:`Busy` when ``max_batch + max_queue`` requests are already in."""
        with self._cond:
            if self._stop:
                raise Busy("the server is shutting down")
            if len(self._waiting) + len(self._live) >= self.max_batch + self.max_queue:
                raise Busy(f"{len(self._live)} requests decoding and {len(self._waiting)} waiting "
                           f"(--max-batch {self.max_batch}, --max-queue {self.max_queue})")
            self._waiting.append(job)
            self._cond.notify()

    def load(self) -> dict[str, object]:
        """Requests decoding / waiting, the limits, decode steps so far and their mean batch size."""
        with self._cond:
            return {"decoding": len(self._live), "waiting": len(self._waiting),
                    "max_batch": self.max_batch, "max_queue": self.max_queue, "decode_path": self.path,
                    "decode_steps": self.steps,
                    "mean_batch": round(self.rows_decoded / self.steps, 3) if self.steps else 0.0}

    def close(self, timeout: float = 30.0) -> None:
        """Finish the live and waiting jobs, then stop the worker."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)

    # ---------------------------------------------------------------- worker thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._live and not self._stop:
                    self._cond.wait()
                if self._stop and not self._waiting and not self._live:
                    return
                admitted = []
                while self._waiting and len(self._live) + len(admitted) < self.max_batch:
                    admitted.append(self._waiting.popleft())
            # fused path: the first admitted prompt is prefilled inside this step's products
            joining = admitted.pop(0) if admitted and self.decoder is not None else None
            try:
                for job in admitted:
                    self._admit(job)
                if self._live or joining is not None:
                    self._step(joining)
            except Exception as e:  # a bug must fail the requests, not kill the server
                log.exception("decode failed")
                for job in self._live + ([joining] if joining is not None and joining not in self._live else []):
                    job.emit(("error", f"decode failed: {type(e).__name__}: {e}"))
                self._live.clear()

    def _sample(self, job: Job, logits: torch.Tensor) -> int:
        return int(sample_next(logits, job.temperature, job.top_k, job.top_p, job.generator)[0])

    def _seed(self, job: Job) -> None:
        job.generator = torch.Generator(device=self.device)
        # any int a client sends maps to a valid seed (torch takes 0 .. 2**64 - 1)
        job.generator.manual_seed(job.seed % (2 ** 63) if job.seed is not None else time.time_ns() % (2 ** 63))

    def _admit(self, job: Job) -> None:
        """Prefill ``job`` alone into the next free row and sample its first token."""
        if job.cancelled.is_set():
            return
        try:
            self._seed(job)
            cache, logits = (prefill_fused(self.decoder, job.prompt) if self.decoder is not None
                             else prefill(self.model, job.prompt))  # logits [1, V]
        except Exception as e:  # this request's failure only (the HTTP side checks lengths first)
            log.exception("admitting a request failed")
            job.emit(("error", f"prefill failed: {type(e).__name__}: {e}"))
            return
        row = len(self._live)
        self.cache.load(row, cache)
        self._live.append(job)
        self._accept(row, self._sample(job, logits))

    def _accept(self, row: int, tok: int) -> None:
        """Record ``tok`` as row ``row``'s new token (or finish the row)."""
        job = self._live[row]
        job.produced += 1
        if tok in job.stop_ids:
            job.emit(("done", "stop"))
            job.cancel()
            return
        job.emit(("token", tok))
        full = self.cache.lengths[row] >= self.cache.max_len  # nowhere to write this token's key
        if job.produced >= job.max_new or full:
            job.emit(("done", "length"))
            job.cancel()
            return
        job.next_token = tok

    def _step(self, joining: Job | None = None) -> None:
        """One decode step of the live rows; ``joining`` (fused path) is prefilled in the same step
        into the next free row (:func:`~.batched.step_with_prefill`) and samples its first token."""
        self._compact()
        if joining is not None and joining.cancelled.is_set():
            joining = None
        if not self._live and joining is None:
            return
        tokens = [j.next_token for j in self._live]
        if joining is not None:
            self._seed(joining)
            logits, first = step_with_prefill(self.decoder, self.cache, tokens, joining.prompt)  # [n, V], [1, V]
        else:
            logits = (decode_step_fused(self.decoder, self.cache, tokens) if self.decoder is not None
                      else decode_step(self.model, self.cache, tokens))  # [n, V]
        if tokens:
            self.steps += 1
            self.rows_decoded += len(tokens)
        rows = [r for r in range(len(tokens)) if not self._live[r].cancelled.is_set()]
        draws = [sample_next(logits[r:r + 1], j.temperature, j.top_k, j.top_p, j.generator)
                 for r, j in ((r, self._live[r]) for r in rows)]
        if joining is not None:
            self._live.append(joining)  # row len(tokens): rows are only compacted below
            rows.append(len(tokens))
            draws.append(sample_next(first, joining.temperature, joining.top_k, joining.top_p, joining.generator))
        # one device -> host copy per step for all rows (a per-row int() would sync a GPU per row)
        for row, tok in zip(rows, torch.cat(draws).tolist() if draws else []):
            self._accept(row, tok)
        self._compact()

    def _compact(self) -> None:
        """Drop finished/cancelled rows, moving the last live row into each hole."""
        row = 0
        while row < len(self._live):
            if self._live[row].cancelled.is_set():
                last = len(self._live) - 1
                if row != last:
                    self.cache.move(last, row)
                    self._live[row] = self._live[last]
                self._live.pop()
            else:
                row += 1
