"""BitLinear: a Linear layer trained for ternary (1.58-bit) weights, BitNet b1.58 style.

Why
---
A ternary model stores each weight as one of {-1, 0, +1} times a shared scale, so inference needs
no multiplications inside a group and ~1.58 bits per weight. Training such a model directly with
ternary weights is impossible (rounding has zero gradient almost everywhere), so we do
quantization-aware training (QAT): keep a full-precision *shadow* weight that the optimizer
updates, quantize it on the fly in every forward, and let gradients pass "straight through" the
quantizer. The forward then computes exactly what the exported ternary model will compute.

The maths
---------
Weights (absmean, per group). Flatten the ``[out, in]`` weight row-major and cut it into groups
of ``group_size`` consecutive values (when ``in_features`` is a multiple of ``group_size`` -- true
for every preset -- each group is simply a slice of one row). For a group ``g``::

    s_g = max(mean(|w_i|, i in g), eps)
    t_i = clip(round(w_i / s_g), -1, +1)          in {-1, 0, +1}
    w_i ~= t_i * s_g                               (the weight the forward uses)

If ``numel`` is not a multiple of ``group_size`` the last group is shorter; its mean is taken over
its real values only (no padding enters any statistic).

Activations (absmax, per token, 8 bits; the 4-bit formats are in act_quant.py). For each token
vector ``x`` (last dimension)::

    a   = max(max_i |x_i|, eps)
    q_i = clip(round(x_i * 127 / a), -128, 127)    integers
    x_i ~= q_i * a / 127

Straight-through estimator (STE). Both quantizers are treated as the identity in the backward:
``d quant(w) / d w := I`` and ``d quant(x) / d x := I``. So for ``y = quant(x) @ quant(W).T``::

    dL/dx = dL/dy @ quant(W)          dL/dW = dL/dy.T @ quant(x)

which is the gradient of ``F.linear`` with the quantized tensors, routed unchanged to the
full-precision inputs.

Performance
-----------
The quantizers are ``torch.autograd.Function``s whose backward returns ``grad_output`` as is, so
they add no graph nodes or saved tensors beyond what ``F.linear`` saves anyway (the quantized
input and weight, which replace the unquantized ones). Each forward works in place on its fresh
output and uses as few passes as it can (the per-token absmax is ``amax`` and ``amin``, no
``|x|`` temporary; ``aminmax`` is far slower on CPU). Layers that share an input (attention
q/k/v, SwiGLU w1/w3) quantize it once: call :func:`quantize_activations` (or
:meth:`BitLinear.quantize_input`) and pass ``x_is_quantized=True`` to each layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import int8_linear as i8
from .act_quant import fake_quant

WEIGHT_EPS = 1e-5  # floor for a group's mean |w| (an all-zero group quantizes to zeros, not NaN)
ACT_EPS = 1e-5  # floor for a token's absmax
ACT_QMAX = 127.0  # int8: values in [-128, 127]; absmax scaling only ever reaches +-127


# --------------------------------------------------------------------------------------------
# Pure functions (tests, export)


def _group_view(w: Tensor, group_size: int) -> tuple[Tensor, int]:
    """``w`` flattened row-major and zero-padded to ``[n_groups, group_size]``; returns the pad."""
    flat = w.reshape(-1)
    pad = (-flat.numel()) % group_size
    if pad:
        flat = F.pad(flat, (0, pad))
    return flat.view(-1, group_size), pad


def _group_scales(w: Tensor, group_size: int) -> Tensor:
    """Per-group mean |w| (over real values only), floored at WEIGHT_EPS: ``[n_groups]``."""
    groups, pad = _group_view(w, group_size)  # [G, gs]
    sums = groups.abs().sum(dim=1)  # padding zeros add nothing to the sum
    counts = torch.full_like(sums, float(group_size))
    if pad:
        counts[-1] = group_size - pad
    return (sums / counts).clamp_(min=WEIGHT_EPS)


def ternary_quantize_weight(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Ternary values and group scales of a weight: ``w ~= t * scales[group]``.

    Returns ``(t, scales)``: ``t`` has ``w``'s shape and float dtype with values in {-1, 0, 1};
    ``scales`` is ``[ceil(numel / group_size)]`` (group ``g`` covers flat indices
    ``g*group_size .. (g+1)*group_size - 1`` of ``w`` in row-major order).
    """
    w = w.detach()
    scales = _group_scales(w, group_size)  # [G]
    groups, pad = _group_view(w, group_size)  # [G, gs]
    t = (groups / scales[:, None]).round_().clamp_(-1.0, 1.0).reshape(-1)
    if pad:
        t = t[: w.numel()]
    return t.reshape(w.shape), scales


