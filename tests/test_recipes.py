"""Recipes that close the ternary gap (docs/recipes.md): the BitNet two-stage schedule, continual
QAT (float first, then ternary, optionally ramped), distillation from a teacher checkpoint."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from conftest import train_small, write_corpus

from nanochat_ternary.checkpoint import files as ck
from nanochat_ternary.cli import main
from nanochat_ternary.config import Config, build_config
from nanochat_ternary.errors import ConfigError
from nanochat_ternary.model.bitlinear import BitLinear
from nanochat_ternary.train.distill import Distiller, distill_kl
from nanochat_ternary.train.objective import Objective
from nanochat_ternary.train.qat import quant_mix
from nanochat_ternary.train.schedule import schedule_factors, set_weight_decay

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache")


# --------------------------------------------------------------------------------------------
# The BitNet schedule


def bitnet_ref(s: int, total: int, warmup: int, switch: float, r2: float, min_ratio: float) -> tuple[float, float]:
    """The schedule written out: warmup, peak until mid, a drop to r2, linear decay to r2 * min_ratio;
    weight decay off from mid."""
    mid = max(warmup, int(switch * total))
    if s < warmup:
        return (s + 1) / warmup, 1.0
    if s < mid:
        return 1.0, 1.0
    return r2 - r2 * (1 - min_ratio) * (s - mid) / (total - mid), 0.0


@pytest.mark.parametrize("total,warmup,switch,r2,min_ratio", [(100, 10, 0.5, 0.3, 0.0), (37, 0, 0.6, 0.5, 0.1),
                                                              (20, 12, 0.5, 1.0, 0.0)])
def test_bitnet_schedule_matches_its_formula(total, warmup, switch, r2, min_ratio):
    t = build_config(overrides=["lr_schedule=bitnet", f"warmup_steps={warmup}", f"bitnet_switch_frac={switch}",
                                f"bitnet_stage2_ratio={r2}", f"min_lr_ratio={min_ratio}"]).training
    for s in range(total):
        got, want = schedule_factors(s, total, t), bitnet_ref(s, total, warmup, switch, r2, min_ratio)
        assert got[0] == pytest.approx(want[0], abs=1e-12) and got[1] == want[1], (s, got, want)


def test_default_schedule_is_still_wsd():
    t = Config().training
    assert t.lr_schedule == "wsd"
    assert [schedule_factors(s, 100, t) for s in (0, 19, 50, 80, 99)] == [
        (1 / 20, 1.0), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0), (pytest.approx(1 - 19 / 20), 1.0)]


def test_set_weight_decay_keeps_the_initial_value():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, weight_decay=0.1)
    set_weight_decay([opt], 0.0)
    assert opt.param_groups[0]["weight_decay"] == 0.0
    set_weight_decay([opt], 1.0)
    assert opt.param_groups[0]["weight_decay"] == 0.1


def test_bitnet_schedule_drives_the_trainer(tmp_path):
    """The logged lr follows the formula, and the Muon group's weight decay is off in stage 2."""
    recs = train_small(tmp_path, "b", "--total-steps", "10", "--set", "lr_schedule=bitnet", "--set", "warmup_steps=2",
                       "--set", "weight_decay=0.1", "--set", "lr=0.01")
    for r in recs:
        assert r["lr"] == pytest.approx(0.01 * bitnet_ref(r["step"] - 1, 10, 2, 0.5, 0.3, 0.0)[0], rel=1e-12)
    groups = ck.load_trainer_state(ck.resolve_checkpoint(tmp_path / "b"))["optimizers"][0]["param_groups"]
    assert [(g["weight_decay"], g["initial_weight_decay"]) for g in groups] == [(0.0, 0.1)] * len(groups)


# --------------------------------------------------------------------------------------------
# Continual QAT


def q8_ref(x: torch.Tensor) -> torch.Tensor:
    a = x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    return (x * 127 / a).round().clamp(-128, 127) * a / 127


def ternary_ref(w: torch.Tensor, gs: int) -> torch.Tensor:
    g = w.reshape(-1, gs)
    s = g.abs().mean(1, keepdim=True).clamp(min=1e-5)
    return ((g / s).round().clamp(-1, 1) * s).reshape(w.shape)


@pytest.mark.parametrize("mix", [0.0, 0.3, 1.0])
def test_bitlinear_quant_mix_against_float64(mix):
    """y = (x + m (q8(x) - x)) @ (w + m (t(w) - w)).T, gradients straight through both quantizers.
    fp32 against float64: the quantizers' rounding could differ only at exact ties (random normals:
    none here), the rest is one 64-term matmul, ~1e-6 relative, so 1e-5."""
    torch.manual_seed(0)
    lin = BitLinear(64, 48, group_size=32)
    lin.quant_mix = mix
    x = torch.randn(5, 64, requires_grad=True)
    y = lin(x)
    g = torch.randn_like(y)
    y.backward(g)
    xd, wd = x.detach().double(), lin.weight.detach().double()
    x_m, w_m = xd + mix * (q8_ref(xd) - xd), wd + mix * (ternary_ref(wd, 32) - wd)
    torch.testing.assert_close(y.detach().double(), x_m @ w_m.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), g.double() @ w_m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.weight.grad.double(), g.double().T @ x_m, rtol=1e-5, atol=1e-5)
    if mix == 0.0:  # the full-precision path itself, bit for bit
        assert torch.equal(y, F.linear(x, lin.weight))


