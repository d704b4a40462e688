"""Log-likelihood of token spans, batched: the one primitive every scored task here uses.

A request is a token sequence and how many of its last tokens to score. The model reads
``ids[:-1]`` and each scored token ``ids[j]`` gets ``log p(ids[j] | ids[:j])``. Requests are sorted
longest first (as lm-eval-harness does), right-padded to the longest in their batch and run in one
forward per batch. Right padding cannot change a real position's result: attention is causal
and every BitLinear quantizes its input per token, so no padded position is ever read by a
scored one. Logits are computed only at the scored positions; each token's log-probability is
taken in fp32 (a stable logsumexp) and handed back in float64, so sums over thousands of tokens
do not lose digits.
"""

from __future__ import annotations

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


@torch.inference_mode()
def _score_batch(model: GPT, reqs: list[Request]) -> list[np.ndarray]:
    device = model.tok_emb.weight.device
    L = max(len(r.ids) - 1 for r in reqs)
    x = torch.zeros(len(reqs), L, dtype=torch.long)  # pad id 0: never read by a scored position
    rows, cols, tgts = [], [], []
    for b, r in enumerate(reqs):
        n = len(r.ids) - 1
        x[b, :n] = torch.tensor(r.ids[:-1], dtype=torch.long)
        rows += [b] * r.n_score
        cols += range(n - r.n_score, n)  # input position j predicts ids[j + 1]
        tgts += r.ids[len(r.ids) - r.n_score:]
    h = model.hidden_states(x.to(device))  # [B, L, D]
    r_idx = torch.tensor(rows, device=device)
    c_idx = torch.tensor(cols, device=device)
    t_idx = torch.tensor(tgts, device=device)
    logits = model.logits(h[r_idx, c_idx])  # [M, V] fp32, only the scored positions
    # logsumexp is stable in fp32 (error ~1e-7 relative); a float64 copy of [M, V] would cost
    # more than the forward's head. Per-token values go to float64 before anything sums them.
    lp = (logits.gather(1, t_idx[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)).double()  # [M]
    lp_np = lp.cpu().numpy()
    out, k = [], 0
    for r in reqs:
        out.append(lp_np[k:k + r.n_score])
        k += r.n_score
    return out


def score_requests(model: GPT, requests: Sequence[Request], batch_size: int = 16,
                   progress: Callable[[int], object] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(index, logprobs)`` per request as its batch finishes: ``logprobs`` is a float64
    array ``[n_score]`` of natural-log probabilities. Longest requests first; ``progress(k)`` is
    called with the number of requests each batch finished (a tqdm bar's ``update``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for r in requests:
        check_request(r, model.cfg.max_seq_len)
    was_training = model.training
    model.eval()
    try:
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].ids))
        for chunk in _batches(order, batch_size):
            yield from zip(chunk, _score_batch(model, [requests[i] for i in chunk]))
            if progress is not None:
                progress(len(chunk))
    finally:
        model.train(was_training)
