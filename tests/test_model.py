"""Tests of the BitLinear quantizers and the GPT model (shapes, GQA, tying, meta, counts)."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers.models import tiny_config

from nanochat_ternary.config import PRESETS, ModelConfig
from nanochat_ternary.model import (
    GPT,
    BitLinear,
    quantize_activations_int8,
    ternary_quantize_weight,
)

# a tiny model (helpers.models) with 4 heads, each its own KV head
small_cfg = partial(tiny_config, n_heads=4, n_kv_heads=4, ffn_hidden=128, vocab_size=97, max_seq_len=32,
                    group_size=32)


def preset_cfg(name: str) -> ModelConfig:
    return ModelConfig(**PRESETS[name]["model"])


# ------------------------------------------------------------------------------------------
# Independent references


def ref_ternary(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group absmean ternarization written out with Python loops over groups (float64)."""
    flat = w.detach().double().flatten()
    t = torch.empty_like(flat)
    scales = []
    for start in range(0, flat.numel(), group_size):
        g = flat[start:start + group_size]
        s = max(g.abs().mean().item(), 1e-5)
        scales.append(s)
        t[start:start + group_size] = torch.clamp(torch.round(g / s), -1, 1)
    return t.view(w.shape), torch.tensor(scales, dtype=torch.float64)


