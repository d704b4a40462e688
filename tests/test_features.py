"""Training features: gradient checkpointing, async loader, multi-token prediction, Collider."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from helpers.models import tiny_config

from nanochat_ternary.config import ModelConfig
from nanochat_ternary.model.gpt import GPT

pytestmark = pytest.mark.usefixtures("one_thread")


tiny_cfg = partial(tiny_config, dim=32, vocab_size=97, max_seq_len=32, group_size=32)  # helpers.models, narrower


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------------------------
# gradient checkpointing


@pytest.mark.parametrize("quant", ["ternary", "none"])
def test_gradient_checkpointing_matches_losses_and_grads(quant):
    torch.manual_seed(0)
    model = GPT(tiny_cfg(quantization=quant))
    x = torch.randint(0, 97, (3, 16))
    y = torch.randint(0, 97, (3, 16))
    loss0 = model(x, targets=y)
    loss0.backward()
    g0 = _grads(model)
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing = True
    loss1 = model(x, targets=y)
    loss1.backward()
    g1 = _grads(model)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-6, msg=k)
    # the graph really is checkpointed: fewer tensors saved for backward
    def n_saved(flag: bool) -> int:
        model.gradient_checkpointing = flag
        count = [0]

        def pack(t):
            count[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, targets=y)
        return count[0]

    assert n_saved(True) < n_saved(False) / 2
    # no-grad and eval paths are untouched
    with torch.no_grad():
        model.gradient_checkpointing = True
        torch.testing.assert_close(model(x, targets=y), loss0.detach(), rtol=0, atol=1e-6)


def test_gradient_checkpointing_objective_chunks_the_head_and_matches(monkeypatch):
    from nanochat_ternary.config import TrainConfig
    from nanochat_ternary.model import linear_ce
    from nanochat_ternary.train import objective as obj_mod

    monkeypatch.setattr(linear_ce, "CPU_CHUNK_ROWS", 7)  # several chunks, a ragged last one
    torch.manual_seed(0)
    mcfg = tiny_cfg()
    model = GPT(mcfg)
    x = torch.randint(0, 97, (3, 16))
    y = torch.randint(0, 97, (3, 16))
    y[0, 3] = -1
    ref = model(x, targets=y)
    ref.backward()
    g0 = _grads(model)
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing = True
    loss, stats = model(x, targets=y, objective=obj_mod.Objective(mcfg, TrainConfig()))
    loss.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats["ce"], ref.detach(), rtol=1e-6, atol=1e-6)
    for k, g in _grads(model).items():
        torch.testing.assert_close(g, g0[k], rtol=1e-5, atol=1e-6, msg=k)


# --------------------------------------------------------------------------------------------
# async loader

import numpy as np  # noqa: E402

from nanochat_ternary.data.batches import TokenBatches  # noqa: E402
from nanochat_ternary.data.loader import AsyncBatches, SyncBatches  # noqa: E402


def _token_batches(accum: int = 2) -> TokenBatches:
    tokens = np.random.default_rng(0).integers(0, 1000, size=5000).astype(np.uint16)
    return TokenBatches(tokens, batch_size=3, seq_len=16, seed=7, grad_accum_steps=accum)


@pytest.mark.parametrize("workers,prefetch", [(1, 1), (2, 4)])
def test_async_loader_yields_the_sync_sequence(workers, prefetch):
    tb = _token_batches()
    start, total = 5, 40  # a resumed run: starts mid-epoch, spans several epochs
    sync = SyncBatches(tb, start, total)
    asyn = AsyncBatches(tb, start, total, num_workers=workers, prefetch_batches=prefetch)
    try:
        n = 0
        for step in range(start, total):
            for micro in range(2):
                xs, ys = sync.next()
                xa, ya = asyn.next()
                xe, ye = tb.get(step, micro)
                assert torch.equal(xa, xs) and torch.equal(ya, ys) and torch.equal(xa, xe)
                n += 1
        assert n == (total - start) * 2
        with pytest.raises(StopIteration):
            asyn.next()
    finally:
        asyn.close()
        asyn.close()  # idempotent


class _Boom(TokenBatches):
    def get(self, step, micro=0):
        if step == 3:
            raise ValueError(f"corrupt shard at step {step}")
        return super().get(step, micro)


def test_async_loader_propagates_worker_errors_and_shuts_down():
    tokens = np.arange(3000, dtype=np.uint16) % 500
    tb = _Boom(tokens, batch_size=2, seq_len=8, seed=1)
    src = AsyncBatches(tb, 0, 10, num_workers=2, prefetch_batches=2)
    workers = list(src._it._workers)
    for _ in range(3):
        src.next()
    with pytest.raises(ValueError, match="corrupt shard at step 3"):
        src.next()
    src.close()
    for w in workers:
        w.join(timeout=10)
        assert not w.is_alive()


# --------------------------------------------------------------------------------------------
# end to end through the CLI

import json  # noqa: E402

from conftest import SMALL_CPU_RUN, train_small  # noqa: E402

SMALL = SMALL_CPU_RUN
_train = train_small


def test_cli_async_loader_and_checkpointing_reproduce_sync_run(tmp_path, isolated_cache, observe_training):
    obs = observe_training
    base = _train(tmp_path, "sync", "--total-steps", "6", "--grad-accum-steps", "2")
    assert obs.checkpointed_blocks == 0 and type(obs.sources[0]) is SyncBatches
    fast = _train(tmp_path, "async", "--total-steps", "6", "--grad-accum-steps", "2",
                  "--set", "use_async_loader=true", "--set", "num_workers=2", "--set", "prefetch_batches=3",
                  "--set", "gradient_checkpointing=true")
    # the features were on: every block of every micro-batch checkpointed (6 steps x 2 micro x 2
    # layers), batches from the loader's 2 worker processes
    assert obs.checkpointed_blocks == 6 * 2 * 2
    assert type(obs.sources[1]) is AsyncBatches and obs.live_workers[1] == 2
    assert [r["step"] for r in fast] == list(range(1, 7))
    for a, b in zip(base, fast):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)
        assert "data_wait_s" in a and a["data_wait_s"] >= 0 and b["data_wait_s"] >= 0
    # resume with the async loader continues with exactly the batches of the straight run
    _train(tmp_path, "part", "--total-steps", "3", "--grad-accum-steps", "2",
           "--set", "use_async_loader=true")
    rest = _train(tmp_path, "part", "--total-steps", "6", "--grad-accum-steps", "2",
                  "--set", "use_async_loader=true", "--resume", str(tmp_path / "part"))[3:]  # log appends
    assert [r["step"] for r in rest] == [4, 5, 6]
    for r in rest:
        assert abs(r["loss"] - base[r["step"] - 1]["loss"]) < 1e-4


# --------------------------------------------------------------------------------------------
# multi-token prediction

import dataclasses  # noqa: E402
import math  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from nanochat_ternary.config import TrainConfig  # noqa: E402
from nanochat_ternary.model.mtp import mtp_targets  # noqa: E402
from nanochat_ternary.optim.factory import split_named_params  # noqa: E402
from nanochat_ternary.train.objective import KeptRowsCE, Objective, collider_keep  # noqa: E402


def test_mtp_targets_are_the_right_shifted_tokens():
    # tokens of one row: 10 11 12 13 14 15; x = 10..14, y = 11..15 (y[t] = token t+1)
    y = torch.tensor([[11, 12, 13, 14, 15]])
    # head k at position t predicts token t+1+k = y[t+k]
    assert mtp_targets(y, 1).tolist() == [[12, 13, 14, 15, -1]]
    assert mtp_targets(y, 2).tolist() == [[13, 14, 15, -1, -1]]
    assert mtp_targets(y, 4).tolist() == [[15, -1, -1, -1, -1]]
    assert mtp_targets(y, 5).tolist() == [[-1, -1, -1, -1, -1]]


def _naive_mtp_loss(model, x, y, n, weight):
    """All heads' full-vocab logits at once, no checkpointing."""
    h = model.hidden_states(x)
    V = model.cfg.vocab_size
    main = F.cross_entropy(model.logits(h).view(-1, V), y.view(-1))
    all_logits = torch.stack([model.logits(head(h)) for head in model.mtp.heads])  # [n, B, T, V]
    ces = []
    for k in range(1, n + 1):
        T = y.shape[1]
        ces.append(F.cross_entropy(all_logits[k - 1, :, : T - k].reshape(-1, V), y[:, k:].reshape(-1)))
    return main + weight * torch.stack(ces).mean(), main, ces