def quantize_activations_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token (last dim) absmax int8 quantization: ``x ~= q * scale``.

    Returns ``(q, scale)``: ``q`` has ``x``'s shape, integer values in [-128, 127] stored as float;
    ``scale = absmax / 127`` with shape ``x.shape[:-1] + (1,)``.
    """
    x = x.detach()
    absmax = x.abs().amax(dim=-1, keepdim=True).clamp_(min=ACT_EPS)
    q = (x * (ACT_QMAX / absmax)).round_().clamp_(-128.0, 127.0)
    return q, absmax / ACT_QMAX


# --------------------------------------------------------------------------------------------
# Fake quantizers with straight-through gradients


def _fake_quant_weight(w: Tensor, group_size: int) -> Tensor:
    """``t * s`` for every group, as a fresh tensor shaped like ``w`` (no autograd)."""
    if w.numel() % group_size == 0 and w.is_contiguous():
        g = w.view(-1, group_size)  # [G, gs]
        # (torch.linalg.vector_norm(g, 1) needs no |w| buffer but is ~6x slower on CPU)
        out = torch.abs(g)  # [G, gs]: the only big allocation, |w| first, then the result
        s = out.mean(dim=1, keepdim=True).clamp_(min=WEIGHT_EPS)  # [G, 1]
        torch.div(g, s, out=out).round_().clamp_(-1.0, 1.0).mul_(s)
        return out.view(w.shape)
    t, scales = ternary_quantize_weight(w, group_size)
    groups, pad = _group_view(t, group_size)
    out = groups.mul_(scales[:, None]).reshape(-1)
    if pad:
        out = out[: w.numel()]
    return out.reshape(w.shape)


def _fake_quant_act(x: Tensor) -> Tensor:
    """``q * absmax / 127`` per token, as a fresh tensor (no autograd)."""
    # absmax = max(max x, -min x): two vectorised reductions, no |x| temporary
    # (torch.aminmax over the last dim is much slower than amax + amin on CPU).
    absmax = torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_())
    absmax = absmax.clamp_(min=ACT_EPS)  # [..., 1]
    # |x * 127 / absmax| <= 127 (up to one ulp, which rounds back to 127), so the int8 clamp to
    # [-128, 127] can never bind and is skipped here: it would be one more pass over x.
    out = torch.mul(x, absmax.reciprocal().mul_(ACT_QMAX)).round_()  # q, the only big allocation
    return out.mul_(absmax.div_(ACT_QMAX))


def _compute_dtype(w: Tensor, x: Tensor) -> Tensor:
    """``w`` in ``x``'s dtype when ``w`` is a low-precision latent (bf16 shadow weights, see
    optim/low_precision.py): the group scales and the ternary rounding are computed in the
    activations' precision (fp32), one matrix at a time. The gradient autograd hands back to a
    bf16 weight is cast to bf16."""
    return w.to(x.dtype) if w.dtype != x.dtype and w.element_size() < x.element_size() else w


class _WeightQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, group_size: int) -> Tensor:  # type: ignore[override]
        return _fake_quant_weight(w, group_size)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad_output, None


class _ActQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, fmt: str, block_size: int) -> Tensor:  # type: ignore[override]
        return _fake_quant_act(x) if fmt == "int8" else fake_quant(x, fmt, block_size)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return grad_output, None, None


class _BitLinearFn(torch.autograd.Function):
    """``y = x_q @ ternary(W).T (+ b)`` for an already quantized input, STE for ``W``.

    Saves ``x_q`` and the *shadow* weight (a reference, no copy) and recomputes ``ternary(W)`` in
    the backward, instead of keeping one quantized copy of every weight alive from forward to
    backward: that copy would be as large as the model (~0.35 GB at 125M params), and on CPU
    touching that much fresh memory costs more than quantizing again (two cheap passes).
    """

    @staticmethod
    def forward(ctx, x_q: Tensor, w: Tensor, bias: Tensor | None,  # type: ignore[override]
                group_size: int) -> Tensor:
        w_q = _fake_quant_weight(_compute_dtype(w, x_q), group_size)
        ctx.quant_dtype = x_q.dtype  # the weight is quantized in the activations' precision
        dev = x_q.device.type
        if torch.is_autocast_enabled(dev):
            # the matmul's operands in the autocast dtype, cast here rather than inside F.linear so
            # that the 16-bit input is what the backward keeps (half the bytes, no second cast)
            x_q = x_q.to(torch.get_autocast_dtype(dev))
            w_q = w_q.to(x_q.dtype)
        ctx.save_for_backward(x_q, w)
        ctx.group_size = group_size
        ctx.has_bias = bias is not None
        return F.linear(x_q, w_q, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x_q, w = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])  # [N, out]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            w_for_quant = w.to(ctx.quant_dtype) if w.element_size() < ctx.quant_dtype.itemsize else w
            w_q = _fake_quant_weight(w_for_quant, ctx.group_size).to(grad_out.dtype)
            grad_x = grad_out.matmul(w_q)  # [..., in] = dL/dy @ ternary(W)
        if ctx.needs_input_grad[1]:
            grad_w = g2.t().mm(x_q.reshape(-1, x_q.shape[-1]).to(grad_out.dtype))  # [out, in]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(dim=0)
        return grad_x, grad_w, grad_b, None


def bitlinear(x_q: Tensor, w: Tensor, bias: Tensor | None, group_size: int) -> Tensor:
    """``x_q @ ternary(w).T (+ bias)`` with STE gradients; ``x_q`` from :func:`quantize_activations`."""
    return _BitLinearFn.apply(x_q, w, bias, group_size)


def quantize_weight(w: Tensor, group_size: int) -> Tensor:
    """Fake-quantized (ternary * group scale) weight with straight-through gradient."""
    return _WeightQuantSTE.apply(w, group_size)


def quantize_activations(x: Tensor, fmt: str = "int8", block_size: int = 16) -> Tensor:
    """Fake-quantized activations with straight-through gradient: per-token int8 absmax by default,
    or a 4-bit layer format of :mod:`.act_quant` (``block_size``: fp4's block).

    Use it once on an input shared by several BitLinears, then call each with
    ``x_is_quantized=True``.
    """
    return _ActQuantSTE.apply(x, fmt, block_size)


# --------------------------------------------------------------------------------------------
# The layer


class BitLinear(nn.Module):
    """``y = quant8(x) @ ternary(W).T (+ b)`` with full-precision shadow weight ``W: [out, in]``.

    ``quantize=False`` makes it a plain ``F.linear`` (the full-precision baseline), so the same
    model code serves both. The bias (off by default, never used by the GPT) stays full precision.
    ``act_format`` (a plain attribute, so a training schedule can switch it: see
    ``GPT.set_act_quant``) picks the input's format: ``int8`` or one of :mod:`.act_quant`'s.

    ``matmul`` (a plain attribute, ``ModelConfig.ternary_matmul``): ``fake_quant`` (default: the
    fp32/bf16 GEMM of the dequantized values), ``int8`` (the exact integer forward of
    :mod:`.int8_linear`, whose weight codes are cached until the weight changes), or ``auto``
    (int8 where this CPU has int8 dot products and measures it faster, else fake_quant).
    ``backward`` (``ModelConfig.ternary_backward``): the int8 path's backward GEMM dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        group_size: int = 128,
        quantize: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.quantize = quantize
        self.act_format = "int8"
        self.act_block_size = 16
        self.matmul = "fake_quant"
        self.backward = "auto"
        self._pack: i8.TernaryPack | None = None  # int8 path: codes + scales of the current weight
        # continual QAT (train/qat.py): 0 = the full-precision path, 1 = ternary (the default, today's
        # exact path), in between both the weight and the input are w + mix * (quant(w) - w), STE
        self.quant_mix = 1.0
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(
                torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init (the GPT overrides it in ``init_weights``)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def quantize_input(self, x: Tensor) -> Tensor | i8.Int8Input:
        """The input as this layer would see it (fake-quantized if ``quantize``, blended during a QAT
        ramp), STE gradient; on the int8 path its codes (:class:`~.int8_linear.Int8Input`), for layers
        sharing the input."""
        if not self.quantize or self.quant_mix == 0.0:
            return x
        if self.uses_int8(x.device):
            return i8.Int8Input(x, *i8.quantize_act_codes(x, self._code_dtype(x.device)))
        x_q = quantize_activations(x, self.act_format, self.act_block_size)
        return x_q if self.quant_mix == 1.0 else x + self.quant_mix * (x_q - x)

    def uses_int8(self, device: torch.device) -> bool:
        """Whether this layer's forward takes the integer path (``matmul`` and its shape/format)."""
        if not self.quantize or self.matmul == "fake_quant" or self.quant_mix != 1.0:
            return False  # the QAT ramp's blend is a float computation
        if self.matmul not in i8.MATMUL_CHOICES:
            raise ValueError(f"ternary_matmul must be one of {i8.MATMUL_CHOICES}, got {self.matmul!r}")
        if not i8.int8_supported(self.in_features, self.group_size, self.act_format):
            return False
        return self.matmul == "int8" or (device.type == "cpu" and i8.int8_measured_faster())

    def _code_dtype(self, device: torch.device) -> torch.dtype:
        return torch.int8 if i8.backend_for(device) == "int8" else torch.float32

    def ternary_pack(self, for_backward: bool) -> i8.TernaryPack:
        """The weight's codes and scales, packed once and reused until the weight changes (its
        version counter moves on every in-place update: optimizer steps, ``copy_``, loads)."""
        w = self.weight
        backend = i8.backend_for(w.device)
        bwd = i8.resolve_backward_dtype(self.backward, w.device) if for_backward else None
        p = self._pack
        if (p is None or p.key != i8.weight_key(w) or (for_backward and (p.w_bwd is None or p.w_bwd.dtype != bwd))
                or (p.codes.dtype == torch.int8) != (backend == "int8")):
            p = self._pack = i8.pack_ternary(w, self.group_size, backend, bwd)
        return p

    def _int8_forward(self, inp: i8.Int8Input) -> Tensor:
        training = torch.is_grad_enabled() and (self.weight.requires_grad or inp.x.requires_grad)
        pack = self.ternary_pack(for_backward=training)
        if pack.codes.dtype != inp.q.dtype:  # codes made for another backend (device moved)
            inp = i8.Int8Input(inp.x, inp.q.to(pack.codes.dtype), inp.c)
        y = i8.int8_linear(inp.x, self.weight, inp.q, inp.c, pack)
        return y + self.bias if self.bias is not None else y

    def quantized_weight(self) -> Tensor:
        """The weight the forward uses (ternary * group scale when ``quantize``), detached."""
        w = self.weight.detach()
        return _fake_quant_weight(w, self.group_size) if self.quantize else w

    def forward(self, x: Tensor, x_is_quantized: bool = False) -> Tensor:
        """``x: [..., in] -> [..., out]``. ``x_is_quantized``: ``x`` came from ``quantize_input``."""
        if isinstance(x, i8.Int8Input):  # quantized by quantize_input on the int8 path
            if self.uses_int8(x.x.device):
                return self._int8_forward(x)
            x, x_is_quantized = x.x, False  # this layer takes the fake-quant path: quantize anew
        if not self.quantize or self.quant_mix == 0.0:
            return F.linear(x, _compute_dtype(self.weight, x), self.bias)
        if self.quant_mix != 1.0:  # QAT ramp: blended weight and input (both STE), see quant_mix
            x = x if x_is_quantized else self.quantize_input(x)
            w = _compute_dtype(self.weight, x)
            return F.linear(x, w + self.quant_mix * (quantize_weight(w, self.group_size) - w), self.bias)
        if not x_is_quantized and self.uses_int8(x.device):
            return self._int8_forward(self.quantize_input(x))
        if not x_is_quantized:
            x = quantize_activations(x, self.act_format, self.act_block_size)
        return bitlinear(x, self.weight, self.bias, self.group_size)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}, quantize={self.quantize}"
            + (f", act_format={self.act_format}" if self.act_format != "int8" else "")
            + (f", matmul={self.matmul}" if self.matmul != "fake_quant" else "")
        )
