"""The GPT decoder: token embedding, N pre-norm blocks, final RMSNorm, LM head.

Each block is ``x + Attn(RMSNorm(x))`` then ``x + SwiGLU(RMSNorm(x))``. Attention uses rotary
position embeddings (RoPE) and grouped-query attention (GQA). Every Linear inside the blocks is a
:class:`~nanochat_ternary.model.bitlinear.BitLinear` (ternary QAT, or plain Linear when
``quantization = "none"``); embeddings, norms and the LM head stay full precision, because they
are small next to the blocks (or, for the head, sensitive to quantization) and BitNet keeps them so.

Conventions that generation and export must share:

* GQA: query head ``h`` uses key/value head ``h // (n_heads // n_kv_heads)`` (consecutive query
  heads share a kv head), i.e. ``repeat_interleave`` of the kv heads.
* RoPE: "half split" (GPT-NeoX / Llama-HF layout): for a head vector ``x`` of size ``d``, the
  pairs are ``(x[i], x[i + d/2])`` for ``i < d/2``, rotated by ``pos * theta**(-2i/d)``.
* Parameter names: every 2-D parameter under ``blocks.`` is a hidden matrix (the optimizer
  factory sends those to Muon); norms' weights are 1-D; nothing else in the blocks is 2-D.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from ..config import ModelConfig
from .act_quant import formats_by_role
from .bitlinear import BitLinear
from .mtp import MTPHeads

# --------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys/values of every layer for incremental decoding.

    ``k[layer], v[layer]: [B, n_kv_heads, max_len, head_dim]``. ``pos`` is the number of positions
    already filled (the absolute position of the next token). A forward with a cache writes its
    ``T`` new keys/values at ``pos .. pos+T-1`` in every layer, attends over ``0 .. pos+T-1``, and
    then advances ``pos`` by ``T`` (the GPT does that after its last layer).
    """

    def __init__(
        self,
        batch_size: int,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.batch_size = batch_size
        self.max_len = max_len
        self.pos = 0

    @classmethod
    def for_model(cls, model: GPT, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        """A cache shaped for ``model`` (default length: its ``max_seq_len``), on its device/dtype."""
        cfg = model.cfg
        w = model.tok_emb.weight
        return cls(batch_size, cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, max_len or cfg.max_seq_len,
                   device=w.device, dtype=w.dtype)

    def reset(self) -> None:
        self.pos = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k, v: [B, Hkv, T, hd]`` at ``pos``; return the filled prefix ``[B, Hkv, pos+T, hd]``."""
        t = k.shape[2]
        end = self.pos + t
        if end > self.max_len:
            raise ValueError(f"KVCache is full: {self.pos} + {t} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, t: int) -> None:
        self.pos += t


# --------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dim (learnable 1-D weight, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(max_len: int, head_dim: int, theta: float,
                device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """``cos, sin: [max_len, head_dim // 2]`` (fp32) for the half-split rotary embedding."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    pos = torch.arange(max_len, dtype=torch.float32, device=device)
    angles = torch.outer(pos, inv_freq)  # [L, hd/2]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x: [B, T, H, hd]`` with ``cos, sin: [T, hd/2]`` (pairs ``(x[i], x[i + hd/2])``)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos = cos[:, None, :].to(x.dtype)  # [T, 1, hd/2], broadcast over batch and heads
    sin = sin[:, None, :].to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE and grouped-query attention."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        q = cfg.quantization == "ternary"
        gs = cfg.group_size
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        self.wq = BitLinear(cfg.dim, cfg.dim, group_size=gs, quantize=q)
        self.wk = BitLinear(cfg.dim, kv_dim, group_size=gs, quantize=q)
        self.wv = BitLinear(cfg.dim, kv_dim, group_size=gs, quantize=q)
        self.wo = BitLinear(cfg.dim, cfg.dim, group_size=gs, quantize=q)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        """``x: [B, T, D]``; ``cos, sin: [T, hd/2]`` for the absolute positions of these tokens."""
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        xq = self.wq.quantize_input(x)  # quantize the shared input once for q, k, v
        q = self.wq(xq, x_is_quantized=True).view(B, T, H, hd)
        k = self.wk(xq, x_is_quantized=True).view(B, T, Hkv, hd)
        v = self.wv(xq, x_is_quantized=True).view(B, T, Hkv, hd)
        q = apply_rope(q, cos, sin).transpose(1, 2)  # [B, H, T, hd]
        k = apply_rope(k, cos, sin).transpose(1, 2)  # [B, Hkv, T, hd]
        v = v.transpose(1, 2)  # [B, Hkv, T, hd]

        attn_mask: Tensor | None = None
        is_causal = True
        if kv_cache is not None:
            start = kv_cache.pos
            k, v = kv_cache.update(self.layer_idx, k, v)  # [B, Hkv, start+T, hd]
            if start > 0:
                is_causal = False
                if T > 1:
                    # query i sits at absolute position start+i and may see keys 0..start+i.
                    # (SDPA's is_causal aligns the mask top-left, which is wrong here.)
                    qpos = torch.arange(start, start + T, device=x.device)[:, None]
                    kpos = torch.arange(start + T, device=x.device)[None, :]
                    attn_mask = kpos <= qpos  # [T, start+T] bool, True = attend
        extra = {"enable_gqa": True} if Hkv != H else {}
        # GQA via enable_gqa: SDPA repeat_interleaves kv heads, so query head h reads kv head
        # h // (H // Hkv), the mapping documented at the top of this file.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           **extra)  # [B, H, T, hd]
        y = y.transpose(1, 2).reshape(B, T, H * hd)
        return self.wo(y)


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``: the gated FFN of Llama / BitNet."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        q = cfg.quantization == "ternary"
        gs = cfg.group_size
        self.w1 = BitLinear(cfg.dim, cfg.hidden_dim, group_size=gs, quantize=q)
        self.w3 = BitLinear(cfg.dim, cfg.hidden_dim, group_size=gs, quantize=q)
        self.w2 = BitLinear(cfg.hidden_dim, cfg.dim, group_size=gs, quantize=q)

    def forward(self, x: Tensor) -> Tensor:
        xq = self.w1.quantize_input(x)  # shared input of w1 and w3, quantized once
        h = F.silu(self.w1(xq, x_is_quantized=True)) * self.w3(xq, x_is_quantized=True)
        return self.w2(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, kv_cache)
        return x + self.ffn(self.ffn_norm(x))


# --------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    """Decoder-only transformer built from a :class:`ModelConfig`.

    Safe to construct under ``torch.device("meta")`` (nothing in ``__init__`` reads tensor data).
    A model built on meta and moved with ``to_empty(device=...)`` must call :meth:`init_weights`,
    which also rebuilds the RoPE tables.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm_f = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.weight_tied:
            self.lm_head.weight = self.tok_emb.weight  # one Parameter, two uses
        # training-only multi-token prediction heads (see model/mtp.py); generation ignores them
        self.mtp = MTPHeads(cfg) if cfg.use_mtp else None
        # RoPE tables: derived data, not state (non-persistent: never in a checkpoint).
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        # Recompute each block's activations in backward (set by the trainer from the config's
        # ``gradient_checkpointing``). Only used while training with grad enabled and no KV cache.
        self.gradient_checkpointing = False
        # torch.compile'd blocks for training (compile_blocks); a plain list, so not submodules:
        # the state dict and .to() see only the blocks themselves, which the compiled ones wrap.
        self.compiled_blocks: list[nn.Module] | None = None
        self.act_quant = "int8"
        self.set_act_quant(cfg.act_quant)
        for lin in self.modules():  # the forward product (model/int8_linear.py)
            if isinstance(lin, BitLinear):
                lin.matmul, lin.backward = cfg.ternary_matmul, cfg.ternary_backward
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 style init, deterministic under ``torch.manual_seed``.

        Matrices ~ N(0, 0.02); the residual output projections (``attn.wo``, ``ffn.w2``) are scaled
        by ``1/sqrt(2 * n_layers)`` so the residual stream's variance does not grow with depth; the
        untied head uses 0.02 too, and norms start at 1. Muon's update size does not depend on the
        weight scale, so this plain init trains well with it; it also keeps every ternary group
        non-degenerate from step 0 (a zero init would quantize to all zeros).
        """
        std = 0.02
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        if self.cfg.weight_tied:  # re-tie: materialising from meta (to_empty) gives each use its own tensor
            self.lm_head.weight = self.tok_emb.weight
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=std)
        if not self.cfg.weight_tied:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=std)
        for block in self.blocks:
            for lin in (block.attn.wq, block.attn.wk, block.attn.wv, block.ffn.w1, block.ffn.w3):
                nn.init.normal_(lin.weight, mean=0.0, std=std)
            for lin in (block.attn.wo, block.ffn.w2):
                nn.init.normal_(lin.weight, mean=0.0, std=out_std)
            nn.init.ones_(block.attn_norm.weight)
            nn.init.ones_(block.ffn_norm.weight)
        nn.init.ones_(self.norm_f.weight)
        if self.mtp is not None:
            self.mtp.init_weights(std)
        self._build_rope()

    def _build_rope(self) -> None:
        device = self.tok_emb.weight.device
        cos, sin = rope_tables(self.cfg.max_seq_len, self.cfg.head_dim, self.cfg.rope_theta, device)
        self.rope_cos, self.rope_sin = cos, sin  # [max_seq_len, hd/2] fp32

    def set_act_quant(self, act_quant: str) -> None:
        """Set every BitLinear's input format for a model-level ``act_quant`` (model/act_quant.py):
        a4.8 gives the inputs of q/k/v and w1/w3 one format and those of wo and w2 another. A
        training schedule calls it to switch from int8 to 4 bits (a compiled block recompiles once)."""
        fmt = formats_by_role(act_quant)
        for block in self.blocks:
            roles = {"attn_in": (block.attn.wq, block.attn.wk, block.attn.wv), "attn_out": (block.attn.wo,),
                     "ffn_in": (block.ffn.w1, block.ffn.w3), "ffn_out": (block.ffn.w2,)}
            for role, layers in roles.items():
                for lin in layers:
                    lin.act_format = fmt[role]
                    lin.act_block_size = self.cfg.act_block_size
        self.act_quant = act_quant

    def compile_blocks(self) -> None:
        """Compile every block for training (see model/compile.py). All blocks share one graph."""
        from .compile import compile_module, configure_dynamo

        configure_dynamo()
        self.compiled_blocks = [compile_module(block) for block in self.blocks]

    # ----------------------------------------------------------------------------------------

    def hidden_states(self, idx: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        """``idx: [B, T]`` token ids -> final hidden states ``[B, T, D]`` (after ``norm_f``).

        With ``kv_cache`` the tokens sit at absolute positions ``kv_cache.pos ..``; their
        keys/values are appended to the cache and its position advances by ``T``.
        """
        _, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} positions exceeds max_seq_len {self.cfg.max_seq_len}")
        cos = self.rope_cos[start:start + T]  # [T, hd/2]
        sin = self.rope_sin[start:start + T]
        x = self.tok_emb(idx)  # [B, T, D]
        train = self.training and kv_cache is None and torch.is_grad_enabled()
        ckpt = self.gradient_checkpointing and train
        blocks = self.compiled_blocks if (train and self.compiled_blocks is not None) else self.blocks
        for block in blocks:
            if ckpt:
                # non-reentrant: keeps only the block's input; backward reruns the block's forward
                # (BitLinear is deterministic, so the recompute is bit-identical)
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.norm_f(x)

    def logits(self, h: Tensor) -> Tensor:
        """Hidden states ``[..., D]`` -> fp32 logits ``[..., V]``."""
        return self.lm_head(h).float()

    def forward(self, idx: Tensor, targets: Tensor | None = None,
                kv_cache: KVCache | None = None, objective=None):
        """``idx: [B, T]``. With ``targets: [B, T]`` returns the mean cross-entropy (fp32 scalar,
        positions with target -1 ignored); otherwise fp32 logits ``[B, T, V]``.

        With ``objective`` (a training objective such as :class:`~..train.objective.Objective`)
        returns ``objective(self, hidden_states(idx), targets)``: the training loss computed inside
        the module's forward, so a DDP wrapper sees every parameter it uses (MTP heads included)."""
        if objective is not None:
            return objective(self, self.hidden_states(idx), targets)
        logits = self.logits(self.hidden_states(idx, kv_cache))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)

    @torch.no_grad()
    def resize_vocab(self, new_size: int, new_rows_from: int | None = None, seed: int = 0) -> None:
        """Give the token embedding and the LM head ``new_size`` rows (the ternary blocks untouched).

        Rows below ``min(old, new_size)`` are kept (shrinking drops the rest). Rows from
        ``new_rows_from`` (default: the old size) on are set to the mean of the rows before it plus
        tiny noise (std 1e-3 of those rows' std, seeded): a new token starts as "an average token",
        its logit near the mean logit, neither dominating the softmax nor unreachable, and the noise
        keeps the new rows from being identical. A tied head stays tied."""
        old = self.cfg.vocab_size
        if new_size < 1:
            raise ValueError(f"vocab size must be >= 1, got {new_size}")
        keep = min(old, new_size)
        used = keep if new_rows_from is None else min(new_rows_from, keep)
        gen = torch.Generator().manual_seed(seed)

        def grown(w: Tensor) -> nn.Parameter:  # w: [old, D] -> [new_size, D]
            out = w.new_empty(new_size, w.shape[1])
            out[:keep] = w[:keep]
            if new_size > used:
                ref = w[:used].double()
                noise = torch.randn(new_size - used, w.shape[1], generator=gen, dtype=torch.float64)
                out[used:] = (ref.mean(0) + noise * (1e-3 * ref.std())).to(out)
            return nn.Parameter(out, requires_grad=w.requires_grad)

        emb = nn.Embedding(new_size, self.cfg.dim, device=self.tok_emb.weight.device, dtype=self.tok_emb.weight.dtype)
        emb.weight = grown(self.tok_emb.weight)
        self.tok_emb = emb
        if self.cfg.weight_tied:
            self.lm_head = nn.Linear(self.cfg.dim, new_size, bias=False, device="meta")
            self.lm_head.weight = self.tok_emb.weight
        else:
            head = nn.Linear(self.cfg.dim, new_size, bias=False, device="meta")
            head.weight = grown(self.lm_head.weight)
            self.lm_head = head
        self.cfg.vocab_size = new_size

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, shared (tied) tensors counted once. ``non_embedding`` leaves out the
        token embedding and an untied LM head (a tied head *is* the embedding)."""
        seen: set[int] = set()
        total = 0
        skip = {id(self.tok_emb.weight), id(self.lm_head.weight)} if non_embedding else set()
        for p in self.parameters():  # parameters() already yields a shared Parameter once
            if id(p) in seen or id(p) in skip:
                continue
            seen.add(id(p))
            total += p.numel()
        return total