def ref_act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 in float64: q = clip(round(x * 127 / absmax), -128, 127)."""
    x64 = x.detach().double()
    absmax = x64.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    q = torch.clamp(torch.round(x64 * 127.0 / absmax), -128, 127)
    return q, absmax / 127.0


# ------------------------------------------------------------------------------------------
# BitLinear


@pytest.mark.parametrize("shape,gs", [((48, 64), 32), ((8, 128), 128), ((10, 30), 16), ((7, 9), 128)])
def test_ternary_weight_matches_reference(shape, gs):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    t, s = ternary_quantize_weight(w, gs)
    t_ref, s_ref = ref_ternary(w, gs)
    assert set(t.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert s.shape == (math.ceil(w.numel() / gs),)
    torch.testing.assert_close(s.double(), s_ref, rtol=1e-5, atol=1e-9)
    # Rounding ties can differ between fp32 and fp64 only on a measure-zero set; demand equality.
    assert torch.equal(t.double(), t_ref)
    # The layer's forward weight is t * group scale.
    lin = BitLinear(shape[1], shape[0], group_size=gs)
    with torch.no_grad():
        lin.weight.copy_(w)
    wq_ref = (t_ref.flatten() * s_ref.repeat_interleave(gs)[: w.numel()]).view(shape)
    torch.testing.assert_close(lin.quantized_weight().double(), wq_ref, rtol=1e-5, atol=1e-7)


def test_ternary_zero_group_is_zero():
    w = torch.zeros(4, 32)
    w[0, :16] = 1.0
    lin = BitLinear(32, 4, group_size=16)
    with torch.no_grad():
        lin.weight.copy_(w)
    wq = lin.quantized_weight()
    assert torch.isfinite(wq).all()
    torch.testing.assert_close(wq, w)


def test_activation_quant_matches_float64():
    torch.manual_seed(1)
    x = torch.randn(3, 5, 64) * torch.rand(3, 5, 1) * 4
    q, scale = quantize_activations_int8(x)
    q_ref, scale_ref = ref_act_quant(x)
    assert q.min() >= -128 and q.max() <= 127
    assert torch.equal(q, q.round())
    torch.testing.assert_close(scale.double(), scale_ref, rtol=1e-6, atol=0)
    # fp32 vs fp64 can only disagree on values sitting at a rounding tie: at most one step, rarely.
    diff = (q.double() - q_ref).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    # The fake-quantized input the layer uses is q * scale.
    lin = BitLinear(64, 8, group_size=32)
    xq = lin.quantize_input(x)
    torch.testing.assert_close(xq.double(), q_ref * scale_ref, rtol=0, atol=1e-5 * 4)


@pytest.mark.parametrize("bias", [False, True])
def test_bitlinear_forward_and_ste_gradients(bias):
    torch.manual_seed(2)
    lin = BitLinear(64, 48, group_size=32, bias=bias)
    x = torch.randn(2, 7, 64, requires_grad=True)
    y = lin(x)
    g = torch.randn_like(y)
    y.backward(g)

    # Reference: quantized tensors as constants, plus identity paths for the STE:
    #   x_hat = x + (Q(x) - x).detach()  -> value Q(x), d x_hat / d x = I   (same for w)
    q, s = ref_act_quant(x)
    x_c = (q * s).float()
    t, ws = ref_ternary(lin.weight, 32)
    w_c = (t.flatten() * ws.repeat_interleave(32)).view(48, 64).float()
    x2 = x.detach().clone().requires_grad_(True)
    w2 = lin.weight.detach().clone().requires_grad_(True)
    x_hat = x2 + (x_c - x2).detach()
    w_hat = w2 + (w_c - w2).detach()
    b2 = lin.bias.detach().clone().requires_grad_(True) if bias else None
    y_ref = F.linear(x_hat, w_hat, b2)
    y_ref.backward(g)
    if bias:
        torch.testing.assert_close(lin.bias.grad, b2.grad)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.weight.grad, w2.grad, rtol=1e-5, atol=1e-5)
    # explicitly: dL/dx = g @ Q(W), dL/dW = g^T Q(x)
    torch.testing.assert_close(x.grad, g @ w_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.weight.grad, g.reshape(-1, 48).T @ x_c.reshape(-1, 64),
                               rtol=1e-4, atol=1e-4)


def test_bitlinear_shared_input_equals_separate():
    torch.manual_seed(3)
    lin = BitLinear(64, 16, group_size=32)
    x = torch.randn(4, 64)
    torch.testing.assert_close(lin(lin.quantize_input(x), x_is_quantized=True), lin(x))


def test_bitlinear_none_is_plain_linear():
    torch.manual_seed(4)
    lin = BitLinear(64, 16, quantize=False, bias=True)
    x = torch.randn(3, 64, requires_grad=True)
    y = lin(x)
    assert torch.equal(y, F.linear(x, lin.weight, lin.bias))
    y.sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.sum(0).expand(3, 64))


# ------------------------------------------------------------------------------------------
# GPT


@pytest.mark.parametrize("quant", ["ternary", "none"])
def test_shapes_and_loss(quant):
    torch.manual_seed(0)
    cfg = small_cfg(quantization=quant)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 11))
    logits = model(idx)
    assert logits.shape == (2, 11, cfg.vocab_size) and logits.dtype == torch.float32
    h = model.hidden_states(idx)
    assert h.shape == (2, 11, cfg.dim)
    torch.testing.assert_close(model.logits(h), logits)
    targets = torch.randint(0, cfg.vocab_size, (2, 11))
    targets[0, :3] = -1
    loss = model(idx, targets)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    ref = F.cross_entropy(logits[targets != -1], targets[targets != -1])
    torch.testing.assert_close(loss, ref)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.5  # near uniform at init


def test_init_is_deterministic_seeded_and_follows_the_documented_scales():
    torch.manual_seed(7)
    a = GPT(small_cfg())
    torch.manual_seed(7)
    b = GPT(small_cfg())
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    torch.manual_seed(8)  # the seed matters: a constant init would pass the check above
    c = GPT(small_cfg())
    assert not torch.equal(a.tok_emb.weight, c.tok_emb.weight)
    # GPT-2 init (gpt.py): N(0, 0.02) matrices, residual projections 0.02 / sqrt(2 n_layers), norms 1.
    # Sample std of n normal draws: relative error ~ 1/sqrt(2n) <= 1.1% here (n >= 64 x 64): 10% is ~9 sigma.
    out_std = 0.02 / math.sqrt(2 * a.cfg.n_layers)
    for name, p in a.named_parameters():
        if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            assert torch.all(p == 1), name
        elif name.endswith(("wo.weight", "w2.weight")):
            assert p.std().item() == pytest.approx(out_std, rel=0.1), name
        elif p.dim() == 2:
            assert p.std().item() == pytest.approx(0.02, rel=0.1), name


def test_param_names_for_optimizer_split():
    model = GPT(small_cfg(weight_tied=False))
    for name, p in model.named_parameters():
        if name.startswith("blocks."):
            assert p.dim() == 2 or name.endswith("norm.weight"), name
            if p.dim() == 2:
                assert isinstance(model.get_submodule(name.rsplit(".", 1)[0]), BitLinear), name
        else:
            assert name in {"tok_emb.weight", "lm_head.weight", "norm_f.weight"}, name


def test_tied_weights_shared():
    model = GPT(small_cfg(weight_tied=True))
    assert model.lm_head.weight is model.tok_emb.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # one Parameter, listed once
    untied = GPT(small_cfg(weight_tied=False))
    assert untied.lm_head.weight is not untied.tok_emb.weight
    cfg = small_cfg()
    assert untied.num_params() - model.num_params() == cfg.vocab_size * cfg.dim
    assert untied.num_params(non_embedding=True) == model.num_params(non_embedding=True)


def test_quantization_none_blocks_are_plain_linear():
    cfg = small_cfg(quantization="none")
    torch.manual_seed(0)
    model = GPT(cfg)
    lin = model.blocks[0].ffn.w1
    assert not lin.quantize
    x = torch.randn(2, 3, cfg.dim)
    assert torch.equal(lin(x), F.linear(x, lin.weight))


def naive_block(block, x, cfg):
    """Reference block forward: explicit per-head attention with the h // n_rep kv mapping."""
    B, T, D = x.shape
    H, Hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    n_rep = H // Hkv
    a = block.attn
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * block.attn_norm.weight
    q = a.wq(xn).view(B, T, H, hd)
    k = a.wk(xn).view(B, T, Hkv, hd)
    v = a.wv(xn).view(B, T, Hkv, hd)

    def rope(t):
        half = hd // 2
        out = torch.empty_like(t)
        for pos in range(T):
            for i in range(half):
                ang = pos * cfg.rope_theta ** (-2 * i / hd)
                c, s = math.cos(ang), math.sin(ang)
                x1, x2 = t[:, pos, :, i], t[:, pos, :, i + half]
                out[:, pos, :, i] = x1 * c - x2 * s
                out[:, pos, :, i + half] = x1 * s + x2 * c
        return out

    q, k = rope(q), rope(k)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    heads = []
    for h in range(H):
        kvh = h // n_rep
        att = q[:, :, h] @ k[:, :, kvh].transpose(-1, -2) / math.sqrt(hd)  # [B, T, T]
        att = att.masked_fill(~mask, float("-inf"))
        att = torch.exp(att - att.amax(-1, keepdim=True))
        att = att / att.sum(-1, keepdim=True)
        heads.append(att @ v[:, :, kvh])  # [B, T, hd]
    y = torch.cat(heads, dim=-1)
    x = x + a.wo(y)
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * block.ffn_norm.weight
    f = block.ffn
    return x + f.w2(F.silu(f.w1(xn)) * f.w3(xn))


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("quant", ["ternary", "none"])
def test_block_matches_naive_attention(n_kv_heads, quant):
    torch.manual_seed(5)
    cfg = small_cfg(n_heads=4, n_kv_heads=n_kv_heads, quantization=quant)
    model = GPT(cfg)
    block = model.blocks[0]
    with torch.no_grad():  # make the norms non-trivial
        block.attn_norm.weight.uniform_(0.5, 1.5)
        block.ffn_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 9, cfg.dim)
    T = x.shape[1]
    y = block(x, model.rope_cos[:T], model.rope_sin[:T])
    y_ref = naive_block(block, x, cfg)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)


