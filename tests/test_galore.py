"""GaLore Muon and the randomized SVD, against torch.linalg.svd and float64 references."""

from __future__ import annotations

import math
import os

import pytest
import torch
from helpers.distributed import gloo_group, saved, spawn_ranks
from helpers.optim import planted, random_grads, random_params, round_trip, run_steps
from torch import nn

from nanochat_ternary.optim import (
    BlockQuantized,
    GaLoreMuon,
    Muon,
    memory_report,
    optimizer_state_bytes,
    randomized_svd,
)

A, B, C = 3.4445, -4.7750, 2.0315


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# randomized SVD


@pytest.mark.parametrize("m,n", [(120, 200), (200, 120)])
def test_randomized_svd_recovers_planted_low_rank(m, n):
    g = torch.Generator().manual_seed(0)
    r = 12
    A64 = planted(m, n, torch.logspace(1, -1, r, dtype=torch.float64), g)
    A32 = A64.float() + 1e-6 * torch.randn(m, n, generator=g)  # fp32 storage + a little noise
    U, S, Vh = randomized_svd(A32, r, generator=torch.Generator().manual_seed(1))
    assert U.shape == (m, r) and S.shape == (r,) and Vh.shape == (r, n)
    Ur, Sr, Vhr = torch.linalg.svd(A64, full_matrices=False)
    torch.testing.assert_close(S.double(), Sr[:r], rtol=1e-4, atol=0)
    # same subspaces (singular vectors are defined up to sign): compare the projectors
    for got, ref in ((U.double(), Ur[:, :r]), (Vh.double().T, Vhr[:r].T)):
        torch.testing.assert_close(got @ got.T, ref @ ref.T, atol=1e-4, rtol=0)
    torch.testing.assert_close(U.T @ U, torch.eye(r), atol=1e-5, rtol=0)
    torch.testing.assert_close((U * S) @ Vh, A32, atol=1e-4, rtol=0)


def test_randomized_svd_top_subspace_of_full_rank_matrix():
    """Decaying full-rank spectrum: with 2 power iterations the top 8 singular values are found to
    ~1% and the top subspace captures nearly all of the exact one's energy."""
    g = torch.Generator().manual_seed(2)
    m, n, r = 96, 160, 8
    f64 = dict(dtype=torch.float64)
    spectrum = torch.cat([torch.logspace(1, 0, r, **f64), 0.05 * torch.ones(m - r, **f64)])
    A64 = planted(m, n, spectrum, g)
    U, S, _ = randomized_svd(A64.float(), r, generator=torch.Generator().manual_seed(3))
    Ur, Sr, _ = torch.linalg.svd(A64, full_matrices=False)
    torch.testing.assert_close(S.double(), Sr[:r], rtol=1e-2, atol=0)
    overlap = torch.linalg.matrix_norm(U.double().T @ Ur[:, :r]) ** 2 / r  # 1 = same subspace
    assert overlap > 0.999


# ----------------------------------------------------------------------------------------------
# GaLore Muon


@pytest.mark.parametrize("kw", [dict(rank=40), dict(rank=64), dict(rank=8, min_dim=49)],
                         ids=["rank=min-side", "rank>min-side", "below-min-dim"])
def test_full_rank_galore_equals_muon(kw):
    shapes = [(40, 64), (64, 40), (48, 48)]
    grads = random_grads(shapes, 4)
    pa, pb = random_params(shapes), random_params(shapes)
    common = dict(lr=0.05, momentum=0.9, weight_decay=0.1)
    run_steps(Muon(pa, **common), pa, grads)
    kw = {**dict(min_dim=16, update_freq=2), **kw}
    opt = GaLoreMuon(pb, **common, **kw)
    run_steps(opt, pb, grads)
    if kw["rank"] >= 48 or kw["min_dim"] > 48:  # no matrix is projected
        for a, b in zip(pa, pb):
            assert torch.equal(a, b)
        assert memory_report([opt])["galore_projected"] == 0
    else:  # rank 40: the 40-wide matrices are not projected, the 48x48 one is (rank < 48)
        for a, b in zip(pa[:2], pb[:2]):
            assert torch.equal(a, b)
        assert "projector" in opt.state[pb[2]] and "projector" not in opt.state[pb[0]]


def ns5_f64(u):
    X = u.T if u.shape[0] > u.shape[1] else u
    X = X / (torch.linalg.matrix_norm(X) + 1e-7)
    for _ in range(5):
        Am = X @ X.T
        X = A * X + (B * Am + C * Am @ Am) @ X
    return X.T if u.shape[0] > u.shape[1] else X


