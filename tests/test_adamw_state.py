"""AdamW's state formats (issue #13): FOAM's folded moments (optim/foam.py) against torch's AdamW and
an independent float64 reading of the update, its measured state, checkpoints, config and a Trainer run."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import train_small
from helpers.optim import round_trip, run_steps

from nanochat_ternary.config import ConfigError, build_config
from nanochat_ternary.model.gpt import GPT
from nanochat_ternary.optim import AdamW8bit, optimizer_state_bytes
from nanochat_ternary.optim import foam as foam_mod
from nanochat_ternary.optim.factory import build_optimizers, measure_optimizer_state, split_params
from nanochat_ternary.optim.foam import AdamWFoam

pytestmark = pytest.mark.usefixtures("one_thread")

# shapes that exercise the fold: divisible rows, a last dim of 37 (blocks of 8 leave a last block of
# 5 real values), a 1-D gain, a 0-d scalar
SHAPES = [(16, 64), (6, 37), (37,), ()]
TINY_SETS = ["dim=64", "n_layers=2", "n_heads=2", "n_kv_heads=1", "vocab_size=97", "max_seq_len=32", "seq_len=32"]
HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)


def _stream(steps: int, seed: int = 0) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Starting values and ``steps`` gradients per shape; the gradients have a per-row scale and a
    shared component, so neighbouring values are correlated as in a real gradient row."""
    g = torch.Generator().manual_seed(seed)
    starts = [torch.randn(s, generator=g) for s in SHAPES]
    grads = []
    for _ in range(steps):
        grads.append([(torch.randn(s, generator=g) + 0.5) * (1 + torch.rand(s[:-1] + (1,) if s else (), generator=g))
                      for s in SHAPES])
    return starts, grads


def _run(opt_fn, starts, grads, dtype=torch.float32) -> list[torch.Tensor]:
    ps = [torch.nn.Parameter(s.clone().to(dtype)) for s in starts]
    run_steps(opt_fn(ps), ps, grads, dtype)
    return [p.detach() for p in ps]


# --------------------------------------------------------------------------------------------
# the update


def test_foam_level_0_is_torch_adamw():
    """Blocks of one value: R = 0 and the folded moments are AdamW's. The two compute the same
    formula in a different order (sqrt(v / bc2) against sqrt(v) / sqrt(bc2)), so they agree to
    fp32 rounding: a few ulp of the O(1) weights (ulp(1) = 1.2e-7) over 8 steps, far below one
    step's movement (lr = 1e-2); any change of the formula (bias correction, eps, decay) moves a
    weight by O(lr)."""
    starts, grads = _stream(8)
    ref = _run(lambda ps: torch.optim.AdamW(ps, **HP, weight_decay=0.1), starts, grads)
    got = _run(lambda ps: AdamWFoam(ps, **HP, weight_decay=0.1, fold_level=0), starts, grads)
    for a, b, s in zip(ref, got, starts):
        assert (a - s).abs().max() > 1e-3  # it moved
        assert (a - b).abs().max() <= 1e-6, float((a - b).abs().max())


def _reference_foam(starts, grads, level: int, v_fold: str, lr: float, b1: float, b2: float, eps: float,
                    wd: float) -> list[torch.Tensor]:
    """The update written out in float64, block by block (module docstring of optim/foam.py)."""
    bsz = 2 ** level
    out = []
    for k, start in enumerate(starts):
        p = start.double().reshape(-1, start.shape[-1] if start.ndim else 1).clone()
        n = p.shape[1]
        blocks = [(j, min(n, j + bsz)) for j in range(0, n, bsz)]
        m_f = torch.zeros(p.shape[0], len(blocks), dtype=torch.float64)
        v_f = torch.zeros_like(m_f)
        for t, gs in enumerate(grads, start=1):
            g = gs[k].double().reshape(p.shape)
            m_full, v_full = torch.empty_like(p), torch.empty_like(p)
            for b, (lo, hi) in enumerate(blocks):
                vals = g[:, lo:hi]  # the block's real values only
                mean = vals.sum(1) / (hi - lo)
                v_in = mean ** 2 if v_fold == "square_of_mean" else (vals ** 2).sum(1) / (hi - lo)
                m_f[:, b] = b1 * m_f[:, b] + (1 - b1) * mean
                v_f[:, b] = b2 * v_f[:, b] + (1 - b2) * v_in
                resid = vals - mean[:, None]
                m_full[:, lo:hi] = m_f[:, b, None] / (1 - b1 ** t) + resid
                v_full[:, lo:hi] = v_f[:, b, None] / (1 - b2 ** t) + resid ** 2
            p = p * (1 - lr * wd) - lr * m_full / (v_full.sqrt() + eps)
        out.append(p.reshape(start.shape))
    return out


@pytest.mark.parametrize("level,v_fold", [(1, "square_of_mean"), (3, "square_of_mean"), (3, "mean_of_squares"),
                                          (6, "square_of_mean")])
