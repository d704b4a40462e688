"""Batched decoding: one forward step for several sequences, each at its own position.

The model's :class:`~nanochat_ternary.model.gpt.KVCache` keeps one position for the whole batch,
which suits one request. A server decodes requests that arrived at different times with prompts of
different lengths, so here every row of :class:`SlotCache` has its own length: a decode step feeds
one token per row, writes that row's key/value at the row's own position, rotates it by that
position (RoPE) and lets it attend to that row's filled prefix only.

:func:`decode_step` runs the model's own modules (norms, BitLinear projections, SwiGLU, head) in the
order of ``Block.forward``; only the attention's cache bookkeeping differs. :func:`decode_step_fused`
is the same step over model/decode.py's :class:`Decoder` weights (block matrices quantized once at
load, not per token; ~3x faster per step at tiny-cpu size), which the engine uses for fp32 models.
Prefill (a whole prompt, one request) runs through ``GPT.hidden_states`` (or ``Decoder.forward``)
with an ordinary ``KVCache`` whose keys/values :meth:`SlotCache.load` copies into a row.
tests/test_serve.py checks the module path against the model's full forward of each sequence in
float64, and the fused path against the Decoder's own batch-1 forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model.bitlinear import BitLinear
from ..model.decode import Decoder
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


class _Step:
    """What one decode step shares between the two weight paths: per-row positions, masks, angles."""

    def __init__(self, cache: SlotCache, n: int, rope_cos: Tensor, rope_sin: Tensor, gqa: bool) -> None:
        device = cache.k.device
        pos_list = cache.lengths[:n]
        if max(pos_list) >= cache.max_len:
            raise ValueError(f"a row is full: position {max(pos_list)} >= max_seq_len {cache.max_len}")
        self.cache, self.n = cache, n
        self.pos = torch.tensor(pos_list, dtype=torch.long, device=device)  # [n]
        self.rows = torch.arange(n, device=device)
        self.span = max(pos_list) + 1  # keys any row can see
        # row i sees keys 0 .. pos[i] (its own prefix and the new token); [n, 1, 1, span] for SDPA
        self.mask = (torch.arange(self.span, device=device)[None, :] <= self.pos[:, None])[:, None, None, :]
        self.cos, self.sin = rope_cos[self.pos], rope_sin[self.pos]  # [n, hd/2]
        self.extra = {"enable_gqa": True} if gqa else {}

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``q: [n, H, hd]``, ``k, v: [n, Hkv, hd]`` of the new tokens -> attention output ``[n, H * hd]``.

        apply_rope rotates ``[B, T, H, hd]`` by per-T angles: the n rows stand on the T axis here, so
        each row gets the angle of its own position."""
        n, c = self.n, self.cache
        q = apply_rope(q[None], self.cos, self.sin)[0][:, :, None, :]  # [n, H, 1, hd]
        k = apply_rope(k[None], self.cos, self.sin)[0]  # [n, Hkv, hd]
        c.k[layer, self.rows, :, self.pos] = k
        c.v[layer, self.rows, :, self.pos] = v
        keys = c.k[layer, :n, :, :self.span]  # [n, Hkv, span, hd] (a view)
        vals = c.v[layer, :n, :, :self.span]
        y = F.scaled_dot_product_attention(q, keys, vals, attn_mask=self.mask, **self.extra)  # [n, H, 1, hd]
        return y.reshape(n, -1)

    def advance(self) -> None:
        for i in range(self.n):
            self.cache.lengths[i] += 1


@torch.inference_mode()
def decode_step(model: GPT, cache: SlotCache, tokens: list[int]) -> Tensor:
    """Feed ``tokens[i]`` to live row ``i`` (``n = len(tokens)`` rows) at position ``cache.lengths[i]``
    through the model's own modules (any dtype, any activation format).

    Returns the next-token logits ``[n, V]`` (fp32) and advances each row's length by one."""
    n = len(tokens)
    cfg = model.cfg
    H, Hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    st = _Step(cache, n, model.rope_cos, model.rope_sin, Hkv != H)
    x = model.tok_emb(torch.tensor(tokens, dtype=torch.long, device=cache.k.device)[:, None])  # [n, 1, D]
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        xq = attn.wq.quantize_input(block.attn_norm(x))
        q = attn.wq(xq, x_is_quantized=True).view(n, H, hd)
        k = attn.wk(xq, x_is_quantized=True).view(n, Hkv, hd)
        v = attn.wv(xq, x_is_quantized=True).view(n, Hkv, hd)
        x = x + attn.wo(st.attend(layer, q, k, v)[:, None, :])
        x = x + block.ffn(block.ffn_norm(x))
    st.advance()
    return model.logits(model.norm_f(x)[:, 0])


def fused_decoder(model: GPT) -> Decoder | None:
    """model/decode.py's Decoder (block weights quantized once, q|k|v and w1|w3 fused): int8 where the
    model's layers take the int8 product, else fp32 fake-quant; None where it does not apply (a
    float64 model, 4-bit activations): the module path then serves."""
    if model.tok_emb.weight.dtype != torch.float32:
        return None
    lins = [m for m in model.modules() if isinstance(m, BitLinear) and m.quantize]
    mode = "int8" if lins and all(m.uses_int8(m.weight.device) for m in lins) else "fp32"
    try:
        return Decoder(model, mode=mode, max_len=1)
    except ValueError:
        return None