def reference_galore(p0, grads, rank, freq, lr, mu, wd, gscale):
    """Float64 GaLore Muon with exact-SVD projectors (written from the formulas)."""
    p = p0.double().clone()
    m, n = p.shape
    left = m <= n
    P = M = None
    for t, G in enumerate(grads):
        G = G.double()
        if t % freq == 0:
            U, _, Vh = torch.linalg.svd(G, full_matrices=False)
            P_new = U[:, :rank] if left else Vh[:rank].T
            if M is not None:
                M = (P_new.T @ P) @ M if left else M @ (P_new.T @ P).T
            P = P_new
        R = P.T @ G if left else G @ P
        M = (1 - mu) * R if M is None else mu * M + (1 - mu) * R
        u = (1 - mu) * R + mu * M
        Ou = ns5_f64(u)
        D = P @ Ou if left else Ou @ P.T
        p = p * (1 - lr * wd) - lr * max(1.0, m / n) ** 0.5 * (min(m, n) / rank) ** 0.5 * gscale * D
    return p


@pytest.mark.parametrize("shape", [(48, 80), (80, 48)], ids=["left", "right"])
def test_galore_matches_reference_on_low_rank_gradients(shape):
    """With gradients of rank <= r the randomized SVD finds the exact top-r subspace, and every
    step is invariant to the basis chosen inside it, so exact-SVD projectors in float64 must give
    the same parameters (refreshes at steps 0, 2, 4: the momentum is carried twice)."""
    g = torch.Generator().manual_seed(5)
    r, steps = 6, 5
    m, n = shape
    grads = [planted(m, n, torch.linspace(3, 1, r, dtype=torch.float64), g).float() for _ in range(steps)]
    (p,) = random_params([shape])
    p0 = p.detach().clone()
    lr, mu, wd, gscale = 0.05, 0.9, 0.1, 1.5
    opt = GaLoreMuon([p], lr=lr, momentum=mu, weight_decay=wd, rank=r, update_freq=2, min_dim=16,
                     scale=gscale, proj_dtype="float32")
    run_steps(opt, [p], [[gr] for gr in grads])
    ref = reference_galore(p0, grads, r, 2, lr, mu, wd, gscale)
    torch.testing.assert_close(p.detach().double(), ref, atol=2e-5, rtol=0)
    st = opt.state[p]
    assert st["step"] == steps and st["projector"].shape == (min(shape), r)
    assert st["momentum_buffer"].shape == ((r, n) if m <= n else (m, r))


@pytest.mark.parametrize("shape", [(48, 80), (80, 48)], ids=["left", "right"])
@pytest.mark.parametrize("quantize", [False, True], ids=["fp32", "int8"])
def test_momentum_carried_across_refresh(shape, quantize):
    """At a refresh, M <- lerp(P_new^T P_old M_old, R, 1 - mu), R = P_new^T G (left side), or
    M_old (P_new^T P_old)^T and G P_new (right side), computed here from the stored tensors."""
    m, n = shape
    (p,) = random_params([shape])
    grads = random_grads([shape], 3)
    mu = 0.9
    opt = GaLoreMuon([p], momentum=mu, rank=8, update_freq=2, min_dim=16, proj_dtype="float32",
                     quantize=quantize, min_quant_numel=0, block_size=32)
    mom = (lambda st, s: BlockQuantized(st["momentum_codes"], st["momentum_scales"], s).dequantize()) \
        if quantize else (lambda st, s: st["momentum_buffer"])
    run_steps(opt, [p], grads[:2])
    st = opt.state[p]
    mshape = (8, n) if m <= n else (m, 8)
    P_old, M_old = st["projector"].double().clone(), mom(st, mshape).double().clone()
    run_steps(opt, [p], grads[2:])  # step 2: refresh
    P_new, M_new = st["projector"].double(), mom(st, mshape).double()
    assert (P_new - P_old).abs().max() > 1e-3  # a new subspace indeed
    G = grads[2][0].double()
    if m <= n:
        expected = (P_new.T @ P_old) @ M_old * mu + (1 - mu) * (P_new.T @ G)
    else:
        expected = M_old @ (P_new.T @ P_old).T * mu + (1 - mu) * (G @ P_new)
    if quantize:  # within half a quantisation step of the exact value (block scale of 32 values)
        blocks = torch.nn.functional.pad(expected.reshape(-1), (0, (-expected.numel()) % 32)).view(-1, 32)
        step = (blocks.abs().amax(1) / 127).repeat_interleave(32)[: expected.numel()].view(mshape)
        assert ((M_new - expected).abs() <= 0.5 * step * (1 + 1e-4) + 1e-7).all()
    else:
        torch.testing.assert_close(M_new, expected, atol=1e-6, rtol=0)
    # and neither zeroed nor kept in the old basis
    R = (P_new.T @ G) if m <= n else (G @ P_new)
    zeroed, stale = (1 - mu) * R, mu * M_old + (1 - mu) * R
    assert (M_new - stale).abs().max() > 1e-3 and (M_new - zeroed).abs().max() > 1e-3