def test_foam_equals_a_float64_reference(level, v_fold):
    """fp32 against float64: the moments and the update carry ~1e-7 relative rounding per op, and
    each step moves a weight by at most ~lr (the ratio m / sqrt(v) is O(1)), so 8 steps agree to
    a few 1e-6; a wrong rule (mean over padding, correction of R, another v) moves them by O(lr)."""
    starts, grads = _stream(8, seed=1)
    ref = _reference_foam(starts, grads, level, v_fold, lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, wd=0.1)
    got = _run(lambda ps: AdamWFoam(ps, **HP, weight_decay=0.1, fold_level=level, v_fold=v_fold), starts, grads)
    for a, b in zip(ref, got):
        assert (a - b.double()).abs().max() <= 5e-6, float((a - b.double()).abs().max())
    # and level > 0 is not AdamW: the fold is doing something
    adamw = _run(lambda ps: torch.optim.AdamW(ps, **HP, weight_decay=0.1), starts, grads)
    assert (adamw[0] - got[0]).abs().max() > 1e-3


def test_foam_in_slices_of_rows_equals_whole_tensor_step(monkeypatch):
    starts, grads = _stream(4, seed=2)
    whole = _run(lambda ps: AdamWFoam(ps, **HP, fold_level=3), starts, grads)
    monkeypatch.setattr(foam_mod, "CHUNK_ELEMENTS", 100)  # slices of one or two rows
    sliced = _run(lambda ps: AdamWFoam(ps, **HP, fold_level=3), starts, grads)
    for a, b in zip(whole, sliced):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# memory: measured from the state's tensors


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_foam_state_shrinks_by_2_to_the_level(level):
    shapes = [(64, 256), (256,)]  # divisible: exactly 1 / 2^level of the values
    n = sum(math.prod(s) for s in shapes)

    def measured(make) -> int:
        ps = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        opt = make(ps)
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
        return optimizer_state_bytes(opt)

    fp32 = measured(lambda ps: torch.optim.AdamW(ps))
    level0 = measured(lambda ps: AdamWFoam(ps, fold_level=0))
    folded = measured(lambda ps: AdamWFoam(ps, fold_level=level))
    assert level0 == 8 * n  # two fp32 moments; the step is a Python int
    assert fp32 == 8 * n + 4 * len(shapes)  # torch keeps a float32 step tensor per parameter
    assert folded * 2 ** level == level0


def test_measured_adamw_state_of_a_model_shrinks_with_foam():
    model = GPT(build_config("tiny-cpu", None, None, TINY_SETS).model)
    _, adamw = split_params(model)
    reps = {}
    for state in ("fp32", "8bit", "foam"):
        t = build_config("tiny-cpu", None, None, TINY_SETS + [f"adamw_state={state}", "foam_fold_level=3"]).training
        reps[state] = measure_optimizer_state(model, t, baseline=False)["adamw_state_bytes"]
    n = sum(p.numel() for p in adamw)
    # every AdamW tensor of this model has a last dim of 64 (divisible by 8) or is 0-d/1-element
    expected = sum(8 * math.prod(foam_mod.folded_shape(p.shape, 3)) for p in adamw)
    assert reps["foam"] == expected and reps["foam"] <= 8 * n / 8 + 8 * len(adamw)
    assert reps["foam"] < reps["8bit"] < reps["fp32"]


# --------------------------------------------------------------------------------------------
# checkpoints


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_foam_checkpoint_round_trip_continues_bit_identically(dtype):
    """A bf16 parameter is written back with stochastic rounding from a stream keyed by the step:
    the resumed run draws the same numbers only if the step comes back, and its moments must stay
    fp32 (the base class would cast them to the parameter's bf16)."""
    starts, grads = _stream(6, seed=3)
    straight = _run(lambda ps: AdamWFoam(ps, **HP, weight_decay=0.1, fold_level=3, seed=7), starts, grads, dtype)

    ps = [torch.nn.Parameter(s.clone().to(dtype)) for s in starts]
    opt = AdamWFoam(ps, **HP, weight_decay=0.1, fold_level=3, seed=7)
    run_steps(opt, ps, grads[:3], dtype)
    saved = round_trip(opt.state_dict())
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = AdamWFoam(ps2, **HP, weight_decay=0.1, fold_level=3, seed=7)
    opt2.load_state_dict(saved)
    for p in ps2:
        st = opt2.state[p]
        assert st["step"] == 3 and st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32
    run_steps(opt2, ps2, grads[3:], dtype)
    for a, b in zip(straight, ps2):
        assert a.dtype == b.dtype == dtype and torch.equal(a, b)