@pytest.mark.parametrize("tied", [True, False])
def test_mtp_loss_and_grads_equal_naive_all_heads_computation(tied):
    torch.manual_seed(0)
    mcfg = tiny_cfg(use_mtp=True, mtp_n_tokens=3, weight_tied=tied)
    model = GPT(mcfg)
    tcfg = TrainConfig(mtp_weight=0.3)
    x = torch.randint(0, 97, (2, 12))
    y = torch.randint(0, 97, (2, 12))
    loss, stats = model(x, targets=y, objective=Objective(mcfg, tcfg))
    loss.backward()
    g = _grads(model)
    model.zero_grad(set_to_none=True)
    ref, main, ces = _naive_mtp_loss(model, x, y, 3, 0.3)
    ref.backward()
    g_ref = _grads(model)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats["ce"], main.detach())
    for k in range(1, 4):
        torch.testing.assert_close(stats[f"mtp_ce_{k}"], ces[k - 1].detach())
    assert g.keys() == g_ref.keys() and any(k.startswith("mtp.") for k in g)
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-5, atol=1e-6, msg=k)
    # plain forward (validation, generation) is unaffected by the heads
    torch.testing.assert_close(model(x, targets=y), main.detach())


def test_mtp_heads_go_to_adamw_and_keep_at_most_one_heads_logits():
    torch.manual_seed(0)
    mcfg = tiny_cfg(use_mtp=True, mtp_n_tokens=4, vocab_size=512)
    model = GPT(mcfg)
    muon, adamw = split_named_params(model)
    assert not any(n.startswith("mtp.") for n, _ in muon)
    assert sum(n.startswith("mtp.") for n, _ in adamw) == 4 * 3
    x = torch.randint(0, 512, (2, 16))
    y = torch.randint(0, 512, (2, 16))
    logits_numel = 2 * 16 * 512
    big = []

    def pack(t):
        if t.shape[-1:] == (512,) and t.numel() >= logits_numel:  # logits-shaped (not the [V, D] weight)
            big.append(tuple(t.shape))
        return t

    def n_logits_saved(objective) -> int:
        big.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, targets=y, objective=objective)
        return len(big)

    plain = n_logits_saved(Objective(dataclasses.replace(mcfg, use_mtp=False), TrainConfig()))
    # the 4 MTP heads keep no logits for backward (recomputed there one head at a time)
    assert plain >= 1 and n_logits_saved(Objective(mcfg, TrainConfig())) == plain


