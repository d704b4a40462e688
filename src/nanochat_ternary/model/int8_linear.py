"""The exact integer forward of a ternary BitLinear, and when to use it.

Why
---
A BitLinear's forward is an integer product in disguise: the input's codes ``q`` (int8, absmax per
token) times the weight's codes ``t`` in {-1, 0, +1}, then the scales. The fake-quant path
(bitlinear.py) multiplies the dequantized values in fp32; this module multiplies the codes with an
int8 GEMM (``torch._int_mm``, int32 accumulation: AVX512-VNNI on this project's CPUs) and applies
the scales afterwards. Measured ~2.7x faster than the fp32 GEMM at 2048x768x2176 on one EPYC core
(docs/performance.md).

The maths (``N`` tokens, ``K`` inputs, ``M`` outputs, groups of ``gs`` along ``K``, ``G = K / gs``)
---------------------------------------------------------------------------------------------
For token ``n`` with scale ``c_n = absmax_n / 127`` and output row ``m`` with group scales
``s[g, m]``::

    P[g, n, m] = sum_{k in group g} q[n, k] * t[m, k]          exact int32 (|P| <= 127 * gs)
    y[n, m]    = c_n * sum_g s[g, m] * P[g, n, m]             fp32: G products, G-1 sums, 1 product

The group scales sit inside the reduction, so there is one int8 GEMM per group (``K = gs``), each
writing an int32 tile that is scaled and added into the fp32 output while it is still in cache
(tiles of ``TILE_N`` tokens; fresh multi-MB buffers cost page faults that ate the gain when measured).
``P`` is exact, so the only roundings are those ``G + 1`` fp32 operations per output: the result is
the exact product of the codes and scales to within ``(G + 1)`` fp32 roundings of the scaled terms
(tests/test_int8.py checks that bound against a float64 reference). The fake-quant fp32 GEMM, by
contrast, rounds at every one of its ``K`` accumulations, so the two paths differ at fp32-rounding
level: the int8 path is closer to the exact value, but not bit-identical to today's training.

Requirements: ``K`` a multiple of ``gs`` (true for every preset), so each group is a slice of one
row. Other layers (and 4-bit activation formats) keep the fake-quant path.

Backends
--------
``int8``   ``torch._int_mm`` on a CPU with int8 dot-product instructions (AVX512-VNNI / AMX) whose
           ATen capability is AVX512 (``ATEN_CPU_CAPABILITY=avx2`` or ``default`` disables it).
``float``  the same per-group products in fp32 GEMMs over the integer codes stored as floats: every
           partial sum is an integer below 2^24, so it is exact too and gives the same ``P``. Any
           CPU (and CUDA, untested here) runs it; it is slower than the fake-quant path, so ``auto``
           never picks it: it exists so a CPU without VNNI computes the same numbers.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

import torch
from torch import Tensor

WEIGHT_EPS = 1e-5  # = bitlinear.WEIGHT_EPS (the same quantizer, restated to avoid a cycle)
ACT_EPS = 1e-5
ACT_QMAX = 127.0
TILE_N = 256  # tokens per int32 tile: 256 x M int32 stays in L2 at M ~ 2K (measured best of 128/256/512)
MATMUL_CHOICES = ("fake_quant", "int8", "auto")
BACKWARD_CHOICES = ("auto", "float32", "bfloat16")


# --------------------------------------------------------------------------------------------
# What this CPU can do


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _aten_avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")


def cpu_has_int8_dot() -> bool:
    """Int8 dot products in hardware (AVX512-VNNI or AMX-INT8) and ATen allowed to use AVX-512."""
    return _aten_avx512() and bool({"avx512_vnni", "amx_int8"} & _cpu_flags())


def cpu_has_bf16() -> bool:
    """bf16 dot products in hardware (AVX512-BF16 or AMX-BF16) and ATen allowed to use AVX-512."""
    return _aten_avx512() and bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def _best_ms(fn, reps: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


@functools.cache
@torch.autocast("cpu", enabled=False)  # measure fp32 against int8, whatever region the first call is in
@torch.no_grad()
def int8_measured_faster() -> bool:
    """Whether the int8 forward beats the fp32 GEMM here: capability first, then one quick
    interleaved measurement at a training-like shape (256 tokens, 768 -> 768), cached per process."""
    if not cpu_has_int8_dot() or os.environ.get("NANOCHAT_INT8", "") == "0":
        return False
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 768, generator=g)
    w = torch.randn(768, 768, generator=g)
    pack = pack_ternary(w, 128, backend="int8", bwd_dtype=None)
    q, c = quantize_act_codes(x, torch.int8)
    t_int = t_fp = float("inf")
    for _ in range(2):  # interleaved, best of each
        t_int = min(t_int, _best_ms(lambda: int8_matmul(q, c, pack)))
        t_fp = min(t_fp, _best_ms(lambda: x @ w.t()))
    return t_int < t_fp


@functools.cache
@torch.autocast("cpu", enabled=False)
@torch.no_grad()
def bf16_measured_faster() -> bool:
    """Whether a bf16 GEMM beats fp32 here (capability, then one quick measurement, cached)."""
    if not cpu_has_bf16():
        return False
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 768, generator=g), torch.randn(768, 768, generator=g)
    a16, b16 = a.bfloat16(), b.bfloat16()
    t16 = t32 = float("inf")
    for _ in range(2):
        t16 = min(t16, _best_ms(lambda: a16 @ b16))
        t32 = min(t32, _best_ms(lambda: a @ b))
    return t16 < t32


def resolve_backward_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The int8 path's backward GEMM dtype: ``auto`` is bf16 on CUDA and on CPUs where bf16 GEMMs
    have hardware support and measure faster, else fp32."""
    if setting not in BACKWARD_CHOICES:
        raise ValueError(f"ternary_backward must be one of {BACKWARD_CHOICES}, got {setting!r}")
    if setting == "float32":
        return torch.float32
    if setting == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if bf16_measured_faster() else torch.float32


