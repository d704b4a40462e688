"""Log-likelihood of token spans, batched: the one primitive every scored task here uses.

A request is a token sequence and how many of its last tokens to score. The model behind it is a
:class:`Scorer`: our GPT here, a GGUF on llama.cpp or an HF export on transformers in engines.py. The model reads
``ids[:-1]`` and each scored token ``ids[j]`` gets ``log p(ids[j] | ids[:j])``. Requests are sorted
longest first (as lm-eval-harness does), right-padded to the longest in their batch and run in one
forward per batch. Right padding cannot change a real position's result: attention is causal
and every BitLinear quantizes its input per token, so no padded position is ever read by a
scored one. Logits are computed only at the scored positions; each token's log-probability is
taken in fp32 (a stable logsumexp) and handed back in float64, so sums over thousands of tokens
do not lose digits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..model.gpt import GPT


@dataclass(frozen=True)
class Request:
    """``ids``: context + continuation token ids; the last ``n_score`` of them are scored."""

    ids: list[int]
    n_score: int


def check_request(req: Request, max_seq_len: int) -> None:
    """ValueError unless the model can score ``req`` in one forward (callers turn it into a
    UserError naming the item)."""
    if req.n_score < 1:
        raise ValueError("nothing to score (an empty continuation)")
    if req.n_score > len(req.ids) - 1:
        raise ValueError("a scored span needs at least one context token before it")
    if len(req.ids) - 1 > max_seq_len:
        raise ValueError(f"{len(req.ids) - 1} tokens of input exceed the model's context of {max_seq_len}")


def _batches(order: list[int], batch_size: int) -> Iterator[list[int]]:
    for i in range(0, len(order), batch_size):
        yield order[i:i + batch_size]


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """``log p(target)`` per row of ``logits`` ``[M, V]`` (fp32 logsumexp), as float64 ``[M]``."""
    # logsumexp is stable in fp32 (error ~1e-7 relative); a float64 copy of [M, V] would cost
    # more than the forward's head. Per-token values go to float64 before anything sums them.
    logits = logits.float()
    lp = (logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)).double()  # [M]
    return lp.cpu().numpy()


def padded_batch(reqs: list[Request]) -> tuple[torch.Tensor, list[int], list[int], list[int]]:
    """``(x [B, L] right-padded inputs, rows, cols, targets)``: input position ``cols[m]`` of row
    ``rows[m]`` predicts ``targets[m]``, for every scored token of every request, in order."""
    L = max(len(r.ids) - 1 for r in reqs)
    x = torch.zeros(len(reqs), L, dtype=torch.long)  # pad id 0: never read by a scored position
    rows, cols, tgts = [], [], []
    for b, r in enumerate(reqs):
        n = len(r.ids) - 1
        x[b, :n] = torch.tensor(r.ids[:-1], dtype=torch.long)
        rows += [b] * r.n_score
        cols += range(n - r.n_score, n)  # input position j predicts ids[j + 1]
        tgts += r.ids[len(r.ids) - r.n_score:]
    return x, rows, cols, tgts


def split_scores(lp: np.ndarray, reqs: list[Request]) -> list[np.ndarray]:
    out, k = [], 0
    for r in reqs:
        out.append(lp[k:k + r.n_score])
        k += r.n_score
    return out


class Scorer(ABC):
    """What scoring needs of a model: its context length and the log-probabilities of the scored
    tokens of a batch of requests. Ours (:class:`GPTScorer`), a GGUF on llama.cpp and an HF export
    on transformers (eval/engines.py) each implement :meth:`batch_logprobs`; the task code is shared."""

    max_seq_len: int

    @abstractmethod
    def batch_logprobs(self, reqs: list[Request]) -> list[np.ndarray]:
        """float64 ``[n_score]`` natural-log probabilities per request."""


class GPTScorer(Scorer):
    """Our GPT (any device; eval mode while scoring, its mode restored after)."""

    def __init__(self, model: GPT) -> None:
        self.model, self.max_seq_len = model, model.cfg.max_seq_len

    @torch.inference_mode()
    def batch_logprobs(self, reqs: list[Request]) -> list[np.ndarray]:
        model = self.model
        device = model.tok_emb.weight.device
        x, rows, cols, tgts = padded_batch(reqs)
        was_training = model.training
        model.eval()
        try:
            h = model.hidden_states(x.to(device))  # [B, L, D]
            logits = model.logits(h[torch.tensor(rows, device=device), torch.tensor(cols, device=device)])  # [M, V]
        finally:
            model.train(was_training)
        return split_scores(token_logprobs(logits, torch.tensor(tgts, device=device)), reqs)


def as_scorer(model: GPT | Scorer) -> Scorer:
    return model if isinstance(model, Scorer) else GPTScorer(model)


def score_requests(model: GPT | Scorer, requests: Sequence[Request], batch_size: int = 16,
                   progress: Callable[[int], object] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(index, logprobs)`` per request as its batch finishes: ``logprobs`` is a float64
    array ``[n_score]`` of natural-log probabilities. Longest requests first; ``progress(k)`` is
    called with the number of requests each batch finished (a tqdm bar's ``update``). ``model``:
    our GPT or any :class:`Scorer`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    scorer = as_scorer(model)
    for r in requests:
        check_request(r, scorer.max_seq_len)
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].ids))
    for chunk in _batches(order, batch_size):
        yield from zip(chunk, scorer.batch_logprobs([requests[i] for i in chunk]))
        if progress is not None:
            progress(len(chunk))