def test_quant_mix_schedule():
    assert [quant_mix(s, 4, 0) for s in range(6)] == [0, 0, 0, 0, 1, 1]
    assert [quant_mix(s, 4, 3) for s in range(8)] == [0, 0, 0, 0, 1 / 3, 2 / 3, 1, 1]


QAT = ["--set", "qat_start=4", "--set", "qat_ramp_steps=2"]


def test_qat_equals_float_before_the_switch_and_differs_after(tmp_path):
    ref = {r["step"]: r["loss"] for r in train_small(tmp_path, "f", "--total-steps", "8", "--set",
                                                       "quantization=none")}
    qat = {r["step"]: r["loss"] for r in train_small(tmp_path, "q", "--total-steps", "8", *QAT)}
    tern = {r["step"]: r["loss"] for r in train_small(tmp_path, "t", "--total-steps", "8")}
    assert [qat[s] for s in (1, 2, 3, 4)] == [ref[s] for s in (1, 2, 3, 4)]  # steps 0..3: float, bit for bit
    assert all(qat[s] != ref[s] for s in (5, 6, 7, 8))  # from step 4 the quantizer is in
    assert tern[1] != ref[1]


def test_qat_resume_across_the_switch_is_exact(tmp_path):
    straight = {r["step"]: r["loss"] for r in train_small(tmp_path, "a", "--total-steps", "8",
                                                            "--checkpoint-interval", "3", *QAT)}
    resumed = {r["step"]: r["loss"] for r in train_small(tmp_path, "b", "--total-steps", "8", "--resume",
                                                           str(tmp_path / "a" / "step_000003"), *QAT)}
    assert sorted(resumed) == [4, 5, 6, 7, 8]
    assert all(resumed[s] == straight[s] for s in resumed)


def test_qat_needs_a_ternary_model():
    with pytest.raises(ConfigError, match="qat_start"):
        build_config(overrides=["qat_start=0.5", "quantization=none"])
    with pytest.raises(ConfigError, match="qat_start"):
        build_config(overrides=["qat_start=2.5"])


# --------------------------------------------------------------------------------------------
# Distillation