# --------------------------------------------------------------------------------------------
# Collider


def test_collider_keeps_exactly_the_intended_tokens():
    loss = torch.tensor([0.1, 5.0, 0.3, 2.0, 0.2, 0.9, 3.0, 0.4, 0.0, 7.0])
    valid = torch.ones(10, dtype=torch.bool)
    valid[9] = False  # ignored target: never kept even with the highest loss
    # sparsity 0.5: ceil(0.5 * 9) = 5 highest of the valid: 5.0 3.0 2.0 0.9 0.4; threshold huge
    keep = collider_keep(loss, valid, 0.5, 100.0)
    assert keep.nonzero().squeeze(1).tolist() == [1, 3, 5, 6, 7]
    # sparsity 0.8: ceil(0.2 * 9) = 2 -> 5.0, 3.0; plus loss >= 1.5 * mean (mean 11.9/9 = 1.32 -> 1.98): 2.0
    keep = collider_keep(loss, valid, 0.8, 0.5)
    assert keep.nonzero().squeeze(1).tolist() == [1, 3, 6]
    assert collider_keep(loss, valid, 0.0, 100.0).tolist() == valid.tolist()


def test_collider_gradient_equals_masked_loss_gradient():
    torch.manual_seed(0)
    N, D, V = 40, 16, 30
    h = torch.randn(N, D, requires_grad=True)
    w = torch.randn(V, D, requires_grad=True)
    y = torch.randint(0, V, (N,))
    y[3] = -1
    loss, tok_loss, keep = KeptRowsCE.apply(h, w, y, 0.35, 0.3)
    loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref_tok = F.cross_entropy(h @ w.t(), y, ignore_index=-1, reduction="none")
    torch.testing.assert_close(tok_loss, ref_tok.detach())
    expect = collider_keep(ref_tok.detach(), y >= 0, 0.35, 0.3)
    assert torch.equal(keep, expect) and 0.6 <= keep.float().mean() < 0.9
    ref = (ref_tok * keep).sum() / keep.sum()
    ref.backward()
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)
    assert torch.all(gh[~keep] == 0)


