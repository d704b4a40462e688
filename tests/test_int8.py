"""The exact int8 forward of BitLinear (model/int8_linear.py) against independent float64 references.

The references below re-implement the quantizers from their definitions (bitlinear.py's docstring)
in float64 and multiply the dequantized values in float64; nothing here calls the package's
quantizers to build an expected value.
"""

from __future__ import annotations

import copy

import pytest
import torch

from nanochat_ternary.config import build_config
from nanochat_ternary.errors import ConfigError
from nanochat_ternary.model import int8_linear as i8
from nanochat_ternary.model.bitlinear import BitLinear
from nanochat_ternary.model.gpt import GPT
from nanochat_ternary.optim.factory import build_optimizers

TINY = ["dim=64", "n_layers=2", "n_heads=2", "n_kv_heads=2", "vocab_size=128", "max_seq_len=32", "seq_len=32",
        "group_size=32"]  # a 2-layer model whose widths are multiples of the group size
U32 = 2.0**-24  # fp32 unit roundoff
U16 = 2.0**-8  # bf16 unit roundoff (8 significant bits)
BACKENDS = ["float"] + (["int8"] if i8.cpu_has_int8_dot() else [])


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


# --------------------------------------------------------------------------------------------
# float64 references


def ref_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 in float64: ``q = round_half_even(x * 127 / a)``, ``c = a / 127``."""
    x = x.double()
    a = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return torch.round(x * 127.0 / a), a / 127.0


def ref_weight(w: torch.Tensor, gs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (row-major, ``gs`` values) absmean ternary in float64: ``(t [M, K], s [M, K] per element)``."""
    M, K = w.shape
    g = w.double().reshape(-1, gs)
    s = g.abs().mean(dim=1, keepdim=True).clamp(min=1e-5)
    t = torch.round(g / s).clamp(-1, 1)
    return t.view(M, K), s.expand_as(g).reshape(M, K)


def bound(q: torch.Tensor, c: torch.Tensor, t: torch.Tensor, s: torch.Tensor, gs: int) -> torch.Tensor:
    """The int8 path's rounding bound: ``y = c * sum_g s_g P_g`` with exact integer ``P_g`` costs G
    fp32 products, G-1 sums and one final product, each exact to a relative ``u`` of its result, so
    ``|y - y_exact| <= gamma_{G+1} * c * sum_g |s_g P_g|`` (Higham's recursive-summation bound);
    ``(G + 2) u`` covers ``gamma_{G+1} = (G+1)u / (1 - (G+1)u)``. float64's own error is ~1e-16
    relative, far below it. A tiny absolute floor covers outputs that are exactly 0."""
    K = q.shape[-1]
    G = K // gs
    qg = q.double().reshape(-1, G, gs)  # [N, G, gs]
    tg = t.double().reshape(-1, G, gs)  # [M, G, gs]
    P = torch.einsum("ngk,mgk->ngm", qg, tg)  # exact integers
    sg = s.double().reshape(-1, G, gs)[:, :, 0]  # [M, G]
    mag = (P.abs() * sg.t()[None]).sum(dim=1) * c.double().reshape(-1, 1)  # [N, M]
    return (G + 2) * U32 * mag + 1e-30


def check_layer(x: torch.Tensor, w: torch.Tensor, gs: int, backend: str) -> None:
    """int8_matmul on the layer's codes vs the float64 fake-quant reference, within :func:`bound`."""
    q_ref, c_ref = ref_act(x)
    t_ref, s_ref = ref_weight(w, gs)
    code_dtype = torch.int8 if backend == "int8" else torch.float32
    q, c = i8.quantize_act_codes(x, code_dtype)
    pack = i8.pack_ternary(w, gs, backend, None)
    # the codes are the references' (the test inputs avoid near-ties, see the generators)
    assert torch.equal(q.double(), q_ref) and torch.equal(pack.codes.double().reshape(-1, w.shape[0]).t(), t_ref)
    y = i8.int8_matmul(q.reshape(-1, x.shape[-1]), c.reshape(-1, 1), pack)
    y_ref = (q_ref * c_ref).reshape(-1, x.shape[-1]) @ (t_ref * s_ref).t()  # float64 fake-quant product
    err = (y.double() - y_ref).abs()
    tol = bound(q_ref, c_ref, t_ref, s_ref, gs)
    assert bool((err <= tol).all()), f"max err/tol {(err / tol).max().item():.3g}"


# --------------------------------------------------------------------------------------------
# inputs: exact in fp32 so that fp32 and float64 quantizers see the same ties


