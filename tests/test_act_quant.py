"""4-bit activation formats (model/act_quant.py): each quantizer against an independent reference
written here, the a4.8 layer roles, the int8-first switch in the trainer, and the config rules."""

import math
import shutil

import pytest
import torch
from conftest import train_small

from nanochat_ternary.config import ConfigError, ModelConfig, build_config
from nanochat_ternary.config_checks import ACT_QUANT_CHOICES as CONFIG_CHOICES
from nanochat_ternary.model.act_quant import (
    ACT_QUANT_CHOICES,
    e2m1_round,
    fake_quant,
    formats_by_role,
)
from nanochat_ternary.model.bitlinear import BitLinear, quantize_activations
from nanochat_ternary.model.gpt import GPT

E2M1_GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # index parity = mantissa bit


def ref_nearest(values: list[float], grid: list[float]) -> list[float]:
    """Nearest grid magnitude (sign kept); a tie goes to the grid point of even index (even mantissa)."""
    out = []
    for v in values:
        a = min(abs(v), grid[-1])
        best = min(range(len(grid)), key=lambda i: (abs(a - grid[i]), i % 2))
        out.append(math.copysign(grid[best], v))
    return out


def e4m3_grid() -> list[float]:
    """Every finite non-negative float8_e4m3fn value, decoded from its bit patterns (ascending)."""
    vals = torch.arange(128, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return sorted(v for v in vals.tolist() if math.isfinite(v))


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # heavy-tailed inputs: a few outlier channels, as real activations have
    x = torch.randn(*shape, generator=g)
    x[..., :3] *= 8.0
    return x


def test_choices_agree_between_config_and_model():
    assert CONFIG_CHOICES == ACT_QUANT_CHOICES


def test_e2m1_round_is_round_to_nearest_even_on_the_grid():
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -2.5, -5.0]
    randoms = (torch.rand(2000, generator=torch.Generator().manual_seed(1)) * 16 - 8).tolist()
    vals = ties + randoms + [0.0, 6.0, 7.9, -100.0]
    got = e2m1_round(torch.tensor(vals, dtype=torch.float64)).tolist()
    assert got == ref_nearest(vals, E2M1_GRID)


def test_fp4_matches_a_float64_reference_with_e4m3_block_scales():
    bs = 16
    x = rand(5, 64, seed=2).double()
    got = fake_quant(x.float(), "fp4", bs).double()
    e4 = e4m3_grid()
    ref = torch.empty_like(x)
    for r in range(x.shape[0]):
        t = x[r].abs().max().item() / (6 * 448)
        for b in range(0, x.shape[1], bs):
            blk = x[r, b:b + bs]
            # e4m3 round to nearest (ties to even code = even index in the ascending grid)
            want = blk.abs().max().item() / (6 * t)
            i = min(range(len(e4)), key=lambda j: (abs(want - e4[j]), j % 2))
            scale = e4[i] * t
            ref[r, b:b + bs] = torch.tensor(ref_nearest((blk / scale).tolist(), E2M1_GRID), dtype=torch.float64) * scale
    # fp32 vs fp64 of the same formula: only x / S can round differently at an exact tie
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-7)
    # a token's largest block gets block scale 448 (exact in E4M3), so its max |x| maps to 6 exactly
    assert torch.allclose(got.abs().amax(-1), x.abs().amax(-1), rtol=1e-6)


def test_fp4_rejects_a_width_not_divisible_by_the_block():
    with pytest.raises(ValueError, match="multiple of act_block_size"):
        fake_quant(torch.randn(2, 40), "fp4", 16)


def test_int4_absmax_and_absmean_match_float64_references():
    x = rand(7, 96, seed=3).double()
    s = x.abs().amax(-1, keepdim=True) / 7
    ref = torch.clamp(torch.round(x / s), -8, 7) * s
    got = fake_quant(x.float(), "int4").double()
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-7)
    assert ((got / s).round() - got / s).abs().max() < 1e-4  # integers times the token's scale
    s2 = x.abs().mean(-1, keepdim=True) / math.sqrt(7)
    ref2 = torch.clamp(torch.round(x / s2), -8, 7) * s2
    got2 = fake_quant(x.float(), "int4_absmean").double()
    assert torch.allclose(got2, ref2, rtol=1e-6, atol=1e-7)
    assert (got2 / s2).round().min() >= -8 and (got2 / s2).round().max() <= 7
    assert ((got2 / s2).round().abs() == 8).any() or ((got2 / s2).round() == 7).any()  # the clip binds (outliers)


def test_topk_int8_keeps_the_larger_half_then_int8():
    x = rand(6, 50, seed=4)
    got = fake_quant(x, "topk_int8")
    for r in range(x.shape[0]):
        keep = x[r].abs().argsort(descending=True)[:25]
        mask = torch.zeros(50, dtype=torch.bool)
        mask[keep] = True
        s = x[r].abs().max() / 127
        ref = torch.where(mask, torch.round(x[r] / s) * s, torch.zeros(()))
        assert torch.allclose(got[r], ref, rtol=1e-6, atol=1e-7)
        assert int((got[r] != 0).sum()) <= 25