def test_collider_objective_logs_plain_ce_and_kept_fraction():
    torch.manual_seed(0)
    mcfg = tiny_cfg(use_mtp=True, mtp_n_tokens=2)
    model = GPT(mcfg)
    x = torch.randint(0, 97, (2, 16))
    y = torch.randint(0, 97, (2, 16))
    obj = Objective(mcfg, TrainConfig(use_collider=True, collider_sparsity=0.35, collider_threshold=10.0))
    loss, stats = model(x, targets=y, objective=obj)
    loss.backward()
    torch.testing.assert_close(stats["ce"], model(x, targets=y).detach())
    assert stats["kept_frac"].item() == pytest.approx(21 / 32)  # ceil(0.65 * 32) = 21
    assert {"mtp_ce_1", "mtp_ce_2"} <= stats.keys()



@pytest.mark.parametrize("compiled", [False, True])
def test_collider_chunked_head_equals_kept_rows_ce_without_full_logits(monkeypatch, compiled):
    """The chunked Collider (CUDA / gradient checkpointing) keeps the same tokens as KeptRowsCE, its
    loss and gradients equal the masked plain CE's (float64), and no matmul in it produces more
    than one chunk of logits."""
    from torch.overrides import TorchFunctionMode

    from nanochat_ternary.model import linear_ce
    from nanochat_ternary.train.objective import collider_chunked_ce

    monkeypatch.setattr(linear_ce, "CPU_CHUNK_ROWS", 7)  # several chunks, a ragged last one
    body_rows = []  # the chunk body stays eager; "compiled" pads the kept rows to whole chunks for it
    monkeypatch.setattr(linear_ce, "_logit_grads_fn",
                        lambda c: lambda z, y, v: body_rows.append(z.shape[0]) or linear_ce.logit_grads(z, y, v))
    torch.manual_seed(0)
    N, D, V = 40, 16, 30
    h = torch.randn(N, D, requires_grad=True)
    w = torch.randn(V, D, requires_grad=True)
    y = torch.randint(0, V, (N,))
    y[[3, 17]] = -1
    # the reference: the masked plain CE of test_collider_gradient_equals_masked_loss_gradient,
    # re-computed in float64 from the same fp32 values
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref_tok = F.cross_entropy(h64 @ w64.t(), y, ignore_index=-1, reduction="none")
    ref_keep = collider_keep(ref_tok.detach(), y >= 0, 0.35, 0.3)
    ref_loss = (ref_tok * ref_keep).sum() / ref_keep.sum()
    ref_loss.backward()
    gh, gw = h64.grad.float(), w64.grad.float()
    assert torch.equal(KeptRowsCE.apply(h, w, y, 0.35, 0.3)[2], ref_keep)

    widest = []

    class LogitShapes(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (F.linear, torch.Tensor.__matmul__, torch.matmul, torch.mm, torch.addmm) \
                    and isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[1] == V:
                widest.append(out.shape[0])
            return out

    with LogitShapes():
        loss, tok, keep = collider_chunked_ce(h, w, y, 0.35, 0.3, compiled)
        loss.backward()
    assert widest and max(widest) <= 7  # chunks of logits only, never [N, V]
    n_kept = int(keep.sum())
    if compiled:  # two row counts only, whatever K is: whole chunks, and N's ragged last one
        assert set(body_rows) <= {7, N % 7} and sum(body_rows) == min(-(-n_kept // 7) * 7, N)
    else:
        assert sum(body_rows) == n_kept and body_rows[-1] == n_kept % 7
    assert torch.equal(keep, ref_keep) and 0.6 <= keep.float().mean() < 0.9
    # fp32 against float64: sums of ~V * D = 480 products of O(1) values, logits O(5): a few
    # hundred fp32 ulps at most
    torch.testing.assert_close(tok, ref_tok.detach().float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss.detach().float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, gw, rtol=1e-5, atol=1e-6)
    assert torch.all(h.grad[~keep] == 0)


def test_collider_objective_takes_the_chunked_path_with_chunked_head(monkeypatch):
    from nanochat_ternary.train import objective as obj_mod

    calls = []
    real = obj_mod.collider_chunked_ce
    monkeypatch.setattr(obj_mod, "collider_chunked_ce", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    mcfg = tiny_cfg()
    model = GPT(mcfg)
    x = torch.randint(0, 97, (2, 16))
    y = torch.randint(0, 97, (2, 16))
    tcfg = TrainConfig(use_collider=True, collider_sparsity=0.35, collider_threshold=10.0)
    out = {}
    for chunked in (False, True):
        model.zero_grad(set_to_none=True)
        loss, stats = model(x, targets=y, objective=Objective(mcfg, tcfg, chunked_head=chunked))
        loss.backward()
        out[chunked] = loss.detach(), stats, _grads(model)
    assert calls == [1]
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-6)
    assert out[True][1]["kept_frac"].item() == out[False][1]["kept_frac"].item() == pytest.approx(21 / 32)
    for k, g in out[True][2].items():
        torch.testing.assert_close(g, out[False][2][k], rtol=1e-4, atol=1e-6, msg=k)

# --------------------------------------------------------------------------------------------
# every toggle combination x every optimizer variant

import itertools  # noqa: E402

OPTIMIZERS = {
    "muon": [],
    "8bit": ["--set", "use_8bit_optim=true", "--set", "quant_block_size=32"],
    "galore": ["--set", "use_galore=true", "--set", "galore_min_dim=16", "--set", "galore_rank=8",
               "--set", "galore_update_freq=2"],
    # dim 64, rank 32: the projected FFN momenta ([128, 32] = 4096 values) reach the int8 size floor,
    # so the 8-bit half of this variant is visible too (at dim 32 every projected momentum is smaller)
    "both": ["--set", "use_8bit_optim=true", "--set", "quant_block_size=32", "--set", "use_galore=true",
             "--set", "galore_min_dim=16", "--set", "galore_rank=32", "--set", "galore_update_freq=2",
             "--set", "dim=64"],
}
TOGGLES = ("use_mtp", "use_collider", "use_async_loader", "gradient_checkpointing")
MIN_QUANT_NUMEL = 4096  # optim/quantized.py: smaller momenta stay fp32 (documented default)


def _expected_muon_state(shape: torch.Size, t) -> tuple[bool, tuple[int, int], tuple[int, int] | None]:
    """(int8 momentum?, momentum shape, projector shape or None) for a matrix, from the documented
    rules: GaLore projects when min(m, n) >= galore_min_dim and rank < min(m, n), the momentum then
    living in the projected [r, n] (m <= n) or [m, r] shape; 8-bit quantizes momenta of at least
    MIN_QUANT_NUMEL values."""
    m, n = shape
    proj = t.use_galore and min(m, n) >= t.galore_min_dim and t.galore_rank < min(m, n)
    mom = ((t.galore_rank, n) if m <= n else (m, t.galore_rank)) if proj else (m, n)
    quant = t.use_8bit_optim and mom[0] * mom[1] >= MIN_QUANT_NUMEL
    return quant, mom, ((m if m <= n else n, t.galore_rank) if proj else None)


def _assert_optimizer_variant(trainer) -> None:
    """The Muon state really is the variant the config asked for: int8 codes in blocks of
    quant_block_size where quantized, fp32 elsewhere; projectors of the right shape and dtype."""
    t = trainer.cfg.training
    muon = trainer.optimizers[0]
    n_quant = n_proj = 0
    for group in muon.param_groups:
        for p in group["params"]:
            st = muon.state[p]
            quant, mom, proj = _expected_muon_state(p.shape, t)
            if quant:
                assert st["momentum_codes"].dtype == torch.int8 and "momentum_buffer" not in st
                assert st["momentum_codes"].shape[1] == t.quant_block_size
                assert st["momentum_codes"].numel() >= mom[0] * mom[1]
                n_quant += 1
            else:
                assert st["momentum_buffer"].dtype == torch.float32 and tuple(st["momentum_buffer"].shape) == mom
                assert "momentum_codes" not in st
            if proj is not None:
                assert tuple(st["projector"].shape) == proj
                assert st["projector"].dtype == getattr(torch, t.galore_proj_dtype)
                n_proj += 1
            else:
                assert "projector" not in st
    assert (n_quant > 0) == t.use_8bit_optim and (n_proj > 0) == t.use_galore  # each flag visibly acts


@pytest.mark.parametrize("optim", list(OPTIMIZERS))
@pytest.mark.parametrize("combo", list(itertools.product([False, True], repeat=4)),
                         ids=lambda c: "".join("MCAG"[i] if on else "-" for i, on in enumerate(c)))
def test_every_toggle_combination_trains_with_every_optimizer(tmp_path, isolated_cache, combo, optim, observe_training):
    obs = observe_training
    args = [a for key, on in zip(TOGGLES, combo) for a in ("--set", f"{key}={str(on).lower()}")]
    recs = _train(tmp_path, "run", "--total-steps", "3", "--set", "mtp_n_tokens=2", "--set", "num_workers=1",
                  "--set", "dim=32", *args, *OPTIMIZERS[optim])
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"])
        assert ("mtp_ce_2" in r) == combo[0] and ("kept_frac" in r) == combo[1]
        if combo[1]:
            assert 0.6 <= r["kept_frac"] <= 1.0
    # each toggle observed doing its work, not only accepted
    (trainer,) = obs.trainers
    assert (trainer.model.mtp is not None and len(trainer.model.mtp.heads) == 2) == combo[0]
    assert type(obs.sources[0]) is (AsyncBatches if combo[2] else SyncBatches)
    assert obs.live_workers[0] == (1 if combo[2] else 0)
    assert obs.checkpointed_blocks == (3 * 2 if combo[3] else 0)  # 3 steps x 2 blocks
    _assert_optimizer_variant(trainer)


def test_torchrun_two_ranks_with_all_features(tmp_path, isolated_cache):
    """DDP sees every parameter it uses: MTP heads and Collider run inside the wrapped forward."""
    import os
    import subprocess
    import sys

    log = tmp_path / "ddp.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "nanochat_ternary.cli", "train", *SMALL, "--total-steps", "3", "--threads", "1",
         "--set", "dim=32", "--set", "use_mtp=true", "--set", "mtp_n_tokens=2", "--set", "use_collider=true",
         "--set", "gradient_checkpointing=true", "--set", "use_async_loader=true", "--set", "num_workers=1",
         "--checkpoint-dir", str(tmp_path / "ddp"), "--log-file", str(log)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and "mtp_ce_2" in r and "kept_frac" in r for r in recs)


@pytest.mark.parametrize("threshold", [0.05, 0.3, 5.0])
def test_collider_threshold_reaches_the_objective(threshold):
    """The Objective keeps exactly the tokens a float64 re-computation of the rule keeps for *its*
    threshold: the top ceil((1-s) n) losses plus every loss >= (1 + threshold) * mean. At sparsity 0.9 the
    safety net decides most of the kept set, so an objective that ignored ``collider_threshold`` (e.g.
    always 0.3) keeps another fraction for 0.05 and 5.0."""
    torch.manual_seed(0)
    mcfg = ModelConfig(dim=64, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=97, max_seq_len=32, group_size=32)
    model = GPT(mcfg)
    with torch.no_grad():
        model.tok_emb.weight.mul_(30)  # sharp logits: token losses spread from ~0 to ~20, so the net binds
    tcfg = TrainConfig(use_collider=True, collider_sparsity=0.9, collider_threshold=threshold)
    x, y = torch.randint(0, 97, (2, 32)), torch.randint(0, 97, (2, 32))
    h = model.hidden_states(x)
    _, stats = Objective(mcfg, tcfg, chunked_head=False)(model, h, y)
    with torch.no_grad():
        tok = F.cross_entropy(model.logits(h).double().view(-1, 97), y.view(-1), reduction="none")
    n = tok.numel()
    k = math.ceil(0.1 * n)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.topk(tok, k).indices] = True
    keep |= tok >= (1 + threshold) * tok.mean()
    assert float(stats["kept_frac"]) == pytest.approx(float(keep.sum()) / n, abs=1.5 / n)  # a tie at the edge
    assert int(keep.sum()) > k + 2 or threshold > 0.1  # at 0.05 the safety net adds tokens beyond the top-k
