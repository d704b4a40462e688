"""Batched decoding: one forward step for several sequences, each at its own position.

The model's :class:`~nanochat_ternary.model.gpt.KVCache` keeps one position for the whole batch,
which suits one request. A server decodes requests that arrived at different times with prompts of
different lengths, so here every row of :class:`SlotCache` has its own length: a decode step feeds
one token per row, writes that row's key/value at the row's own position, rotates it by that
position (RoPE) and lets it attend to that row's filled prefix only.

:func:`decode_step` runs the model's own modules (norms, BitLinear projections, SwiGLU, head) in the
order of ``Block.forward``; only the attention's cache bookkeeping differs. Prefill (a whole prompt,
one request) runs through ``GPT.hidden_states`` with an ordinary ``KVCache`` whose keys/values
:meth:`SlotCache.load` copies into a row. tests/test_serve.py checks the logits against the model's
full forward of each sequence in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model.gpt import GPT, KVCache, apply_rope


class SlotCache:
    """Keys/values for up to ``slots`` sequences: ``k, v: [n_layers, slots, n_kv_heads, max_len, head_dim]``.

    Rows ``0 .. n-1`` are the live sequences (the engine keeps them packed at the front, so a step
    works on views, not copies); ``lengths[i]`` is row ``i``'s number of filled positions."""

    def __init__(self, model: GPT, slots: int) -> None:
        cfg = model.cfg
        w = model.tok_emb.weight
        shape = (cfg.n_layers, slots, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=w.device, dtype=w.dtype)
        self.v = torch.zeros(shape, device=w.device, dtype=w.dtype)
        self.slots = slots
        self.max_len = cfg.max_seq_len
        self.lengths = [0] * slots

    def load(self, row: int, cache: KVCache) -> None:
        """Copy a batch-1 ``KVCache`` (a prefilled prompt) into ``row``."""
        n = cache.pos
        self.k[:, row, :, :n] = cache.k[:, 0, :, :n]
        self.v[:, row, :, :n] = cache.v[:, 0, :, :n]
        self.lengths[row] = n

    def move(self, src: int, dst: int) -> None:
        """Copy row ``src`` to row ``dst`` (to keep the live rows packed when one finishes)."""
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n


@torch.inference_mode()
def prefill(model: GPT, prompt: list[int]) -> tuple[KVCache, Tensor]:
    """Run ``prompt`` (one sequence) into a fresh ``KVCache``; returns it and the last logits ``[1, V]``."""
    device = model.tok_emb.weight.device
    cache = KVCache.for_model(model, batch_size=1, max_len=len(prompt))
    h = model.hidden_states(torch.tensor([prompt], dtype=torch.long, device=device), kv_cache=cache)
    return cache, model.logits(h[:, -1])


@torch.inference_mode()
def decode_step(model: GPT, cache: SlotCache, tokens: list[int]) -> Tensor:
    """Feed ``tokens[i]`` to live row ``i`` (``n = len(tokens)`` rows) at position ``cache.lengths[i]``.

    Returns the next-token logits ``[n, V]`` (fp32) and advances each row's length by one."""
    n = len(tokens)
    device = cache.k.device
    cfg = model.cfg
    H, Hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    pos_list = cache.lengths[:n]
    if max(pos_list) >= cache.max_len:
        raise ValueError(f"a row is full: position {max(pos_list)} >= max_seq_len {cache.max_len}")
    pos = torch.tensor(pos_list, dtype=torch.long, device=device)  # [n]
    rows = torch.arange(n, device=device)
    span = max(pos_list) + 1  # keys any row can see
    # row i sees keys 0 .. pos[i] (its own prefix and the new token); [n, 1, 1, span] for SDPA
    mask = (torch.arange(span, device=device)[None, :] <= pos[:, None])[:, None, None, :]
    cos, sin = model.rope_cos[pos], model.rope_sin[pos]  # [n, hd/2]
    x = model.tok_emb(torch.tensor(tokens, dtype=torch.long, device=device)[:, None])  # [n, 1, D]
    extra = {"enable_gqa": True} if Hkv != H else {}
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        xq = attn.wq.quantize_input(block.attn_norm(x))
        q = attn.wq(xq, x_is_quantized=True).view(1, n, H, hd)
        k = attn.wk(xq, x_is_quantized=True).view(1, n, Hkv, hd)
        v = attn.wv(xq, x_is_quantized=True).view(n, Hkv, hd)
        # apply_rope rotates [B, T, H, hd] by per-T angles: the n rows stand on the T axis here,
        # so each row gets the angle of its own position
        q = apply_rope(q, cos, sin)[0][:, :, None, :]  # [n, H, 1, hd]
        k = apply_rope(k, cos, sin)[0]  # [n, Hkv, hd]
        cache.k[layer, rows, :, pos] = k
        cache.v[layer, rows, :, pos] = v
        keys = cache.k[layer, :n, :, :span]  # [n, Hkv, span, hd] (a view)
        vals = cache.v[layer, :n, :, :span]
        y = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, **extra)  # [n, H, 1, hd]
        x = x + attn.wo(y.transpose(1, 2).reshape(n, 1, H * hd))
        x = x + block.ffn(block.ffn_norm(x))
    for i in range(n):
        cache.lengths[i] += 1
    return model.logits(model.norm_f(x)[:, 0])
