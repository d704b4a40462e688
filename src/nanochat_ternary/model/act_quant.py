"""Activation formats for BitLinear inputs below 8 bits: int4, fp4 (E2M1 blocks), and BitNet a4.8.

Why
---
A ternary model's weights cost 1.58 bits, so at inference its matmuls are bound by the
activations: 8-bit inputs (BitNet b1.58, our default, ``bitlinear._fake_quant_act``) leave half of
a 4-bit kernel's throughput on the table. Training with the inputs fake-quantized to 4 bits (and a
straight-through gradient, as for int8) gives a model whose activations deploy at 4 bits. No CPU
or H100 has FP4 tensor cores, so this is simulation in fp32/bf16: a quality question, never a
speed claim (each format costs one or two extra passes over the input; docs/roadmap.md measures
the cost per step).

The formats (``ModelConfig.act_quant``), per token ``x`` (the last dimension, ``n`` values)
-----------------------------------------------------------------------------------------
``int8`` (default)   ``s = max|x| / 127``, ``q = round(x / s)`` in [-128, 127]  (bitlinear.py).

``int4``             ``s = max|x| / 7``, ``q = round(x / s)`` in [-8, 7] (absmax never reaches -8).

``fp4``              E2M1 values ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}`` with a sign, one scale per block
                     of ``act_block_size`` (16 by default) consecutive values, NVFP4 style: the
                     block scale is stored as E4M3 (``float8_e4m3fn``), relative to one fp32 scale
                     per token ``t = max|x| / (6 * 448)`` (448 = E4M3's largest value), so the
                     token's largest block gets block scale 448 and every block uses E4M3's whole
                     range. NVFP4 keeps that second-level scale per tensor; per token keeps a
                     token's quantization independent of the rest of the batch, as int8 is here.
                     Block ``b`` with ``a_b = max|x_b|``::

                         S_b = e4m3(a_b / (6 t)) * t
                         q   = e2m1_round(x_b / S_b)  (round to nearest, ties to an even mantissa,
                                                       clamped to +-6)
                         x_b ~= q * S_b

``a4.8``             BitNet a4.8 (arXiv 2411.04965), per layer role:

                     * inputs of attention (q/k/v) and of the FFN (w1/w3): int4 by *absmean*,
                       ``s = mean|x| / sqrt(7)``, ``q = clip(round(x / s), -8, 7)`` (the paper
                       chose absmean over absmax for these Gaussian-like inputs; the clip is
                       where the outliers go);
                     * inputs of the attention output (wo) and FFN down projection (w2), whose
                       distributions are sharp with outliers: top-K sparsification keeping the
                       ``A48_KEEP`` = 50% largest ``|x|`` of each token, then int8 absmax.

                     The paper gets the down projection's sparsity (~80%) from a squared-ReLU GLU;
                     our FFN is SwiGLU, whose output is dense, so top-K 50% is applied to w2's
                     input as to wo's (the paper's value for wo). The paper trains with 8-bit
                     activations first and switches for the last ~5% of tokens: that is
                     ``TrainConfig.act_quant_switch_step``.

Straight-through estimator: every format is the identity in the backward (``d quant(x)/dx := I``),
the pruned entries of top-K included (Q-Sparse's choice: a pruned activation still gets the
gradient that would grow it back).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ACT_QUANT_CHOICES = ("int8", "int4", "fp4", "a4.8")
# what each BitLinear's input is quantized to, by the layer's role in a block
LAYER_FORMATS = ("int8", "int4", "int4_absmean", "fp4", "topk_int8")
ROLES = ("attn_in", "attn_out", "ffn_in", "ffn_out")  # wq/wk/wv, wo, w1/w3, w2

ACT_EPS = 1e-5  # floor for a token's (or block's) scale statistic, as int8's
FP4_MAX = 6.0  # E2M1's largest magnitude
E4M3_MAX = 448.0  # float8_e4m3fn's largest finite value
A48_KEEP = 0.5  # a4.8: share of each token's entries kept before int8 (wo and w2 inputs)


def formats_by_role(act_quant: str) -> dict[str, str]:
    """``{role: layer format}`` for a model-level ``act_quant`` (see the module docstring)."""
    if act_quant not in ACT_QUANT_CHOICES:
        raise ValueError(f"act_quant must be one of {ACT_QUANT_CHOICES}, got {act_quant!r}")
    if act_quant == "a4.8":
        return {"attn_in": "int4_absmean", "ffn_in": "int4_absmean",
                "attn_out": "topk_int8", "ffn_out": "topk_int8"}
    return dict.fromkeys(ROLES, act_quant)


# --------------------------------------------------------------------------------------------
# The quantizers (no autograd; fresh output tensors, input untouched)


def _absmax(x: Tensor) -> Tensor:
    """Per-token ``max |x|``, ``[..., 1]``, floored at ACT_EPS (two reductions, no |x| buffer)."""
    return torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_()).clamp_(min=ACT_EPS)


def fake_quant_int4(x: Tensor) -> Tensor:
    """Per-token absmax int4: ``round(x * 7 / max|x|) * max|x| / 7``."""
    s = _absmax(x).div_(7.0)  # [..., 1]
    return torch.div(x, s).round_().clamp_(-8.0, 7.0).mul_(s)


def fake_quant_int4_absmean(x: Tensor) -> Tensor:
    """a4.8's per-token absmean int4: ``s = mean|x| / sqrt(7)``, ``clip(round(x / s), -8, 7) * s``."""
    s = x.abs().mean(dim=-1, keepdim=True).clamp_(min=ACT_EPS).div_(math.sqrt(7.0))  # [..., 1]
    return torch.div(x, s).round_().clamp_(-8.0, 7.0).mul_(s)


