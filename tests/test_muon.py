"""Muon, Newton–Schulz and the optimizer factory, checked against plain float64 references."""

from __future__ import annotations

import os

import pytest
import references
import torch
from helpers.distributed import gloo_group, saved, spawn_ranks
from helpers.optim import planted, round_trip, run_steps
from references import A, B, C  # noqa: E402  (the Newton-Schulz coefficients, defined once)
from torch import nn

from nanochat_ternary.config import ConfigError, TrainConfig
from nanochat_ternary.optim import (
    GaLoreMuon,
    Muon,
    Muon8bit,
    build_optimizers,
    measure_optimizer_state,
    memory_report,
    optimizer_state_bytes,
    split_named_params,
    split_params,
    zeropower_via_newtonschulz5,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def quintic5(x: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The scalar map Newton–Schulz applies to each (Frobenius-normalised) singular value."""
    for _ in range(steps):
        x = A * x + B * x**3 + C * x**5
    return x


def _ns_cases():
    g = torch.Generator().manual_seed(1)
    yield "square", torch.randn(96, 96, generator=g)
    yield "wide", torch.randn(48, 160, generator=g)
    yield "tall", torch.randn(160, 48, generator=g)
    yield "planted", planted(80, 120, torch.logspace(0, -4, 80)).float()


@pytest.mark.parametrize("name,G", list(_ns_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_newton_schulz_against_svd(name, G):
    """NS5(G) = U diag(q(s / ||G||_F)) V^T exactly, q the quintic iterated 5 times.

    So in the float64 SVD basis of G, ``U^T O V`` must be diagonal and its diagonal must equal
    ``q(s/||G||_F)``, up to fp32 rounding. The quintic does not converge to 1: ``q`` maps (0, 1]
    into (0, 1.2024], and every x >= 2e-3 into [0.6818, 1.2024] (evaluated on a dense grid). Hence
    the bound checked: directions with s >= 2e-3 ||G||_F get singular values in [0.6, 1.25] (margin
    for fp32), and no singular value exceeds 1.25.
    """
    out = zeropower_via_newtonschulz5(G)
    assert out.dtype == G.dtype and out.shape == G.shape
    Gd, Od = G.double(), out.double()
    U, s, Vh = torch.linalg.svd(Gd, full_matrices=False)
    D = U.T @ Od @ Vh.T
    diag = torch.diagonal(D)
    off = D - torch.diag(diag)
    assert off.abs().max() < 2e-5, off.abs().max()
    expected = quintic5(s / torch.linalg.matrix_norm(Gd))
    assert torch.allclose(diag, expected, atol=2e-5), (diag - expected).abs().max()
    strong = s >= 2e-3 * torch.linalg.matrix_norm(Gd)
    assert strong.sum() >= 1
    assert diag[strong].min() >= 0.6 and diag.max() <= 1.25
    # and O as a whole: the SVD of O itself
    so = torch.linalg.svdvals(Od)
    assert so.max() <= 1.25
    # reconstruction: O equals U diag(q) V^T
    assert torch.allclose(Od, U @ torch.diag(expected) @ Vh, atol=2e-5)


@pytest.mark.parametrize("batch", [(), (3,)])
def test_newton_schulz_tall_is_the_transposed_wide_step(batch):
    """A tall matrix iterates with ``X^T X`` from the right: in float64 the same map as transposing,
    iterating the wide way and transposing back (to rounding, 1e-12), and the result is a
    contiguous tensor in G's layout, not a transposed view (the weight update reads it row-major)."""
    G = torch.randn(*batch, 60, 24, dtype=torch.float64)
    out = zeropower_via_newtonschulz5(G, dtype=torch.float64)
    assert out.is_contiguous() and out.shape == G.shape
    wide = zeropower_via_newtonschulz5(G.mT.contiguous(), dtype=torch.float64)
    torch.testing.assert_close(out, wide.mT, rtol=0, atol=1e-12)


def test_newton_schulz_batched_and_dtype():
    G = torch.randn(3, 40, 24)
    Ob = zeropower_via_newtonschulz5(G)
    for i in range(3):
        torch.testing.assert_close(Ob[i], zeropower_via_newtonschulz5(G[i]), atol=1e-5, rtol=0)
    O16 = zeropower_via_newtonschulz5(G[0], dtype=torch.bfloat16)
    assert O16.dtype == torch.float32
    # the iteration really ran in bf16: its output, cast back to fp32, is exactly representable in
    # bf16 (8 significant bits), which an fp32 iteration's output is not
    assert torch.equal(O16, O16.bfloat16().float())
    assert not torch.equal(Ob[0], Ob[0].bfloat16().float())
    # and it is still the same map: 5 bf16 steps stay within a few bf16 ulps (2^-8 relative) of fp32
    assert (O16 - Ob[0]).abs().max() < 0.1
    assert zeropower_via_newtonschulz5(torch.zeros(5, 7)).abs().max() == 0  # eps: no NaN


@pytest.mark.parametrize("ns_dtype, in_bf16", [("bfloat16", True), (torch.bfloat16, True), (None, False),
                                                ("float32", False)])
def test_muon_step_runs_newton_schulz_in_ns_dtype(ns_dtype, in_bf16):
    """Muon's ``ns_dtype`` reaches Newton–Schulz: from p = 0 with momentum 0, lr 1 and a wide matrix
    (scale 1), one step leaves p = -NS(grad), whose entries are bf16 values iff NS ran in bf16."""
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.zeros(24, 40))
    p.grad = torch.randn(24, 40, generator=g)
    Muon([p], lr=1.0, momentum=0.0, ns_dtype=ns_dtype).step()
    expected = -zeropower_via_newtonschulz5(p.grad, dtype=torch.bfloat16 if in_bf16 else torch.float32)
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=0)
    assert torch.equal(p.detach(), p.detach().bfloat16().float()) == in_bf16