def kl_ref(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    """Mean over tokens of sum_v p_t (log p_t - log p_s), float64, written out."""
    s, t = s.double().reshape(-1, s.shape[-1]) / temp, t.double().reshape(-1, t.shape[-1]) / temp
    log_ps = s - torch.logsumexp(s, -1, keepdim=True)
    log_pt = t - torch.logsumexp(t, -1, keepdim=True)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()


@pytest.mark.parametrize("temp", [1.0, 2.5])
def test_distill_kl_against_float64(temp):
    """fp32 log-softmax over 96 logits, then a 96-term sum: ~1e-6 relative; 1e-5 on value and gradient."""
    torch.manual_seed(1)
    s = (3 * torch.randn(2, 7, 96)).requires_grad_()
    t = 3 * torch.randn(2, 7, 96)
    kl = distill_kl(s, t, temp)
    kl.backward()
    sd = s.detach().double().requires_grad_()
    want = kl_ref(sd, t, temp)
    want.backward()
    torch.testing.assert_close(kl.double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s.grad.double(), sd.grad, rtol=1e-5, atol=1e-8)
    assert distill_kl(t, t, temp).abs() < 1e-6


@pytest.fixture()
def teacher(tmp_path):
    train_small(tmp_path, "teacher", "--total-steps", "6", "--set", "quantization=none")
    return tmp_path / "teacher"


def test_distiller_loss_is_ce_plus_weighted_kl(teacher):
    """The objective in the trainer's order (prepare(x), then the student's forward) against the loss
    written out in float64: CE + w T^2 KL(teacher || student)."""
    meta = ck.read_meta(ck.resolve_checkpoint(teacher))
    cfg = Config.from_dict(meta["config"])
    cfg.model.quantization = "ternary"
    cfg.training.teacher, cfg.training.distill_weight, cfg.training.distill_temperature = str(teacher), 0.7, 2.0
    from nanochat_ternary.model.gpt import GPT
    torch.manual_seed(3)
    student = GPT(cfg.model)
    import contextlib
    d = Distiller(cfg, Objective(cfg.model, cfg.training), torch.device("cpu"), meta["data_fingerprint"],
                  contextlib.nullcontext)
    x = torch.randint(0, cfg.model.vocab_size, (2, 16))
    y = torch.randint(0, cfg.model.vocab_size, (2, 16))
    d.prepare(x)
    loss, stats = student(x, targets=y, objective=d)
    with torch.no_grad():
        s_logits, t_logits = student(x), d.teacher(x)
    ce = F.cross_entropy(s_logits.double().reshape(-1, s_logits.shape[-1]), y.reshape(-1))
    want = ce + 0.7 * 4.0 * kl_ref(s_logits, t_logits, 2.0)
    # fp32 forward of a 2-layer model against the same logits in float64: ~1e-6 relative
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert float(stats["distill_kl"]) > 0 and float(stats["teacher_tok_per_s"]) > 0
    assert not any(p.requires_grad for p in d.teacher.parameters())


def test_distillation_changes_training_and_logs_the_teacher(tmp_path, teacher):
    base = train_small(tmp_path, "plain", "--total-steps", "4")
    dist = train_small(tmp_path, "dist", "--total-steps", "4", "--set", f"teacher={teacher}",
                       "--set", "distill_weight=1.0")
    assert dist[0]["loss"] == base[0]["loss"]  # the logged loss is the plain CE, before any update
    assert all(a["loss"] != b["loss"] for a, b in zip(dist[1:], base[1:]))
    assert all(r["distill_kl"] > 0 and r["teacher_tok_per_s"] > 0 for r in dist)
    off = train_small(tmp_path, "off", "--total-steps", "4", "--set", f"teacher={teacher}", "--set", "distill_weight=0")
    assert [r["loss"] for r in off] == [r["loss"] for r in base]


def test_teacher_of_another_tokenizer_is_one_line_error(tmp_path, teacher, capsys):
    """A teacher trained on synthetic data (its byte-level vocab) for a student on a text corpus."""
    corpus = write_corpus(tmp_path / "corpus")
    rc = main(["train", "--set", "dim=64", "--set", "n_layers=2", "--set", "n_heads=2", "--set", "n_kv_heads=1",
               "--dataset", "text", "--data-path", str(corpus), "--set", "tokenizer_vocab_size=320",
               "--total-steps", "1", "--sample-tokens", "0", "--device", "cpu", "--batch-size", "2",
               "--seq-len", "32", "--checkpoint-dir", str(tmp_path / "x"), "--set", f"teacher={teacher}"])
    err = capsys.readouterr().err
    assert rc == 1 and f"teacher {teacher}" in err and "tokenizer" in err and "Traceback" not in err, err[-500:]
    assert main(["train", "--set", f"teacher={tmp_path / 'nope'}", "--dataset", "synthetic", "--total-steps", "1",
                 "--checkpoint-dir", str(tmp_path / "y")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Hugging Face Llama import


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
def test_hf_import_round_trip_gives_equal_logits(tmp_path, teacher):
    """A float model of ours -> export --format hf -> import: the same weights, our logits bit-equal to
    the original's, and transformers' logits on the same dir equal ours up to summation order
    (fp32, ~1e-6 relative; 1e-4 as in test_export)."""
    from transformers import LlamaForCausalLM

    from nanochat_ternary.checkpoint import open_checkpoint
    from nanochat_ternary.checkpoint.hf_import import import_hf
    from nanochat_ternary.export import export_checkpoint

    export_checkpoint(teacher, "hf", tmp_path / "hf", log=lambda *_: None)
    orig = open_checkpoint(teacher, "cpu").model
    ours, tok = import_hf(tmp_path / "hf", quantization="none")
    assert tok is not None and tok.read_text() == (ck.resolve_checkpoint(teacher) / "tokenizer.json").read_text()
    want = {k: v for k, v in orig.state_dict().items() if not k.startswith("mtp.")}
    got = ours.state_dict()
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    ids = torch.randint(0, orig.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        a, b, c = ours(ids), orig(ids), hf(ids).logits
    assert torch.equal(a, b)
    torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-4)
    tern, _ = import_hf(tmp_path / "hf")  # ternarized: BitLinear on the same shadow weights
    assert tern.cfg.quantization == "ternary"
    assert torch.equal(tern.blocks[0].attn.wq.weight, orig.blocks[0].attn.wq.weight)


def test_hf_import_refuses_what_it_cannot_represent(tmp_path):
    import json as _json

    from nanochat_ternary.checkpoint.hf_import import import_hf
    from nanochat_ternary.errors import CheckpointError

    d = tmp_path / "qwen"
    d.mkdir()
    (d / "config.json").write_text(_json.dumps({"model_type": "qwen2", "hidden_size": 64}))
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="biases"):
        import_hf(d)
    with pytest.raises(CheckpointError, match="not a Hugging Face model dir"):
        import_hf(tmp_path)