def e2m1_round(y: Tensor) -> Tensor:
    """Round to the nearest E2M1 value (ties to an even mantissa), clamped to [-6, 6].

    The grid's spacing is 0.5 below 2, 1 in [2, 4), 2 in [4, 6]; rounding each range with
    ``torch.round`` (half to even) on the rescaled value gives ties-to-even-mantissa, because the
    even rescaled integers are exactly the grid points with mantissa bit 0.
    """
    a = y.abs()
    q = torch.where(a < 2.0, torch.round(a * 2.0) * 0.5,
                    torch.where(a < 4.0, torch.round(a), torch.round(a * 0.5) * 2.0))
    return q.clamp_(max=FP4_MAX).copysign_(y)


def fake_quant_fp4(x: Tensor, block_size: int) -> Tensor:
    """E2M1 values with one E4M3 scale per block of ``block_size`` along the last dim and one fp32
    scale per token (see the module docstring). The last dim must be a multiple of ``block_size``."""
    n = x.shape[-1]
    if n % block_size:
        raise ValueError(f"fp4 activations need the input width {n} to be a multiple of act_block_size {block_size}")
    xb = x.reshape(*x.shape[:-1], n // block_size, block_size)  # [..., nb, bs]
    amax_b = torch.maximum(xb.amax(dim=-1, keepdim=True), xb.amin(dim=-1, keepdim=True).neg_())  # [..., nb, 1]
    t = amax_b.amax(dim=-2, keepdim=True).clamp_(min=ACT_EPS).div_(FP4_MAX * E4M3_MAX)  # [..., 1, 1] per token
    # e4m3 rounding of the block scale (round to nearest even, like the hardware's cast)
    e = amax_b.div(t.mul(FP4_MAX)).to(torch.float8_e4m3fn).to(x.dtype)  # [..., nb, 1]
    scale = e.mul_(t)  # S_b; 0 for an all-zero block (its values are then 0 / tiny -> 0)
    q = e2m1_round(xb / scale.clamp(min=torch.finfo(x.dtype).tiny))
    return q.mul_(scale).reshape(x.shape)


def fake_quant_topk_int8(x: Tensor, keep: float = A48_KEEP) -> Tensor:
    """Keep the ``ceil(keep * n)`` largest ``|x|`` of each token (ties at the threshold kept too),
    zero the rest, then per-token absmax int8 (the absmax survives the pruning)."""
    n = x.shape[-1]
    k = max(1, math.ceil(keep * n))
    a = x.abs()
    thr = a.kthvalue(n - k + 1, dim=-1, keepdim=True).values  # [..., 1]: the k-th largest |x|
    s = a.amax(dim=-1, keepdim=True).clamp_(min=ACT_EPS).div_(127.0)
    q = torch.div(x, s).round_().mul_(s)
    return q.masked_fill_(a < thr, 0.0)


def fake_quant(x: Tensor, fmt: str, block_size: int = 16) -> Tensor:
    """``x`` fake-quantized to a layer format other than int8 (bitlinear.py owns int8's fast path)."""
    if fmt == "int4":
        return fake_quant_int4(x)
    if fmt == "int4_absmean":
        return fake_quant_int4_absmean(x)
    if fmt == "fp4":
        return fake_quant_fp4(x, block_size)
    if fmt == "topk_int8":
        return fake_quant_topk_int8(x)
    raise ValueError(f"unknown activation format {fmt!r} (allowed: {LAYER_FORMATS})")