def test_foam_refuses_a_state_of_another_fold_level_or_optimizer():
    starts, grads = _stream(1)
    ps = [torch.nn.Parameter(s.clone()) for s in starts]
    opt = AdamWFoam(ps, fold_level=3)
    for p, gr in zip(ps, grads[0]):
        p.grad = gr
    opt.step()
    with pytest.raises(ValueError, match="fold_level"):
        AdamWFoam(ps, fold_level=2).load_state_dict(round_trip(opt.state_dict()))
    adamw = torch.optim.AdamW(ps)
    adamw.step()
    with pytest.raises(ValueError, match="fold_level"):
        AdamWFoam(ps, fold_level=3).load_state_dict(round_trip(adamw.state_dict()))


# --------------------------------------------------------------------------------------------
# config and factory



@pytest.mark.parametrize("sets,cls", [
    ([], torch.optim.AdamW),
    (["adamw_state=8bit"], AdamW8bit),
    (["use_8bit_adamw=true"], AdamW8bit),
    (["adamw_state=8bit", "stochastic_rounding=true"], AdamW8bit),
    (["adamw_state=foam"], AdamWFoam),
    (["adamw_state=foam", "foam_fold_level=5"], AdamWFoam),
])
def test_factory_builds_the_adamw_state_asked_for(sets, cls):
    cfg = build_config("tiny-cpu", None, None, TINY_SETS + sets)
    opts = build_optimizers(GPT(cfg.model), cfg.training, torch.device("cpu"))
    adamw = opts[-1]
    assert type(adamw) is cls
    if cls is AdamWFoam:
        assert all(g["fold_level"] == cfg.training.foam_fold_level for g in adamw.param_groups)
        assert all(g["weight_decay"] == 0.0 and g["lr"] == cfg.training.adam_lr for g in adamw.param_groups)
    if "stochastic_rounding=true" in sets:
        assert all(g["stochastic_rounding"] for g in adamw.param_groups)


@pytest.mark.parametrize("sets,match", [
    (["adamw_state=int8"], "adamw_state"),
    (["adamw_state=foam", "foam_fold_level=11"], "foam_fold_level"),
    (["foam_fold_level=-1"], "foam_fold_level"),
    (["adamw_state=foam", "use_8bit_adamw=true"], "use_8bit_adamw"),
])
def test_bad_adamw_state_configs_fail_with_one_line(sets, match):
    with pytest.raises(ConfigError, match=match) as e:
        build_config("tiny-cpu", None, None, TINY_SETS + sets)
    assert "\n" not in str(e.value)


def test_stochastic_rounding_needs_an_int8_state_not_foam():
    cfg = build_config("tiny-cpu", None, None, TINY_SETS + ["adamw_state=foam", "stochastic_rounding=true"])
    with pytest.raises(ConfigError, match="stochastic_rounding") as e:
        build_optimizers(GPT(cfg.model), cfg.training, torch.device("cpu"))
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------
# end to end: the Trainer trains with FOAM and resumes exactly


def test_trainer_trains_and_resumes_with_foam(tmp_path, isolated_cache, observe_training):
    foam = ["--set", "adamw_state=foam", "--set", "foam_fold_level=2"]
    straight = train_small(tmp_path, "straight", "--total-steps", "6", *foam)
    train_small(tmp_path, "part", "--total-steps", "3", *foam)
    rest = train_small(tmp_path, "part", "--total-steps", "6", "--resume", str(tmp_path / "part"), *foam)[3:]
    assert [r["step"] for r in rest] == [4, 5, 6]
    assert straight[-1]["loss"] < straight[0]["loss"]
    a, _, b = observe_training.trainers
    opt = a.optimizers[-1]
    assert type(opt) is AdamWFoam and type(b.optimizers[-1]) is AdamWFoam
    for p in (q for g in opt.param_groups for q in g["params"]):
        assert opt.state[p]["exp_avg"].shape == foam_mod.folded_shape(p.shape, 2)
        assert opt.state[p]["step"] == 6
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n
    for r in rest:
        assert r["loss"] == straight[r["step"] - 1]["loss"]


def test_optimizers_share_one_base_with_a_built_once_index():
    """Muon (and its 8-bit / GaLore variants), AdamW8bit and AdamWFoam share optim/base.py: the
    parameter index is a dict built when the groups are (no scan per parameter per step), and it
    follows add_param_group."""
    from nanochat_ternary.optim import Muon
    from nanochat_ternary.optim.adamw_lowmem import AdamW8bit
    from nanochat_ternary.optim.base import StatefulOptimizer
    from nanochat_ternary.optim.foam import AdamWFoam

    ps = [torch.nn.Parameter(torch.zeros(8, 8)) for _ in range(3)]
    for cls in (Muon, AdamW8bit, AdamWFoam):
        opt = cls(ps[:2], lr=0.1)
        assert isinstance(opt, StatefulOptimizer)
        assert [opt._param_index(p) for p in ps[:2]] == [0, 1]
        opt.add_param_group({"params": [ps[2]]})
        assert opt._param_index(ps[2]) == 2
        with pytest.raises(KeyError):
            opt._param_index(torch.nn.Parameter(torch.zeros(1)))