def test_projector_refresh_schedule_seeded_and_in_state_dict():
    shape = (40, 64)
    grads = random_grads([shape], 5)
    seen = []
    for seed in (0, 0, 1):
        (p,) = random_params([shape])
        opt = GaLoreMuon([p], rank=8, update_freq=3, min_dim=16, seed=seed)
        projs = []
        for gs in grads:
            p.grad = gs[0].clone()
            opt.step()
            projs.append(opt.state[p]["projector"].clone())
        seen.append(projs)
        assert projs[0].dtype == torch.bfloat16 and projs[0].shape == (40, 8)  # default proj_dtype
        # refreshed at steps 0 and 3 only
        assert torch.equal(projs[0], projs[1]) and torch.equal(projs[1], projs[2])
        assert not torch.equal(projs[2], projs[3]) and torch.equal(projs[3], projs[4])
        sd = opt.state_dict()
        assert torch.equal(sd["state"][0]["projector"], projs[-1]) and sd["state"][0]["step"] == 5
    assert all(torch.equal(a, b) for a, b in zip(seen[0], seen[1]))  # same seed, same projectors
    # another seed gives another sketch; on random (full-rank) gradients another basis
    assert not torch.equal(seen[0][0], seen[2][0])


VARIANTS = {
    "galore": dict(),
    "galore-8bit": dict(quantize=True),
    "galore-8bit-sr": dict(quantize=True, stochastic_rounding=True),
}


@pytest.mark.parametrize("kw", list(VARIANTS.values()), ids=list(VARIANTS))
def test_state_dict_round_trip_and_resume(kw):
    shapes = [(40, 64), (72, 40), (24, 24)]
    grads = random_grads(shapes, 7)
    pa = random_params(shapes)
    make = lambda ps, **o: GaLoreMuon(ps, **{**dict(rank=8, update_freq=2, min_dim=32, seed=4,
                                                    min_quant_numel=0), **kw, **o})
    opt_a = make(pa)
    run_steps(opt_a, pa, grads[:3])  # resume between two refreshes (steps 2 and 4)
    sd = round_trip(opt_a.state_dict())
    pb = [nn.Parameter(p.detach().clone()) for p in pa]
    opt_b = make(pb, seed=0, rank=4)  # hyperparameters come from the state dict
    opt_b.load_state_dict(sd)
    for a, b in zip(pa, pb):
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            same = torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype if torch.is_tensor(sa[k]) \
                else sa[k] == sb[k]
            assert same, k
    run_steps(opt_a, pa, grads[3:])
    run_steps(opt_b, pb, grads[3:])
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)


@pytest.mark.parametrize("quantize", [False, True], ids=["fp32-momentum", "int8-momentum"])
def test_both_flags_take_effect_and_bytes_are_measured(quantize):
    shapes = [(64, 160), (160, 64), (40, 40), (64, 64)]
    ps = random_params(shapes)
    # 40x40 is below min_dim; the momenta of 64x160 and 160x64 (16 x 160 values) are above the int8
    # threshold, those of 40x40 (1600) and 64x64 (16 x 64) below it
    opt = GaLoreMuon(ps, rank=16, min_dim=64, quantize=quantize, min_quant_numel=2000)
    run_steps(opt, ps, random_grads(shapes, 1))
    expected = 0
    for p in ps:
        st = opt.state[p]
        numel = p.numel()
        if min(p.shape) >= 64:
            m, n = p.shape
            assert st["projector"].dtype == torch.bfloat16 and st["projector"].shape == (min(m, n), 16)
            expected += 2 * min(m, n) * 16
            numel = 16 * max(m, n)  # projected momentum
        if quantize and numel >= 2000:
            nb = math.ceil(numel / 128)
            assert st["momentum_codes"].shape == (nb, 128) and "momentum_buffer" not in st
            expected += nb * (128 + 4)
        else:
            assert st["momentum_buffer"].shape in ((16, max(p.shape)), (max(p.shape), 16), p.shape)
            expected += 4 * numel
    rep = memory_report([opt])
    assert optimizer_state_bytes(opt) == rep["muon_state_bytes"] == expected
    assert rep["variant"] == ("galore-muon-8bit" if quantize else "galore-muon")
    assert rep["galore_projected"] == 3
    assert rep["muon_int8_tensors"] == (2 if quantize else 0)
    full = 4 * sum(p.numel() for p in ps)
    assert rep["muon_state_bytes"] < (0.45 if quantize else 0.6) * full


