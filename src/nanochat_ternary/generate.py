"""Text generation with a KV cache: prefill the prompt once, then one token per step.

Re-running the whole context for every new token costs O(T^2) layer evaluations per sequence;
with a :class:`~nanochat_ternary.model.gpt.KVCache` each step only runs the new token through the
model and attends over the cached keys/values, O(T).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import torch
from torch import Tensor

from .model.gpt import GPT, KVCache


def _int8_decoder(model: GPT, max_len: int):
    """model/decode.py's int8 Decoder when the model asks for the int8 product
    (``ternary_matmul`` int8, or auto where it measures faster) and every layer can take it; else None."""
    from .model.bitlinear import BitLinear
    from .model.decode import Decoder

    lins = [m for m in model.modules() if isinstance(m, BitLinear) and m.quantize]
    if not lins or not all(m.uses_int8(m.weight.device) for m in lins):
        return None
    return Decoder(model, mode="int8", max_len=max_len)


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample one token per row from ``logits: [B, V]`` -> ``LongTensor[B]``.

    ``temperature <= 0`` is greedy (argmax). Otherwise the logits are divided by ``temperature``,
    restricted to the ``top_k`` most likely tokens (``None`` or ``<= 0``: no limit), then to the
    smallest set of most likely tokens whose probability reaches ``top_p`` (``None`` or ``>= 1``:
    no limit; the most likely token is always kept), renormalised and sampled.
    """
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    V = logits.shape[-1]
    if top_k is not None and 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def _forward_last(model: GPT, ids: Tensor, cache: KVCache) -> Tensor:
    """Run ``ids: [1, T]`` through the model with the cache; logits of the last position ``[1, V]``."""
    h = model.hidden_states(ids, kv_cache=cache)  # [1, T, D]
    return model.logits(h[:, -1])


@torch.inference_mode()
def _sample(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
            generator: torch.Generator) -> int:
    return int(sample_next(logits, temperature, top_k, top_p, generator)[0])


def generate(
    model: GPT,
    prompt_ids: list[int],
    max_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    seed: int = 0,
    stop_ids: Iterable[int] | None = None,
) -> Iterator[int]:
    """Yield up to ``max_tokens`` new token ids continuing ``prompt_ids``.

    The prompt is prefilled into a KV cache in one forward, then each step feeds only the token
    just sampled. A prompt longer than ``max_seq_len - 1`` keeps its last ``max_seq_len - 1``
    tokens (room for at least one new token), and generation stops when prompt + output reach
    ``max_seq_len``. A sampled id in ``stop_ids`` ends generation and is not yielded. Sampling is
    deterministic for a given ``seed``. The model is put in eval mode while generating.
    """
    if not prompt_ids:
        raise ValueError("generate needs a non-empty prompt (e.g. a BOS token)")
    if max_tokens <= 0:
        return
    max_len = model.cfg.max_seq_len
    prompt = list(prompt_ids)[-(max_len - 1):] if max_len > 1 else list(prompt_ids)[-1:]
    budget = min(max_tokens, max_len - len(prompt))
    stops = set(stop_ids or ())
    device = model.tok_emb.weight.device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)

    was_training = model.training
    model.eval()
    try:
        # the int8 path decodes with weights packed once (model/decode.py; exact int8 forward)
        dec = _int8_decoder(model, len(prompt) + budget)
        if dec is not None:
            logits = dec.forward(prompt)[None]
        else:
            with torch.inference_mode():
                cache = KVCache.for_model(model, batch_size=1, max_len=len(prompt) + budget)
            logits = _forward_last(model, torch.tensor([prompt], dtype=torch.long, device=device), cache)
        for i in range(budget):
            tok = _sample(logits, temperature, top_k, top_p, generator)
            if tok in stops:
                return
            yield tok
            if i + 1 < budget and dec is not None:
                logits = dec.forward([tok])[None]
            elif i + 1 < budget:  # the last token needs no forward
                logits = _forward_last(model, torch.tensor([[tok]], dtype=torch.long, device=device), cache)
    finally:
        model.train(was_training)


class TextTokenizer(Protocol):
    eot_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...


def prompt_ids(tok: TextTokenizer, prompt: str) -> list[int]:
    """The ids a generation starts from: the prompt's tokens, or for an empty prompt the
    end-of-text separator the data puts between documents (i.e. start a new document)."""
    return tok.encode(prompt) if prompt else [tok.eot_id]


def stream_text(tokens: Iterable[int], decode: Callable[[list[int]], str],
                write: Callable[[str], object] | None = None, flush: Callable[[], object] | None = None) -> list[int]:
    """Write the decoded text of ``tokens`` as it arrives, whole UTF-8 characters only (a token may end
    inside a multi-byte character: its decoded text then ends in U+FFFD until the rest arrives).
    Returns the ids; the final flush writes whatever is left, replacement characters included.
    ``write`` / ``flush`` default to the *current* ``sys.stdout`` (looked up per call, not at import)."""
    write = write or sys.stdout.write
    flush = flush or sys.stdout.flush
    out: list[int] = []
    printed = 0
    for tid in tokens:
        out.append(tid)
        text = decode(out)
        if not text.endswith("\ufffd"):
            write(text[printed:])
            flush()
            printed = len(text)
    write(decode(out)[printed:])
    flush()
    return out