# ----------------------------------------------------------------------------------------------
# Muon step against a float64 reference


def reference_muon(params, grads_per_step, lr, mu, nesterov, wd, steps=5):
    n = len(params)
    return references.reference_muon(params, grads_per_step, [lr] * n, [wd] * n, mu, nesterov, steps)


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_reference(nesterov):
    torch.manual_seed(0)
    shapes = [(32, 32), (64, 24), (24, 64)]
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    start = [p.detach().clone() for p in params]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    lr, mu, wd = 0.05, 0.9, 0.1
    opt = Muon(params, lr=lr, momentum=mu, nesterov=nesterov, weight_decay=wd)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        for p, g in zip(params, gs):
            assert torch.equal(p.grad, g)  # the gradient is not modified
    ref = reference_muon(start, grads, lr, mu, nesterov, wd)
    for p, r in zip(params, ref):
        assert opt.state[p]["momentum_buffer"].dtype == torch.float32
        torch.testing.assert_close(p.detach().double(), r, atol=5e-6, rtol=0)  # moves ~0.08; fp32 error ~5e-7


def test_muon_follows_external_lr_and_rejects_non_matrices():
    p = nn.Parameter(torch.zeros(8, 8))
    opt = Muon([p], lr=0.1)
    opt.param_groups[0]["lr"] = 0.0
    p.grad = torch.randn(8, 8)
    opt.step()
    assert p.abs().max() == 0
    with pytest.raises(ValueError, match="2-D"):
        Muon([nn.Parameter(torch.zeros(8))])


def test_state_dict_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    shapes = [(16, 16), (32, 8)]
    grads = [[torch.randn(s) for s in shapes] for _ in range(6)]
    pa = [nn.Parameter(torch.randn(s)) for s in shapes]
    opt_a = Muon(pa, lr=0.03, weight_decay=0.01)
    run_steps(opt_a, pa, grads[:3])
    path = tmp_path / "opt.pt"
    torch.save(opt_a.state_dict(), path)
    sd = torch.load(path, weights_only=True)  # plain tensors and containers only
    pb = [nn.Parameter(p.detach().clone()) for p in pa]
    opt_b = Muon(pb, lr=0.5)  # hyperparameters come from the state dict
    opt_b.load_state_dict(sd)
    run_steps(opt_a, pa, grads[3:])
    run_steps(opt_b, pb, grads[3:])
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)


def test_state_dict_loads_with_weights_only_including_ns_dtype():
    p = nn.Parameter(torch.randn(4, 6))
    opt = Muon([p], ns_dtype=torch.bfloat16)
    assert opt.param_groups[0]["ns_dtype"] == "bfloat16"
    p.grad = torch.randn(4, 6)
    opt.step()
    sd = round_trip(opt.state_dict())
    assert sd["param_groups"][0]["ns_dtype"] == "bfloat16"
    assert torch.equal(sd["state"][0]["momentum_buffer"], opt.state[p]["momentum_buffer"])


