"""Block int8 quantisation and 8-bit Muon, against independent float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.optim import random_grads, random_params, round_trip, run_steps
from torch import nn

from nanochat_ternary.optim import BlockQuantized, Muon, Muon8bit, memory_report, optimizer_state_bytes
from nanochat_ternary.optim.quantized import derive_seed

A, B, C = 3.4445, -4.7750, 2.0315


# Many tiny matmuls: with 2 threads on a shared, loaded machine every op waits for a descheduled
# worker thread (measured 8 s vs 0.01 s for one test). One thread (conftest), restored after.
pytestmark = pytest.mark.usefixtures("one_thread")


def ref_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [n_blocks, block] zero-padded, step = absmax / 127 per block)`` in float64."""
    flat = x.double().reshape(-1)
    nb = math.ceil(flat.numel() / block)
    padded = torch.zeros(nb * block, dtype=torch.float64)
    padded[: flat.numel()] = flat
    blocks = padded.view(nb, block)
    return blocks, blocks.abs().max(dim=1).values / 127


def _mixed(shape, seed=0):
    """Values spanning 8 orders of magnitude, some exact zeros and one all-zero block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.empty(shape).uniform_(-9, 9, generator=g))
    flat = x.view(-1)
    flat[::7] = 0
    flat[:128] = 0  # a whole block of zeros: scale 0, no NaN
    return x


@pytest.mark.parametrize("shape,block", [((64, 96), 128), ((37, 53), 128), ((1000,), 64), ((5, 3), 128)])
def test_round_trip_error_at_most_half_a_step(shape, block):
    x = _mixed(shape)
    q = BlockQuantized.from_tensor(x, block)
    assert q.codes.dtype == torch.int8 and q.scales.dtype == torch.float32
    assert q.codes.shape == (math.ceil(x.numel() / block), block)
    assert q.codes.abs().max() <= 127
    d = q.dequantize()
    assert d.shape == x.shape and d.dtype == torch.float32 and torch.isfinite(d).all()
    blocks, step = ref_blocks(x, block)
    err = (blocks - torch.nn.functional.pad(d.double().reshape(-1), (0, blocks.numel() - x.numel()))
           .view_as(blocks)).abs()
    # half a step, plus fp32 rounding of the scale and of the product (a few ulp of the value)
    bound = 0.5 * step[:, None] * (1 + 1e-6) + 1e-6 * blocks.abs()
    assert (err <= bound).all(), (err / step[:, None].clamp_min(1e-300)).max()
    # the scale is the block's absmax / 127 and the largest element hits a full code
    torch.testing.assert_close(q.scales.double(), step, rtol=1e-6, atol=0)
    nonzero = step > 0
    assert (q.codes.abs().amax(dim=1)[nonzero] == 127).all()
    assert (q.codes[~nonzero] == 0).all()
    assert torch.equal(q.step_size().double().reshape(-1), step.repeat_interleave(block)[: x.numel()].float()
                       .double())


def test_deterministic_rounding_is_round_to_nearest():
    x = torch.tensor([127.0, 0.4, 0.6, -0.6, -1.4, 2.5001, 50.0, -127.0])  # absmax 127: step 1
    q = BlockQuantized.from_tensor(x, 8)
    assert q.codes.view(-1).tolist() == [127, 0, 1, -1, -1, 3, 50, -127]


def test_stochastic_rounding_is_unbiased():
    # 4000 independent draws of the same block: every row of x is the same vector, so every row gets
    # the same scale (step 1/127 of absmax 1) and only the uniform draws differ
    g = torch.Generator().manual_seed(0)
    row = torch.rand(128, generator=g) * 2 - 1
    row[0] = 1.0
    draws = 4000
    x = row.expand(draws, 128).contiguous()
    q = BlockQuantized.zeros(x.shape, 128)
    q.assign(x, stochastic=True, generator=torch.Generator().manual_seed(1))
    d = q.dequantize().double()
    step = 1 / 127
    err = d - row.double()
    # each draw rounds to one of the two neighbouring codes
    assert (err.abs() < step * (1 + 1e-5)).all()
    lo = torch.floor(row.double() * 127) / 127
    assert ((d - lo).abs() < 1e-6).logical_or((d - lo - step).abs() < 1e-6).all()
    # unbiased: the mean error over draws -> 0 as 1/sqrt(draws). Per element the std of one draw
    # is <= step/2, so the mean of 4000 is within 5 sigma = 5 * step / (2 sqrt(4000)) = 0.04 step
    mean_err = err.mean(dim=0)
    assert mean_err.abs().max() < 0.04 * step, mean_err.abs().max() / step
    assert abs(mean_err.mean()) < 0.005 * step
    # deterministic rounding, by contrast, is biased for a fixed value (here by -0.3 step)
    v = torch.full((1, 128), 0.3 * step)
    v[0, 0] = 1.0
    dq = BlockQuantized.from_tensor(v, 128).dequantize()
    assert dq[0, 1] == 0
    sq = BlockQuantized.zeros((draws, 128), 128)
    sq.assign(v.expand(draws, 128).contiguous(), stochastic=True, generator=torch.Generator().manual_seed(2))
    assert abs(sq.dequantize()[:, 1:].double().mean() / step - 0.3) < 0.01


def test_derive_seed_separates_keys():
    seeds = {derive_seed(s, k, i, t) for s in (0, 1) for k in (1, 2) for i in range(20) for t in range(20)}
    assert len(seeds) == 2 * 2 * 20 * 20
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3) and 0 <= derive_seed(5) < 2**63


# ----------------------------------------------------------------------------------------------
# 8-bit Muon


SHAPES = [(64, 96), (96, 48), (40, 40), (8, 8)]  # the last two are below min_quant_numel (4096)


@pytest.mark.parametrize("nesterov", [True, False])
def test_quantization_disabled_equals_fp32_muon(nesterov):
    grads = random_grads(SHAPES, 4)
    pa, pb, pc = random_params(SHAPES), random_params(SHAPES), random_params(SHAPES)
    kw = dict(lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.1)
    run_steps(Muon(pa, **kw), pa, grads)
    run_steps(Muon8bit(pb, quantize=False, **kw), pb, grads)
    run_steps(Muon8bit(pc, min_quant_numel=10**9, stochastic_rounding=True, **kw), pc, grads)
    for a, b, c in zip(pa, pb, pc):
        assert torch.equal(a, b) and torch.equal(a, c)


def ns5_f64(u: torch.Tensor) -> torch.Tensor:
    X = u.T if u.shape[0] > u.shape[1] else u
    X = X / (torch.linalg.matrix_norm(X) + 1e-7)
    for _ in range(5):
        Am = X @ X.T
        X = A * X + (B * Am + C * Am @ Am) @ X
    return X.T if u.shape[0] > u.shape[1] else X


@pytest.mark.parametrize("stochastic", [False, True])
def test_8bit_step_against_reference(stochastic):
    """Each step, checked against float64 from the state actually stored before it:

    * the new momentum dequantises to within half a step (of its new block scale) of the exact EMA
      ``lerp(m_old, g, 1 - mu)`` (one step with stochastic rounding: it rounds to a neighbour);
    * the parameter moves by the Muon update computed from that exact (unrounded) EMA.
    """
    params = random_params(SHAPES)
    mu, lr, wd = 0.9, 0.05, 0.1
    opt = Muon8bit(params, lr=lr, momentum=mu, weight_decay=wd, stochastic_rounding=stochastic)
    for gs in random_grads(SHAPES, 4):
        before = []
        for p, g in zip(params, gs):
            st = opt.state[p]
            if "momentum_codes" in st:
                m = BlockQuantized(st["momentum_codes"], st["momentum_scales"], p.shape).dequantize()
            else:
                m = st.get("momentum_buffer", torch.zeros(p.shape))
            before.append((p.detach().double().clone(), m.double().clone()))
            p.grad = g.clone()
        opt.step()
        for p, g, (p0, m0) in zip(params, gs, before):
            exact = m0 + (1 - mu) * (g.double() - m0)
            st = opt.state[p]
            if p.numel() >= 4096:
                assert set(st) == {"momentum_codes", "momentum_scales", "step"}
                got = BlockQuantized(st["momentum_codes"], st["momentum_scales"], p.shape).dequantize()
                _, step = ref_blocks(exact, 128)
                step_el = step.repeat_interleave(128)[: p.numel()].view(p.shape)
                tol = (1.0 if stochastic else 0.5) * step_el + 1e-4 * step_el + 1e-7
                assert ((got.double() - exact).abs() <= tol).all()
            else:  # small tensor: exact fp32 momentum
                assert set(st) == {"momentum_buffer", "step"}
                torch.testing.assert_close(st["momentum_buffer"].double(), exact, atol=1e-6, rtol=0)
            u = g.double() + mu * (exact - g.double())
            expected = p0 * (1 - lr * wd) - lr * max(1.0, p.shape[0] / p.shape[1]) ** 0.5 * ns5_f64(u)
            torch.testing.assert_close(p.detach().double(), expected, atol=5e-6, rtol=0)


def test_8bit_state_is_int8_only_and_bytes_measured():
    params = random_params(SHAPES)
    opt = Muon8bit(params)
    run_steps(opt, params, random_grads(SHAPES, 2))
    expected = 0
    for p in params:
        st = opt.state[p]
        if p.numel() >= 4096:
            nb = math.ceil(p.numel() / 128)
            assert st["momentum_codes"].dtype == torch.int8 and st["momentum_codes"].shape == (nb, 128)
            assert st["momentum_scales"].dtype == torch.float32 and st["momentum_scales"].shape == (nb,)
            assert not any(t.is_floating_point() and t.numel() >= p.numel()
                           for t in st.values() if torch.is_tensor(t))  # no full-precision copy
            expected += nb * 128 + 4 * nb
        else:
            expected += 4 * p.numel()
        assert st["step"] == 2
    assert optimizer_state_bytes(opt) == expected
    rep = memory_report([opt])
    assert rep["variant"] == "muon-8bit" and rep["muon_state_bytes"] == expected
    assert rep["muon_int8_tensors"] == sum(p.numel() >= 4096 for p in params) == 2
    assert rep["bytes_per_muon_param"] == expected / sum(p.numel() for p in params)


def test_stochastic_rounding_seeded_and_reproducible():
    grads = random_grads(SHAPES, 3)
    outs = []
    for seed in (7, 7, 8):
        ps = random_params(SHAPES)
        opt = Muon8bit(ps, stochastic_rounding=True, seed=seed)
        run_steps(opt, ps, grads)
        outs.append(opt.state[ps[0]]["momentum_codes"].clone())
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("stochastic", [False, True])
def test_state_dict_round_trip_and_resume(stochastic):
    grads = random_grads(SHAPES, 6)
    pa = random_params(SHAPES)
    opt_a = Muon8bit(pa, lr=0.03, weight_decay=0.01, stochastic_rounding=stochastic, seed=3)
    run_steps(opt_a, pa, grads[:3])
    sd = round_trip(opt_a.state_dict())
    pb = [nn.Parameter(p.detach().clone()) for p in pa]
    opt_b = Muon8bit(pb, lr=0.5, seed=99)  # hyperparameters, seed included, come from the state dict
    opt_b.load_state_dict(sd)
    assert opt_b.param_groups[0]["seed"] == 3 and opt_b.param_groups[0]["stochastic_rounding"] == stochastic
    for a, b in zip(pa, pb):
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            if torch.is_tensor(sa[k]):
                assert sb[k].dtype == sa[k].dtype and torch.equal(sa[k], sb[k])
            else:
                assert sa[k] == sb[k]
    run_steps(opt_a, pa, grads[3:])
    run_steps(opt_b, pb, grads[3:])
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)


def test_fp32_muon_state_converts_to_8bit():
    grads = random_grads(SHAPES, 2)
    ps = random_params(SHAPES)
    opt = Muon(ps)
    run_steps(opt, ps, grads[:1])
    opt8 = Muon8bit(ps)
    opt8.load_state_dict(opt.state_dict())
    run_steps(opt8, ps, grads[1:])
    assert "momentum_codes" in opt8.state[ps[0]] and "momentum_buffer" not in opt8.state[ps[0]]