def test_meta_construction_matches_real():
    cfg = preset_cfg("tiny-cpu")
    with torch.device("meta"):
        meta = GPT(cfg)
    assert meta.tok_emb.weight.is_meta
    real = GPT(cfg)
    assert meta.num_params() == real.num_params()
    assert meta.num_params(non_embedding=True) == real.num_params(non_embedding=True)
    # a meta model materialised with to_empty + init_weights works like a fresh one
    meta.to_empty(device="cpu")
    torch.manual_seed(0)
    meta.init_weights()
    assert meta.lm_head.weight is meta.tok_emb.weight  # still tied (to_empty unties them)
    torch.testing.assert_close(meta.rope_cos, real.rope_cos)
    idx = torch.randint(0, cfg.vocab_size, (1, 8))
    assert torch.isfinite(meta(idx)).all()


@pytest.mark.parametrize("name,expected", [("tiny-cpu", 3.7e6), ("d20", 18e6), ("test-8bit", 28e6),
                                           ("nano-125m", 127e6)])
def test_preset_param_counts(name, expected):
    with torch.device("meta"):
        model = GPT(preset_cfg(name))
    n = model.num_params()
    assert abs(n - expected) / expected < 0.03, (name, n)



def test_rope_theta_reaches_the_rotation():
    """``rope_theta`` is a trained-in model field (exports write it): the model's rotation tables equal a
    float64 ``cos/sin(pos * theta^(-2i/d))`` computed here, and the same weights under another theta give
    other logits (a model that ignored the field would pass neither)."""
    cfg = dict(dim=64, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=97, max_seq_len=16, group_size=32)
    torch.manual_seed(0)
    a = GPT(ModelConfig(**cfg, rope_theta=10000.0))
    b = GPT(ModelConfig(**cfg, rope_theta=500.0))
    b.load_state_dict(a.state_dict())
    hd = 32
    pos = torch.arange(16, dtype=torch.float64)[:, None]
    inv = 500.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)[None, :]
    # fp32 tables of angles up to ~15 rad: 1e-6 absolute is a few fp32 ulps of the angle
    torch.testing.assert_close(b.rope_cos.double(), torch.cos(pos * inv), rtol=0, atol=1e-6)
    torch.testing.assert_close(b.rope_sin.double(), torch.sin(pos * inv), rtol=0, atol=1e-6)
    x = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        la, lb = a(x), b(x)
    assert torch.equal(la[:, 0], lb[:, 0])  # position 0 is not rotated: same weights, same logits
    assert (la - lb).abs().max() > 1e-4  # observed 5e-4 at this init; fp32 noise of equal maths is 0