def test_bf16_param_keeps_fp32_momentum_across_load():
    p = nn.Parameter(torch.randn(8, 8, dtype=torch.bfloat16))
    opt = Muon([p])
    p.grad = torch.randn(8, 8, dtype=torch.bfloat16)
    opt.step()
    m = opt.state[p]["momentum_buffer"].clone()
    opt2 = Muon([p])
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[p]["momentum_buffer"].dtype == torch.float32
    assert torch.equal(opt2.state[p]["momentum_buffer"], m)


# ----------------------------------------------------------------------------------------------
# factory


class TinyBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.Parameter(torch.ones(d))
        self.q = nn.Linear(d, d, bias=True)  # weight -> Muon, bias (1-D) -> AdamW
        self.up = nn.Linear(d, 3 * d, bias=False)
        self.gate_scale = nn.Parameter(torch.zeros(()))


class TinyLM(nn.Module):
    def __init__(self, vocab=50, d=16, n=2):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(TinyBlock(d) for _ in range(n))
        self.norm = nn.Parameter(torch.ones(d))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied
        self.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)


def test_split_params_tiny_model():
    model = TinyLM()
    muon, adamw = split_named_params(model)
    assert [n for n, _ in muon] == ["blocks.0.q.weight", "blocks.0.up.weight",
                                    "blocks.1.q.weight", "blocks.1.up.weight"]
    adam_names = {n for n, _ in adamw}
    assert adam_names == {"tok_emb.weight", "blocks.0.norm", "blocks.0.q.bias", "blocks.0.gate_scale",
                          "blocks.1.norm", "blocks.1.q.bias", "blocks.1.gate_scale", "norm"}
    mp, ap = split_params(model)
    assert len({id(p) for p in mp + ap}) == len(mp) + len(ap)  # tied weight once


def test_split_params_project_gpt():
    from nanochat_ternary.config import ModelConfig  # the model is part of the package: no skip
    from nanochat_ternary.model.gpt import GPT

    for tied in (True, False):
        cfg = ModelConfig(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=96, max_seq_len=32,
                          weight_tied=tied)
        model = GPT(cfg)
        muon, adamw = split_named_params(model)
        expected = {id(p) for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim == 2}
        assert {id(p) for _, p in muon} == expected and expected
        assert all(p.ndim == 2 and n.startswith("blocks.") for n, p in muon)
        unique = {id(p) for p in model.parameters()}
        assert len(muon) + len(adamw) == len(unique)
        assert id(model.tok_emb.weight) in {id(p) for _, p in adamw}


def test_build_optimizers_and_memory_report():
    model = TinyLM()
    tcfg = TrainConfig(lr=0.03, adam_lr=0.004, weight_decay=0.1, muon_momentum=0.9, ns_steps=4)
    opts = build_optimizers(model, tcfg, torch.device("cpu"))
    muon, adamw = opts
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    g = muon.param_groups[0]
    got = (g["lr"], g["initial_lr"], g["momentum"], g["ns_steps"], g["weight_decay"])
    assert got == (0.03, 0.03, 0.9, 4, 0.1)
    ga = adamw.param_groups[0]
    assert (ga["lr"], ga["initial_lr"], ga["weight_decay"], ga["betas"]) == (0.004, 0.004, 0.0, (0.9, 0.95))

    x = torch.randint(0, 50, (3, 5))
    h = model.tok_emb(x)
    for blk in model.blocks:
        h = h * blk.norm + blk.q(h) + blk.up(h)[..., :16] * blk.gate_scale
    loss = model.lm_head(h * model.norm).logsumexp(-1).mean()
    loss.backward()
    for o in opts:
        o.step()
    rep = memory_report(opts)
    n_muon = sum(p.numel() for p in split_params(model)[0])
    n_adam = sum(p.numel() for p in split_params(model)[1])
    muon_bytes = sum(t.nbytes for s in muon.state.values() for t in s.values() if torch.is_tensor(t))
    adam_bytes = sum(t.nbytes for s in adamw.state.values() for t in s.values() if torch.is_tensor(t))
    assert muon_bytes == 4 * n_muon  # one fp32 buffer per element
    assert optimizer_state_bytes(muon) == muon_bytes
    assert rep == {"variant": "muon", "muon_params": n_muon, "muon_state_bytes": muon_bytes,
                   "adamw_params": n_adam, "adamw_state_bytes": adam_bytes,
                   "total_state_bytes": muon_bytes + adam_bytes, "bytes_per_muon_param": 4.0,
                   "muon_int8_tensors": 0, "galore_projected": 0}