@torch.inference_mode()
def prefill_fused(dec: Decoder, prompt: list[int]) -> tuple[KVCache, Tensor]:
    """:func:`prefill` through the Decoder's weights: a fresh cache and the last logits ``[1, V]``."""
    cfg = dec.cfg
    dec.cache = KVCache(1, cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, len(prompt),
                        device=dec.emb.device, dtype=dec.emb.dtype)
    logits = dec.forward(prompt)
    return dec.cache, logits[None]


@torch.inference_mode()
def decode_step_fused(dec: Decoder, cache: SlotCache, tokens: list[int]) -> Tensor:
    """:func:`decode_step` with the Decoder's packed weights (the forward of ``Decoder.forward``,
    every row at its own position). Returns the logits ``[n, V]`` (fp32)."""
    n = len(tokens)
    cfg = dec.cfg
    H, Hkv, hd, D, eps = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim, cfg.norm_eps
    st = _Step(cache, n, dec.cos, dec.sin, Hkv != H)
    x = F.embedding(torch.tensor(tokens, dtype=torch.long, device=cache.k.device), dec.emb)  # [n, D]
    for layer, b in enumerate(dec.blocks):
        qkv = b.qkv(F.rms_norm(x, (D,), b.attn_norm, eps))  # [n, D + 2 Hkv hd]
        q, k, v = qkv.split((H * hd, Hkv * hd, Hkv * hd), dim=-1)
        x = x + b.wo(st.attend(layer, q.reshape(n, H, hd), k.reshape(n, Hkv, hd), v.reshape(n, Hkv, hd)))
        g, u = b.w13(F.rms_norm(x, (D,), b.ffn_norm, eps)).chunk(2, dim=-1)
        x = x + b.w2(F.silu(g) * u)
    st.advance()
    return F.linear(F.rms_norm(x, (D,), dec.norm_f, eps), dec.head).float()


@torch.inference_mode()
def step_with_prefill(dec: Decoder, cache: SlotCache, tokens: list[int], prompt: list[int]) -> tuple[Tensor, Tensor]:
    """:func:`decode_step_fused` for live rows ``0 .. n-1`` and, in the same products, the prefill of
    ``prompt`` into row ``n`` (the next free row): the ``n + T`` tokens share every linear layer (one
    GEMM each instead of a second forward's worth of per-op overhead), attention stays per sequence.

    Returns the decode rows' logits ``[n, V]`` and the prompt's last logits ``[1, V]``; row ``n`` is
    then filled to ``T`` and the decode rows advanced by one. ``n`` may be 0."""
    n, T = len(tokens), len(prompt)
    cfg = dec.cfg
    H, Hkv, hd, D, eps = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim, cfg.norm_eps
    if n + 1 > cache.slots or T > cache.max_len:
        raise ValueError(f"no free row for a prompt of {T} tokens ({n} rows live, {cache.slots} slots)")
    st = _Step(cache, n, dec.cos, dec.sin, Hkv != H) if n else None
    cos, sin = dec.cos[:T], dec.sin[:T]  # [T, hd/2]: the prompt from position 0
    extra = {"enable_gqa": True} if Hkv != H else {}
    ids = torch.tensor(tokens + prompt, dtype=torch.long, device=cache.k.device)
    x = F.embedding(ids, dec.emb)  # [n + T, D]
    for layer, b in enumerate(dec.blocks):
        qkv = b.qkv(F.rms_norm(x, (D,), b.attn_norm, eps))  # [n + T, D + 2 Hkv hd]
        q, k, v = qkv.split((H * hd, Hkv * hd, Hkv * hd), dim=-1)
        qp = apply_rope(q[n:].reshape(1, T, H, hd), cos, sin).transpose(1, 2)  # [1, H, T, hd]
        kp = apply_rope(k[n:].reshape(1, T, Hkv, hd), cos, sin).transpose(1, 2)  # [1, Hkv, T, hd]
        vp = v[n:].reshape(1, T, Hkv, hd).transpose(1, 2)
        cache.k[layer, n, :, :T] = kp[0]
        cache.v[layer, n, :, :T] = vp[0]
        yp = F.scaled_dot_product_attention(qp, kp, vp, is_causal=T > 1, **extra)  # [1, H, T, hd]
        yp = yp.transpose(1, 2).reshape(T, D)
        if st is not None:
            yd = st.attend(layer, q[:n].reshape(n, H, hd), k[:n].reshape(n, Hkv, hd), v[:n].reshape(n, Hkv, hd))
            yp = torch.cat((yd, yp))  # [n + T, D]
        x = x + b.wo(yp)
        g, u = b.w13(F.rms_norm(x, (D,), b.ffn_norm, eps)).chunk(2, dim=-1)
        x = x + b.w2(F.silu(g) * u)
    if st is not None:
        st.advance()
    cache.lengths[n] = T
    last = torch.cat((x[:n], x[n + T - 1:])) if n else x[-1:]  # the rows whose logits are needed
    logits = F.linear(F.rms_norm(last, (D,), dec.norm_f, eps), dec.head).float()  # [n + 1, V]
    return logits[:n], logits[n:]