@pytest.mark.parametrize("fmt", ["int4", "int4_absmean", "fp4", "topk_int8"])
def test_every_format_has_a_straight_through_gradient(fmt):
    x = rand(3, 32, seed=5).requires_grad_(True)
    g = torch.randn(3, 32)
    y = quantize_activations(x, fmt, 16)
    assert not torch.equal(y.detach(), x.detach())  # it did quantize
    (y * g).sum().backward()
    assert torch.equal(x.grad, g)


def test_bitlinear_uses_its_act_format():
    lin = BitLinear(32, 16, group_size=16)
    x = rand(4, 32, seed=6)
    y8 = lin(x)
    lin.act_format = "fp4"
    y4 = lin(x)
    w_q = lin.quantized_weight()
    assert torch.allclose(y4, torch.nn.functional.linear(fake_quant(x, "fp4", 16), w_q), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(y4, y8, rtol=1e-3)


def test_a48_roles_and_model_wiring():
    assert formats_by_role("int4") == dict.fromkeys(("attn_in", "attn_out", "ffn_in", "ffn_out"), "int4")
    model = GPT(ModelConfig(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, act_quant="a4.8"))
    for b in model.blocks:
        assert {b.attn.wq.act_format, b.attn.wk.act_format, b.attn.wv.act_format} == {"int4_absmean"}
        assert {b.ffn.w1.act_format, b.ffn.w3.act_format} == {"int4_absmean"}
        assert b.attn.wo.act_format == b.ffn.w2.act_format == "topk_int8"
    ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a48 = model(ids)
        model.set_act_quant("int8")
        assert {lin.act_format for lin in model.modules() if isinstance(lin, BitLinear)} == {"int8"}
        i8 = model(ids)
    assert not torch.allclose(a48, i8, rtol=1e-3)


def test_switch_step_trains_int8_first_then_the_4bit_format(tmp_path):
    """Same seed: the switched run equals the int8 run step for step until the switch, then leaves it;
    the 4-bit-from-the-start run differs from step 1."""
    base = ["--total-steps", "5", "--seed", "3"]
    int8 = train_small(tmp_path, "int8", *base)
    switched = train_small(tmp_path, "switch", *base, "--set", "act_quant=int4", "--set", "act_quant_switch_step=3")
    int4 = train_small(tmp_path, "int4", *base, "--set", "act_quant=int4")
    loss = {name: [r["loss"] for r in recs] for name, recs in
            (("int8", int8), ("switch", switched), ("int4", int4))}
    assert loss["switch"][:3] == loss["int8"][:3]  # steps 1..3 run at int8 (step index 0..2)
    assert loss["switch"][3] != loss["int8"][3]  # step index 3 is the first at int4
    assert loss["int4"][0] != loss["int8"][0]


@pytest.mark.parametrize("overrides, match", [
    (["act_quant=int2"], "act_quant"),
    (["act_quant=a4.8", "quantization=none"], "full precision"),
    (["act_quant=fp4", "act_block_size=48"], "fp4 blocks must divide"),
    (["act_quant_switch_step=5"], "set act_quant to"),
    (["act_quant=int4", "act_quant_switch_step=300", "total_steps=300"], "never switch"),
])
def test_bad_activation_configs_fail_in_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        build_config("tiny-cpu", overrides=overrides)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="inductor's CPU backend needs a C++ compiler (none on PATH)")
@pytest.mark.parametrize("fmt", ["fp4", "a4.8"])
# under ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU the compiled run's losses are non-finite (found
# 2026-12-04, not yet understood: inductor's own codegen does not follow that variable); run natively only
@pytest.mark.native_only
def test_compiled_blocks_run_each_format_and_recompile_at_the_switch(tmp_path, isolated_cache, fmt):
    """fullgraph compile of the blocks with the fp4 cast (float8) and a4.8's kthvalue, switching from
    int8 at step 2, against the same run eager (fp32 both; inductor reorders reductions, so one
    quantization step may flip now and then: the tolerance of test_speed's compile test)."""
    import torch._dynamo.utils

    torch._dynamo.reset()  # no graph of an earlier test (the int8 blocks) to reuse: the count below is this run's
    run = ["--total-steps", "4", "--set", f"act_quant={fmt}", "--set", "act_quant_switch_step=2"]
    eager = train_small(tmp_path, "eager", *run, "--set", "compile=false")
    graphs0 = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = train_small(tmp_path, "compiled", *run, "--set", "compile=true")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= graphs0 + 2  # int8 blocks, then fmt
    for a, b in zip(eager, compiled):
        assert abs(a["loss"] - b["loss"]) <= 2e-3 * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