@pytest.mark.parametrize("flags,cls,variant", [
    (dict(), Muon, "muon"),
    (dict(use_8bit_optim=True), Muon8bit, "muon-8bit"),
    (dict(use_8bit_optim=True, stochastic_rounding=True), Muon8bit, "muon-8bit"),
    (dict(use_galore=True), GaLoreMuon, "galore-muon"),
    (dict(use_galore=True, use_8bit_optim=True), GaLoreMuon, "galore-muon-8bit"),
])
def test_build_optimizers_picks_the_variant(flags, cls, variant):
    tcfg = TrainConfig(lr=0.03, seed=5, quant_block_size=64, galore_rank=32, galore_update_freq=7,
                       galore_min_dim=100, galore_scale=0.5, galore_proj_dtype="float16", **flags)
    muon = build_optimizers(TinyLM(), tcfg, torch.device("cpu"))[0]
    assert type(muon) is cls and muon.variant == variant
    g = muon.param_groups[0]
    if cls is not Muon:
        assert (g["quantize"], g["block_size"], g["seed"]) == (tcfg.use_8bit_optim, 64, 5)
        assert g["stochastic_rounding"] == tcfg.stochastic_rounding
    if cls is GaLoreMuon:
        assert (g["rank"], g["update_freq"], g["min_dim"], g["scale"], g["proj_dtype"]) == \
            (32, 7, 100, 0.5, "float16")


def test_build_optimizers_rejects_bad_combinations():
    with pytest.raises(ConfigError, match="stochastic_rounding"):
        build_optimizers(TinyLM(), TrainConfig(stochastic_rounding=True), torch.device("cpu"))
    with pytest.raises(ConfigError, match="proj_dtype"):
        build_optimizers(TinyLM(), TrainConfig(use_galore=True, galore_proj_dtype="int4"),
                         torch.device("cpu"))


class MatrixLM(nn.Module):
    """Embedding -> two residual MLP blocks -> head; the block matrices are 48x80 / 80x48."""

    def __init__(self, vocab=40, d=48, h=80):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, h, bias=False), nn.GELU(),
                                                  nn.Linear(h, d, bias=False)) for _ in range(2))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, x, y):
        h = self.tok_emb(x)
        for blk in self.blocks:
            h = h + blk(h)
        return nn.functional.cross_entropy(self.head(h).flatten(0, 1), y.flatten())


VARIANT_FLAGS = {
    "muon": dict(),
    "muon-8bit": dict(use_8bit_optim=True),
    "muon-8bit-sr": dict(use_8bit_optim=True, stochastic_rounding=True),
    "galore": dict(use_galore=True),
    "galore-8bit-sr": dict(use_galore=True, use_8bit_optim=True, stochastic_rounding=True),
}