def backend_for(device: torch.device) -> str:
    """``int8`` where ``torch._int_mm`` runs on int8 dot-product hardware, else ``float`` (exact)."""
    return "int8" if device.type == "cpu" and cpu_has_int8_dot() else "float"


def int8_supported(in_features: int, group_size: int, act_format: str) -> bool:
    """Whether a layer of this shape and input format can take the integer forward."""
    return act_format == "int8" and in_features % group_size == 0


# --------------------------------------------------------------------------------------------
# Codes and scales (the same operations as bitlinear's fake quantizers, so the same codes)


def quantize_act_codes(x: Tensor, dtype: torch.dtype = torch.int8) -> tuple[Tensor, Tensor]:
    """Per-token absmax codes of ``x: [..., K]``: ``(q [..., K] in dtype, c [..., 1] fp32)``.

    The ops are bitlinear._fake_quant_act's, in the same order, so ``q * c`` is exactly the
    fake-quantized input (``|q| <= 127``: see the bound there; the int8 cast cannot wrap)."""
    x = x.detach()
    absmax = torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_())
    absmax = absmax.clamp_(min=ACT_EPS)  # [..., 1]
    q = torch.mul(x, absmax.reciprocal().mul_(ACT_QMAX)).round_()
    return q.to(dtype), absmax.div_(ACT_QMAX)


@dataclass
class TernaryPack:
    """One weight's codes and scales, laid out for the grouped GEMMs.

    ``codes: [G, gs, M]`` (int8 for the int8 backend, fp32 for the float one): ``codes[g]`` is
    ``t[:, g*gs:(g+1)*gs].T``, contiguous (measured faster than a transposed view);
    ``scales: [G, M]`` fp32; ``w_bwd: [M, K]`` the fake-quantized weight ``t * s`` in the backward
    dtype (None for inference); ``key``: what the weight was when packed (see :func:`weight_key`).
    """

    codes: Tensor
    scales: Tensor
    w_bwd: Tensor | None
    key: tuple


def weight_key(w: Tensor) -> tuple:
    """Changes whenever ``w``'s values may have: its version counter (bumped by every in-place op:
    optimizer steps, ``copy_``, ``load_state_dict``), storage, dtype and device."""
    return (w._version, w.data_ptr(), w.dtype, w.device, tuple(w.shape))