# ----------------------------------------------------------------------------------------------
# distributed: the projected Newton–Schulz of parameter i on rank i % 2


DIST_SHAPES = [(48, 80), (80, 48), (24, 24), (64, 64), (48, 48)]


def _dist_data():
    g = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=g) for s in DIST_SHAPES]
    grads = [[torch.randn(s, generator=g) for s in DIST_SHAPES] for _ in range(4)]
    grads[1][3] = None
    return init, grads


def _dist_run(init, grads):
    params = [nn.Parameter(t.clone()) for t in init]
    opt = GaLoreMuon(params, rank=8, update_freq=2, min_dim=32, quantize=True, stochastic_rounding=True,
                     min_quant_numel=0, seed=11)
    run_steps(opt, params, grads)
    return [p.detach().clone() for p in params], opt.state_dict()


def _dist_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    init, grads = _dist_data()
    if rank == 0:
        single, _ = _dist_run(init, grads)
        torch.save(single, os.path.join(out_dir, "single.pt"))
    with gloo_group(rank, world, port):
        shapes = []
        orig = GaLoreMuon._orthogonalize
        GaLoreMuon._orthogonalize = lambda self, u, group: shapes.append(tuple(u.shape)) or orig(self, u, group)
        params, sd = _dist_run(init, grads)
        torch.save({"params": params, "state": sd, "ns_shapes": shapes},
                   os.path.join(out_dir, f"rank{rank}.pt"))


def test_distributed_galore_8bit_matches_single_process(tmp_path):
    ranks = spawn_ranks(_dist_worker, tmp_path, 2)
    single = saved(tmp_path)
    # rank 0 owns params 0, 2, 4; rank 1 owns 1, 3 (param 3 has no gradient in step 1).
    # Projected matrices orthogonalise their r-wide momentum: (8, 80), (80, 8), (8, 64), (8, 48)
    per_step0 = [(8, 80), (24, 24), (8, 48)]
    assert ranks[0]["ns_shapes"] == per_step0 * 4
    assert ranks[1]["ns_shapes"] == [(80, 8), (8, 64), (80, 8), (80, 8), (8, 64), (80, 8), (8, 64)]
    for r in ranks:
        for a, b in zip(r["params"], single):
            assert torch.equal(a, b)
    s0, s1 = ranks[0]["state"]["state"], ranks[1]["state"]["state"]
    for k in s0:
        for key, v in s0[k].items():
            assert torch.equal(v, s1[k][key]) if torch.is_tensor(v) else v == s1[k][key]


def test_loading_another_variants_state_is_refused_or_converted():
    shapes = [(48, 80)]
    grads = random_grads(shapes, 2)
    from nanochat_ternary.optim import Muon8bit

    def trained(opt_cls, **kw):
        ps = random_params(shapes)
        opt = opt_cls(ps, **kw)
        run_steps(opt, ps, grads[:1])
        return opt.state_dict()

    galore = trained(GaLoreMuon, rank=8, min_dim=16, quantize=True, min_quant_numel=0)
    int8 = trained(Muon8bit, min_quant_numel=0)
    fp32 = trained(Muon)
    for sd, cls in ((galore, Muon8bit), (galore, Muon), (int8, Muon)):
        with pytest.raises(ValueError, match="does not fit"):
            cls(random_params(shapes)).load_state_dict(sd)
    # the other way round is a conversion: fp32 or int8 full momentum -> projected on the next step
    for sd in (fp32, int8):
        ps = random_params(shapes)
        opt = GaLoreMuon(ps, rank=8, min_dim=16, quantize=True, min_quant_numel=0)
        opt.load_state_dict(sd)
        run_steps(opt, ps, grads[1:])
        st = opt.state[ps[0]]
        assert st["projector"].shape == (48, 8) and st["momentum_codes"].numel() == 8 * 80