@pytest.mark.parametrize("flags", list(VARIANT_FLAGS.values()), ids=list(VARIANT_FLAGS))
def test_resume_gives_the_same_losses(flags, tmp_path):
    """Train 8 steps straight; and 4 steps, checkpoint (model + optimizers, weights_only), rebuild
    everything and train 4 more: the per-step losses are identical (GaLore refreshes at 0, 3, 6)."""
    tcfg = TrainConfig(lr=0.02, adam_lr=0.01, seed=9, galore_rank=8, galore_update_freq=3,
                       galore_min_dim=32, **flags)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 40, (4, 12), generator=g), torch.randint(0, 40, (4, 12), generator=g))
            for _ in range(8)]

    def train(model, opts, batches):
        losses = []
        for x, y in batches:
            loss = model(x, y)
            loss.backward()
            for o in opts:
                o.step()
            model.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    def fresh():
        torch.manual_seed(1)
        model = MatrixLM()
        opts = build_optimizers(model, tcfg, torch.device("cpu"))
        for grp in opts[0].param_groups:
            if "min_quant_numel" in grp:
                grp["min_quant_numel"] = 0  # tiny matrices: quantise them all the same
        return model, opts

    model, opts = fresh()
    straight = train(model, opts, data)
    model, opts = fresh()
    first = train(model, opts, data[:4])
    torch.save({"model": model.state_dict(), "opts": [o.state_dict() for o in opts]}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    model, opts = fresh()
    model.load_state_dict(ck["model"])
    for o, sd in zip(opts, ck["opts"]):
        o.load_state_dict(sd)
    assert first + train(model, opts, data[4:]) == straight
    rep = memory_report(opts)
    # the documented names, spelled out here rather than read back from the optimizer
    expected = ("galore-muon" if tcfg.use_galore else "muon") + ("-8bit" if tcfg.use_8bit_optim else "")
    assert rep["variant"] == expected
    assert (rep["galore_projected"] > 0) == tcfg.use_galore
    assert (rep["muon_int8_tensors"] > 0) == tcfg.use_8bit_optim


def test_measure_optimizer_state_and_baseline():
    model = MatrixLM(vocab=40, d=96, h=160)  # 96x160 matrices: int8 (15360 values) and projected
    before = [p.detach().clone() for p in model.parameters()]
    n_muon = 4 * 96 * 160
    base = measure_optimizer_state(model, TrainConfig())
    assert base["variant"] == "muon" and base["muon_params"] == n_muon
    assert base["fp32_muon_state_bytes"] == base["muon_state_bytes"] == 4 * n_muon
    assert base["muon_state_vs_fp32"] == 1.0
    assert base["adamw_state_bytes"] == 2 * 4 * (2 * 40 * 96) + 2 * 4  # exp_avg, exp_avg_sq, steps
    q = measure_optimizer_state(model, TrainConfig(use_8bit_optim=True))
    assert q["variant"] == "muon-8bit" and q["fp32_muon_state_bytes"] == 4 * n_muon
    assert q["muon_state_bytes"] == 4 * (96 * 160 + 4 * 96 * 160 // 128)
    assert q["muon_state_vs_fp32"] == q["muon_state_bytes"] / (4 * n_muon)
    gq = measure_optimizer_state(model, TrainConfig(use_galore=True, use_8bit_optim=True, galore_rank=32,
                                                    galore_min_dim=64))
    # per matrix: bf16 projector 96 x 32, int8 momentum 32 x 160 (40 blocks of 128 + 40 fp32 scales)
    assert gq["variant"] == "galore-muon-8bit" and gq["galore_projected"] == gq["muon_int8_tensors"] == 4
    assert gq["muon_state_bytes"] == 4 * (2 * 96 * 32 + 32 * 160 + 4 * 40)
    assert gq["fp32_muon_state_bytes"] == 4 * n_muon
    for p, b in zip(model.parameters(), before):  # the model itself is untouched
        assert torch.equal(p, b) and p.grad is None


# ----------------------------------------------------------------------------------------------
# distributed: 2 gloo processes, Newton–Schulz split by rank


DIST_SHAPES = [(24, 24), (40, 16), (16, 40), (24, 24), (8, 56)]  # 5: uneven over 2 ranks


def _dist_data():
    g = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=g) for s in DIST_SHAPES]
    grads = [[torch.randn(s, generator=g) for s in DIST_SHAPES] for _ in range(3)]
    grads[1][2] = None  # a parameter without a gradient this step
    return init, grads


def _dist_run(init, grads, first_group: int = 2, **muon_kwargs):
    """Three steps of Muon over ``init`` in two param groups (the second with its own lr and decay)."""
    params = [nn.Parameter(t.clone()) for t in init]
    opt = Muon([{"params": params[:first_group]},
                {"params": params[first_group:], "lr": 0.05, "weight_decay": 0.1}], lr=0.02, **muon_kwargs)
    run_steps(opt, params, grads)
    return [p.detach().clone() for p in params], opt.state_dict()


def _dist_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    init, grads = _dist_data()
    if rank == 0:
        single, _ = _dist_run(init, grads)  # before the process group exists: the plain loop
        torch.save(single, os.path.join(out_dir, "single.pt"))
    with gloo_group(rank, world, port):
        calls = []
        orig = Muon._orthogonalize
        Muon._orthogonalize = lambda self, u, group: calls.append(u.shape) or orig(self, u, group)
        params, sd = _dist_run(init, grads)
        torch.save({"params": params, "state": sd, "ns_calls": len(calls)},
                   os.path.join(out_dir, f"rank{rank}.pt"))


def _spawn_ranks(worker, tmp_path, world: int = 2):
    """What rank 0 saved as the single-process reference and what every rank saved."""
    ranks = spawn_ranks(worker, tmp_path, world)
    return saved(tmp_path), ranks