@torch.no_grad()
def pack_ternary(w: Tensor, group_size: int, backend: str, bwd_dtype: torch.dtype | None) -> TernaryPack:
    """Ternary codes and group scales of ``w: [M, K]`` (``K % group_size == 0``)."""
    M, K = w.shape
    G = K // group_size
    wf = w.detach()
    if wf.element_size() < 4:  # bf16 latents: quantized in fp32 (bitlinear._compute_dtype)
        wf = wf.float()
    g = wf.reshape(-1, group_size)  # [M*G, gs]
    s = torch.abs(g).mean(dim=1, keepdim=True).clamp_(min=WEIGHT_EPS)  # [M*G, 1]
    t = torch.div(g, s).round_().clamp_(-1.0, 1.0)  # [M*G, gs]
    code_dtype = torch.int8 if backend == "int8" else torch.float32
    codes = t.view(M, G, group_size).permute(1, 2, 0).to(code_dtype).contiguous()  # [G, gs, M]
    scales = s.view(M, G).t().contiguous()  # [G, M]
    w_bwd = None
    if bwd_dtype is not None:
        w_bwd = t.mul_(s).view(M, K).to(bwd_dtype)  # = bitlinear._fake_quant_weight(w) in fp32
    return TernaryPack(codes, scales, w_bwd, weight_key(w))


# --------------------------------------------------------------------------------------------
# The product


def int8_matmul(q: Tensor, c: Tensor, pack: TernaryPack) -> Tensor:
    """``y[n, m] = c[n] * sum_g s[g, m] * P[g, n, m]`` for ``q: [N, K]``, ``c: [N, 1]`` -> ``[N, M]`` fp32.

    ``q`` is int8 for the int8 backend, the same integers in fp32 for the float backend."""
    G, gs, M = pack.codes.shape
    N = q.shape[0]
    y = torch.empty(N, M, dtype=torch.float32, device=q.device)
    use_int = pack.codes.dtype == torch.int8
    tile = torch.empty(min(N, TILE_N), M, dtype=torch.int32 if use_int else torch.float32, device=q.device)
    for n0 in range(0, N, TILE_N):
        n1 = min(N, n0 + TILE_N)
        yt, qt, pt = y[n0:n1], q[n0:n1], tile[: n1 - n0]
        for g in range(G):
            qg = qt[:, g * gs:(g + 1) * gs]  # [n, gs]
            if use_int:
                torch._int_mm(qg, pack.codes[g], out=pt)  # exact int32
            else:
                torch.mm(qg, pack.codes[g], out=pt)  # integer-valued, exact (< 2^24)
            if g == 0:
                torch.mul(pt, pack.scales[0], out=yt)
            else:
                yt.addcmul_(pt, pack.scales[g])
        yt.mul_(c[n0:n1])
    return y


class _Int8LinearFn(torch.autograd.Function):
    """``y = int8_matmul(codes(x), pack)``, straight-through gradients to ``x`` and ``w``.

    Backward (the fake-quant path's STE formulas, in ``pack.w_bwd``'s dtype)::

        dL/dx = dL/dy @ (t * s)          dL/dW = dL/dy.T @ (q * c)

    Saves the int8 codes (1 byte per input value, vs 4 for the fake-quant path's fp32 input).
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, q: Tensor, c: Tensor,  # type: ignore[override]
                pack: TernaryPack) -> Tensor:
        lead = x.shape[:-1]
        y = int8_matmul(q.reshape(-1, q.shape[-1]), c.reshape(-1, 1), pack)
        ctx.save_for_backward(q, c)
        ctx.pack = pack
        ctx.w_dtype = w.dtype
        return y.view(*lead, y.shape[-1]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        q, c = ctx.saved_tensors
        w_bwd = ctx.pack.w_bwd
        dt = w_bwd.dtype
        g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(dt)  # [N, M]
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = g2.mm(w_bwd).to(grad_out.dtype).view(*grad_out.shape[:-1], w_bwd.shape[1])
        if ctx.needs_input_grad[1]:
            x_q = torch.mul(q.reshape(-1, q.shape[-1]), c.reshape(-1, 1))  # fp32 = the fake-quant input (q may be fp32)
            grad_w = g2.t().mm(x_q.to(dt)).to(ctx.w_dtype)  # [M, K]
        return grad_x, grad_w, None, None, None


def int8_linear(x: Tensor, w: Tensor, q: Tensor, c: Tensor, pack: TernaryPack) -> Tensor:
    """``x: [..., K]`` (the unquantized input, for its gradient) with codes ``q, c`` -> ``[..., M]``."""
    return _Int8LinearFn.apply(x, w, q, c, pack)


@dataclass
class Int8Input:
    """A BitLinear input quantized once for several layers (q/k/v, w1/w3) on the int8 path:
    the input itself (its gradient flows straight through) and its codes."""

    x: Tensor  # [..., K]
    q: Tensor  # [..., K] int8 (or fp32 integers for the float backend)
    c: Tensor  # [..., 1] fp32