def grid_input(n: int, k: int, seed: int) -> torch.Tensor:
    """Tokens with absmax exactly 127 (scale 1: codes are round(x)), values on a 1/8 grid, so every
    tie x = k + 0.5 is exact in both precisions and rounds half to even in both."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-1016, 1017, (n, k), generator=g).float() / 8  # |x| <= 127
    x[:, 0] = 127.0 * torch.sign(torch.randn(n, generator=g)).clamp(min=0).mul(2).sub(1)
    x[:, 1] = 2.5  # ties: -> 2
    x[:, 2] = -3.5  # -> -4
    return x


def grid_weight(m: int, k: int, seed: int) -> torch.Tensor:
    """Small multiples of 2^-6: fp32 group sums and means are exact, and every w / s is a ratio of
    small integers, at least 2^-18 from a tie unless exactly one."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, (m, k), generator=g).float() / 64


def tie_group_weight(m: int, k: int, gs: int) -> torch.Tensor:
    """Every group: half the values +-1 (w/s = 0.5 exactly: ties to 0), half +-3 (1.5: clamps to 1)."""
    base = torch.tensor([1.0, 3.0]).repeat(gs // 2)  # mean |w| = 2
    signs = torch.where(torch.arange(m * k) % 3 == 0, -1.0, 1.0)
    return (base.repeat(m * k // gs) * signs).view(m, k)


# --------------------------------------------------------------------------------------------
# the forward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k,m,gs", [(1, 128, 3, 128), (7, 384, 129, 128), (300, 256, 64, 64), (33, 96, 40, 32)])
def test_forward_matches_reference_grid(backend, n, k, m, gs):
    check_layer(grid_input(n, k, seed=n), grid_weight(m, k, seed=m), gs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_adversarial(backend):
    k, gs = 256, 128
    x = grid_input(6, k, seed=1)
    x[3] = 0.0  # an all-zero token: absmax floors at eps, codes 0
    x[4, :] = 1 / 1024
    x[4, 7] = 127.0  # one outlier: everything else rounds to 0
    w = tie_group_weight(10, k, gs)
    w[2, :gs] = 0.0  # an all-zero group: scale floors at eps, codes 0
    w[5, gs:] = 1 / 64
    w[5, gs + 3] = 8.0  # a group with one outlier
    check_layer(x, w, gs, backend)
    t = i8.pack_ternary(w, gs, backend, None).codes.float().reshape(k, 10).t()
    assert (t[0, ::2] == 0).all() and (t[0, 1::2].abs() == 1).all()  # 0.5 ties to 0, 1.5 clamps to 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_random_bound(backend):
    """Random normal inputs: y within the bound of the float64 product of the layer's codes (codes
    of random inputs may sit within an fp32 ulp of a tie, so they are taken from the layer here;
    the tests above check the codes themselves against the float64 quantizer)."""
    g = torch.Generator().manual_seed(3)
    x, w, gs = torch.randn(5, 20, 384, generator=g) * 3, torch.randn(130, 384, generator=g) * 0.02, 128
    code_dtype = torch.int8 if backend == "int8" else torch.float32
    q, c = i8.quantize_act_codes(x, code_dtype)
    pack = i8.pack_ternary(w, gs, backend, None)
    t = pack.codes.double().reshape(384, 130).t()
    s = pack.scales.double().t().repeat_interleave(gs, dim=1)
    y = i8.int8_matmul(q.reshape(-1, 384), c.reshape(-1, 1), pack)
    y_ref = (q.double() * c.double()).reshape(-1, 384) @ (t * s).t()
    assert bool(((y.double() - y_ref).abs() <= bound(q.double(), c, t, s, gs)).all())


def test_backends_agree_bitwise():
    """The float backend computes the same exact integer partials as _int_mm, so the same y."""
    if "int8" not in BACKENDS:
        pytest.skip("no int8 dot-product instructions on this CPU (the float backend is tested above)")
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(270, 256, generator=g), torch.randn(96, 256, generator=g)
    ys = []
    for backend, dt in (("int8", torch.int8), ("float", torch.float32)):
        q, c = i8.quantize_act_codes(x, dt)
        ys.append(i8.int8_matmul(q, c, i8.pack_ternary(w, 128, backend, None)))
    assert torch.equal(ys[0], ys[1])


def test_codes_are_the_fake_quantizers():
    """The int8 path's dequantized codes are bit for bit the fake-quant path's tensors."""
    from nanochat_ternary.model.bitlinear import _fake_quant_act, _fake_quant_weight

    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(9, 256, generator=g), torch.randn(64, 256, generator=g)
    q, c = i8.quantize_act_codes(x, torch.int8)
    assert torch.equal(q.float() * c, _fake_quant_act(x))
    pack = i8.pack_ternary(w, 128, "float", torch.float32)
    assert torch.equal(pack.w_bwd, _fake_quant_weight(w, 128))


# --------------------------------------------------------------------------------------------
# the layer: forward, gradients, cache, fallback


def _layer(k: int, m: int, gs: int = 128, backward: str = "float32", seed: int = 0) -> BitLinear:
    torch.manual_seed(seed)
    lin = BitLinear(k, m, group_size=gs)
    lin.matmul, lin.backward = "int8", backward
    return lin


@pytest.mark.parametrize("backward,tol_u", [("float32", None), ("bfloat16", U16)])
def test_gradients_match_ste_reference(backward, tol_u):
    """dL/dx = g @ (t s), dL/dW = g.T @ (q c) (the STE), against float64. fp32 GEMMs: a reduction
    of n terms is within n u sum|terms| (Higham); bf16 adds the rounding of both operands and of the
    bf16 output, 3 u16 sum|terms|."""
    lin = _layer(256, 96, backward=backward)
    x = (torch.randn(4, 10, 256) * 2).requires_grad_()
    y = lin(x)
    gout = torch.randn_like(y)
    y.backward(gout)
    q, c = ref_act(x.detach())
    t, s = ref_weight(lin.weight.detach(), 128)
    xq, wq, g2 = (q * c).reshape(-1, 256), t * s, gout.double().reshape(-1, 96)
    gx_ref, gw_ref = g2 @ wq, g2.t() @ xq
    gx_mag, gw_mag = g2.abs() @ wq.abs(), g2.abs().t() @ xq.abs()
    for got, ref, mag, n in ((x.grad.reshape(-1, 256), gx_ref, gx_mag, 96), (lin.weight.grad, gw_ref, gw_mag, 40)):
        tol = (3 * tol_u + n * U32) * mag if tol_u else (n + 2) * U32 * mag
        assert bool(((got.double() - ref).abs() <= tol + 1e-30).all())


def test_layer_equals_fake_quant_to_rounding_and_fallback_for_partial_groups():
    lin = _layer(256, 48)
    x = torch.randn(3, 5, 256)
    fq = copy.deepcopy(lin)
    fq.matmul = "fake_quant"
    y, y_fq = lin(x), fq(x)
    assert lin._pack is not None  # took the int8 path
    assert torch.allclose(y, y_fq, rtol=1e-5, atol=1e-6)
    # in_features not a multiple of group_size (groups straddle rows, last group partial): fake-quant path
    odd = _layer(200, 30, gs=128)
    fq_odd = copy.deepcopy(odd)
    fq_odd.matmul = "fake_quant"
    x = torch.randn(4, 200)
    assert torch.equal(odd(x), fq_odd(x)) and odd._pack is None


def test_cache_reused_within_a_step_and_never_stale_after_one():
    """The pack is built once per weight version: reused by forward, backward and the next
    micro-batch; an optimizer step (or a load) bumps the version and forces a new pack."""
    cfg = build_config("tiny-cpu", overrides=TINY + ["ternary_matmul=int8", "ternary_backward=float32"])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    opts = build_optimizers(model, cfg.training, torch.device("cpu"))
    x = torch.randint(0, 128, (2, 16))
    lin = model.blocks[0].attn.wq
    model(x, targets=x).backward()
    pack = lin._pack
    assert pack is not None and pack.w_bwd is not None
    model(x, targets=x).backward()  # a second micro-batch: same weights, same pack
    assert lin._pack is pack
    for o in opts:
        o.step()
    loss_after = model(x, targets=x)
    assert lin._pack is not pack  # repacked from the stepped weight
    fresh = copy.deepcopy(model)
    for m in fresh.modules():
        if isinstance(m, BitLinear):
            m._pack = None
    assert torch.equal(loss_after, fresh(x, targets=x))
    fresh.load_state_dict(GPT(cfg.model).state_dict())  # a load is an in-place copy: repacked too
    before = fresh.blocks[0].attn.wq._pack
    fresh(x, targets=x)
    assert fresh.blocks[0].attn.wq._pack is not before


def test_model_loss_matches_fake_quant():
    over = TINY
    x = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for mode in ("fake_quant", "int8"):
        torch.manual_seed(0)
        model = GPT(build_config("tiny-cpu", overrides=over + [f"ternary_matmul={mode}"]).model)
        losses.append(model(x, targets=x).item())
        assert (model.blocks[0].ffn.w2._pack is not None) == (mode == "int8")
    assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[0])  # fp32 rounding differences only


def test_fallback_without_instructions(monkeypatch):
    """A CPU without int8 dot products (ATEN_CPU_CAPABILITY=avx2/default here) takes the exact
    float backend, and `auto` keeps the fake-quant path there."""
    monkeypatch.setattr(i8, "cpu_has_int8_dot", lambda: False)
    i8.int8_measured_faster.cache_clear()
    try:
        assert i8.backend_for(torch.device("cpu")) == "float" and not i8.int8_measured_faster()
        lin = _layer(128, 16)
        lin(torch.randn(3, 128))
        assert lin._pack.codes.dtype == torch.float32
        lin.matmul = "auto"
        assert not lin.uses_int8(torch.device("cpu"))
    finally:
        i8.int8_measured_faster.cache_clear()


def test_config_checks():
    with pytest.raises(ConfigError, match="ternary_matmul"):
        build_config("tiny-cpu", overrides=["ternary_matmul=int4"])
    with pytest.raises(ConfigError, match="compile = false"):
        build_config("tiny-cpu", overrides=["ternary_matmul=int8", "compile=true"])
    with pytest.raises(ConfigError, match="ternary_backward"):
        build_config("tiny-cpu", overrides=["ternary_backward=fp16"])


# --------------------------------------------------------------------------------------------
# batch-1 decoding (model/decode.py)


@pytest.mark.parametrize("mode", ["int8", "fp32"])
def test_decoder_matches_model_forward(mode):
    """Prefill + one token at a time equals the model's full-sequence forward at every position
    (same codes and scales; fp32 rounding in a different order: GEMM blocking of the fused q|k|v and
    w1|w3, SDPA over one query vs the causal block. Measured a few ulps of the logits, max 3.6e-7
    on |logits| <= 1.5; the tolerance leaves a 10x margin)."""
    from nanochat_ternary.model.decode import Decoder

    over = ["dim=64", "n_layers=2", "n_heads=4", "n_kv_heads=2", "vocab_size=128", "max_seq_len=32", "seq_len=32",
            "group_size=32", f"ternary_matmul={'int8' if mode == 'int8' else 'fake_quant'}"]
    torch.manual_seed(0)
    model = GPT(build_config("tiny-cpu", overrides=over).model).eval()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)[0]  # [T, V]
    dec = Decoder(model, mode=mode)
    got = [dec.forward(ids[0, :5])] + [dec.forward(ids[0, t:t + 1]) for t in range(5, 12)]
    for j, t in enumerate([4] + list(range(5, 12))):
        assert torch.allclose(got[j], full[t], rtol=2e-6, atol=2e-6), (t, (got[j] - full[t]).abs().max())
    assert dec.cache.pos == 12 and dec.weight_bytes() > 0


def test_generate_uses_the_int8_decoder(monkeypatch):
    """An int8 model generates through the Decoder, with the tokens of its own forward (greedy)."""
    import nanochat_ternary.generate as gen_mod

    over = ["dim=64", "n_layers=2", "n_heads=2", "n_kv_heads=2", "vocab_size=128", "max_seq_len=32", "seq_len=32",
            "group_size=32", "ternary_matmul=int8"]
    torch.manual_seed(0)
    model = GPT(build_config("tiny-cpu", overrides=over).model)
    fast = list(gen_mod.generate(model, [1, 2, 3], 10, temperature=0.0))
    assert gen_mod._int8_decoder(model, 16) is not None
    monkeypatch.setattr(gen_mod, "_int8_decoder", lambda m, n: None)  # the model's own forward
    assert list(gen_mod.generate(model, [1, 2, 3], 10, temperature=0.0)) == fast


def test_checkpointing_and_bf16_latents_take_the_int8_path():
    """Gradient checkpointing recomputes the int8 forward bit for bit (same gradients as without);
    a bf16 latent weight is packed in fp32 and gets a bf16 gradient."""
    torch.manual_seed(0)
    model = GPT(build_config("tiny-cpu", overrides=TINY + ["ternary_matmul=int8", "ternary_backward=float32"]).model)
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad(set_to_none=True)
        model(x, targets=x).backward()
        grads.append(model.blocks[0].ffn.w2.weight.grad.clone())
    assert torch.equal(grads[0], grads[1])
    lin = _layer(128, 16)
    lin.weight.data = lin.weight.data.bfloat16()
    xin = torch.randn(3, 128, requires_grad=True)
    lin(xin).sum().backward()
    assert lin._pack.codes.dtype in (torch.int8, torch.float32) and lin.weight.grad.dtype == torch.bfloat16
