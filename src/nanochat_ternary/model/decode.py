"""Batch-1 decoding that reads fewer bytes: the weights quantized once, the exact int8 forward.

Why
---
The model's own forward (``GPT.hidden_states`` with a KV cache, as ``generate`` runs it) is written
for training: every BitLinear call re-quantizes its fp32 shadow weight (several passes over 4 bytes
per weight, per token) before an fp32 GEMM. At batch 1 decoding is bound by the bytes each token
reads, so :class:`Decoder` packs every block matrix once (model/int8_linear.py: int8 codes, 1 byte
per weight, and the group scales), fuses the layers that share an input (q|k|v, w1|w3: one
activation quantization and one product each), keeps a static KV cache, and runs one plain Python
loop per token with no module dispatch.

``mode = "int8"`` is the exact integer forward (the same codes and scales as the model; the
integer partial sums are exact, only the fp32 scale arithmetic rounds); ``mode = "fp32"`` is the
same loop over cached fake-quantized fp32 weights (the fake-quant product, 4 bytes per weight),
the peer that isolates what int8 buys. Embeddings, norms and the LM head stay as in the model (fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import int8_linear as i8
from .bitlinear import BitLinear, _fake_quant_act, _fake_quant_weight
from .gpt import GPT, KVCache, apply_rope

DECODE_MODES = ("int8", "fp32")


class _Fused:
    """BitLinears sharing one input, as one product: ``h [T, K] -> [T, sum(out)]``."""

    def __init__(self, layers: list[BitLinear], mode: str) -> None:
        w = torch.cat([lin.weight.detach().float() for lin in layers], dim=0)  # [sum M, K]
        gs, quantize = layers[0].group_size, layers[0].quantize
        self.mode = mode if quantize else "plain"
        self.sizes = [lin.out_features for lin in layers]
        if self.mode == "int8":
            # K % gs == 0, so each group lies in one row and stacking rows keeps every group
            self.backend = i8.backend_for(w.device)
            self.pack = i8.pack_ternary(w, gs, self.backend, None)
            self.code_dtype = torch.int8 if self.backend == "int8" else torch.float32
        else:
            self.w = _fake_quant_weight(w, gs) if quantize else w  # [sum M, K]

    def __call__(self, h: Tensor) -> Tensor:
        if self.mode == "int8":
            q, c = i8.quantize_act_codes(h, self.code_dtype)
            return i8.int8_matmul(q, c, self.pack)
        return F.linear(_fake_quant_act(h) if self.mode == "fp32" else h, self.w)

    def nbytes(self) -> int:
        """Bytes of weights (codes + scales, or fp32) this product reads per call."""
        if self.mode == "int8":
            return self.pack.codes.nbytes + self.pack.scales.nbytes
        return self.w.nbytes


@dataclass
class _Block:
    attn_norm: Tensor
    ffn_norm: Tensor
    qkv: _Fused
    wo: _Fused
    w13: _Fused
    w2: _Fused


class Decoder:
    """Batch-1 incremental decoding of ``model`` (a snapshot: later changes to the model are not
    seen). ``forward(ids)`` appends the tokens to the cache and returns the last position's fp32
    logits ``[V]``; ``reset()`` empties the cache."""

    def __init__(self, model: GPT, mode: str = "int8", max_len: int | None = None) -> None:
        if mode not in DECODE_MODES:
            raise ValueError(f"decode mode must be one of {DECODE_MODES}, got {mode!r}")
        cfg = model.cfg
        for lin in model.modules():
            if isinstance(lin, BitLinear) and lin.quantize and mode == "int8" and not i8.int8_supported(
                    lin.in_features, lin.group_size, lin.act_format):
                raise ValueError(f"the int8 decoder needs int8 activations and in_features % group_size == 0 "
                                 f"(got {lin.in_features} % {lin.group_size}, act_format {lin.act_format}); "
                                 "use mode='fp32'")
            if isinstance(lin, BitLinear) and lin.quantize and getattr(lin, "quant_mix", 1.0) != 1.0:
                raise ValueError("the decoder runs the ternary model: this one is mid QAT ramp (quant_mix != 1)")
            if isinstance(lin, BitLinear) and lin.quantize and lin.act_format != "int8":
                raise ValueError(f"the decoder supports int8 activations only, not {lin.act_format!r}")
        self.cfg, self.mode = cfg, mode
        self.blocks = [
            _Block(b.attn_norm.weight.detach(), b.ffn_norm.weight.detach(),
                   _Fused([b.attn.wq, b.attn.wk, b.attn.wv], mode), _Fused([b.attn.wo], mode),
                   _Fused([b.ffn.w1, b.ffn.w3], mode), _Fused([b.ffn.w2], mode))
            for b in model.blocks
        ]
        self.emb = model.tok_emb.weight.detach()
        self.head = model.lm_head.weight.detach()
        self.norm_f = model.norm_f.weight.detach()
        self.cos, self.sin = model.rope_cos, model.rope_sin  # [max_seq_len, hd/2]
        self.cache = KVCache(1, cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, max_len or cfg.max_seq_len,
                             device=self.emb.device, dtype=self.emb.dtype)

    def reset(self) -> None:
        self.cache.reset()

    def weight_bytes(self) -> int:
        """Bytes of weights one token reads: block matrices (as packed) + the LM head (fp32)."""
        return sum(f.nbytes() for b in self.blocks for f in (b.qkv, b.wo, b.w13, b.w2)) + self.head.nbytes

    def kv_bytes(self) -> int:
        """Bytes of keys and values one token reads at the current cache position."""
        c = self.cache
        return 2 * self.cfg.n_layers * self.cfg.n_kv_heads * self.cfg.head_dim * c.pos * c.k.element_size()

    @torch.inference_mode()
    def forward(self, ids: list[int] | Tensor) -> Tensor:
        """Tokens ``ids`` (``T >= 1``) at the next ``T`` positions -> logits of the last one, ``[V]``."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.emb.device).reshape(-1)
        cfg, cache = self.cfg, self.cache
        T, start = ids.numel(), cache.pos
        if start + T > cache.max_len or start + T > cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} positions exceeds the decoder's {cache.max_len}")
        H, Hkv, hd, D, eps = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim, cfg.norm_eps
        cos, sin = self.cos[start:start + T], self.sin[start:start + T]  # [T, hd/2]
        mask, causal = None, start == 0 and T > 1
        if start > 0 and T > 1:  # query i at absolute position start+i sees keys 0..start+i
            dev = self.emb.device
            mask = torch.arange(start + T, device=dev)[None, :] <= torch.arange(start, start + T, device=dev)[:, None]
        extra = {"enable_gqa": True} if Hkv != H else {}
        x = F.embedding(ids, self.emb)  # [T, D]
        for i, b in enumerate(self.blocks):
            qkv = b.qkv(F.rms_norm(x, (D,), b.attn_norm, eps))  # [T, D + 2 Hkv hd]
            q, k, v = qkv.split((H * hd, Hkv * hd, Hkv * hd), dim=-1)
            q = apply_rope(q.view(1, T, H, hd), cos, sin).transpose(1, 2)  # [1, H, T, hd]
            k = apply_rope(k.view(1, T, Hkv, hd), cos, sin).transpose(1, 2)
            k, v = cache.update(i, k, v.view(1, T, Hkv, hd).transpose(1, 2))  # [1, Hkv, start+T, hd]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, **extra)
            x = x + b.wo(y.transpose(1, 2).reshape(T, D))
            g, u = b.w13(F.rms_norm(x, (D,), b.ffn_norm, eps)).chunk(2, dim=-1)
            x = x + b.w2(F.silu(g) * u)
        cache.advance(T)
        h = F.rms_norm(x[-1:], (D,), self.norm_f, eps)
        return F.linear(h, self.head).float()[0]