def test_distributed_split_matches_single_process(tmp_path):
    single, ranks = _spawn_ranks(_dist_worker, tmp_path)
    # rank 0 owns params 0, 2, 4 and rank 1 owns 1, 3; param 2 has no gradient in step 2
    assert [r["ns_calls"] for r in ranks] == [3 + 2 + 3, 2 + 2 + 2]
    for r in ranks:
        for a, b in zip(r["params"], single):
            assert torch.equal(a, b)
    s0, s1 = ranks[0]["state"], ranks[1]["state"]
    assert s0["param_groups"] == s1["param_groups"]
    assert s0["state"].keys() == s1["state"].keys() and len(s0["state"]) == len(DIST_SHAPES)
    for k in s0["state"]:
        assert torch.equal(s0["state"][k]["momentum_buffer"], s1["state"][k]["momentum_buffer"])


# stacked (the CUDA default; forced here): each same-shape stack split into contiguous slices

STACK_SHAPES = [(24, 24)] * 5 + [(40, 16)] * 3 + [(16, 40)]  # stacks of 5, 3 and 1 over 2 ranks


def _stacked_data():
    g = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=g) for s in STACK_SHAPES]
    grads = [[torch.randn(s, generator=g) for s in STACK_SHAPES] for _ in range(3)]
    grads[1][3] = None  # the (24, 24) stack has 4 matrices in step 2
    return init, grads


def _stacked_run(init, grads, nesterov):
    return _dist_run(init, grads, 6, nesterov=nesterov, stacked=True)


def _stacked_worker(rank, world, port, out_dir):
    from nanochat_ternary.optim import muon as muon_module

    torch.set_num_threads(1)
    init, grads = _stacked_data()
    cases = {"whole": muon_module.STACK_ELEMENTS, "rounds": 2 * 24 * 24}  # rounds: 1 matrix per rank
    if rank == 0:  # the single-process stacked step, before the process group exists
        torch.save({nesterov: _stacked_run(init, grads, nesterov)[0] for nesterov in (True, False)},
                   os.path.join(out_dir, "single.pt"))
    orig = Muon._orthogonalize
    with gloo_group(rank, world, port):
        try:
            out = {}
            for name, elements in cases.items():
                muon_module.STACK_ELEMENTS = elements
                for nesterov in (True, False):
                    calls: list[tuple[int, ...]] = []
                    Muon._orthogonalize = (lambda self, u, group, calls=calls:
                                           calls.append(tuple(u.shape)) or orig(self, u, group))
                    params, sd = _stacked_run(init, grads, nesterov)
                    out[(name, nesterov)] = {"params": params, "state": sd, "ns_calls": calls}
                    Muon._orthogonalize = orig
            torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        finally:
            Muon._orthogonalize = orig


def test_distributed_stacked_split_matches_single_process(tmp_path):
    """Under torchrun the stacked step splits each stack by rank: the weights and the momentum on
    every rank equal the single-process stacked step bit for bit (each rank's batched Newton–Schulz
    on its slice computes the same per-matrix products), and each rank orthogonalises only its slice."""
    single, ranks = _spawn_ranks(_stacked_worker, tmp_path)
    world = len(ranks)
    # stacks are per param group: group 1 (24,24) x5 -> 3 + 2 (x4 in step 2 -> 2 + 2), (40,16) x1 -> 1 + 0;
    # group 2 (40,16) x2 -> 1 + 1, (16,40) x1 -> 1 + 0
    steps = [[(3, 24, 24), (1, 40, 16), (1, 40, 16), (1, 16, 40)], [(2, 24, 24), (1, 40, 16)]]
    step2 = [[(2, 24, 24), (1, 40, 16), (1, 40, 16), (1, 16, 40)], [(2, 24, 24), (1, 40, 16)]]
    for r in range(world):
        expected = steps[r] + step2[r] + steps[r]
        assert ranks[r][("whole", True)]["ns_calls"] == expected
        # rounds of one matrix per rank: every call is a stack of 1, about half the matrices each
        assert {s[0] for s in ranks[r][("rounds", True)]["ns_calls"]} == {1}
    assert sum(len(ranks[r][("rounds", True)]["ns_calls"]) for r in range(world)) == 9 + 8 + 9
    for key in ranks[0]:
        for r in ranks:
            for a, b in zip(r[key]["params"], single[key[1]]):
                assert torch.equal(a, b), key
        s0, s1 = ranks[0][key]["state"], ranks[1][key]["state"]
        assert s0["state"].keys() == s1["state"].keys() and len(s0["state"]) == len(STACK_SHAPES)
        for k in s0["state"]:
            assert torch.equal(s0["state"][k]["momentum_buffer"], s1["state"][k]["momentum_buffer"])
