"""The GPU-speed paths, checked on CPU: torch.compile'd training, the chunked linear + CE head,
stacked (batched) Muon, the GPU-utilization monitor, the ``compile`` field. Each is compared with an
independent plain-PyTorch formulation or a float64 re-computation; CUDA runs of the same paths are
in test_gpu.py."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_CPU_RUN, train_small

from nanochat_ternary.cli import main
from nanochat_ternary.config import ConfigError, build_config
from nanochat_ternary.model import linear_ce
from nanochat_ternary.model.linear_ce import ChunkedLinearCE, linear_cross_entropy
from nanochat_ternary.optim.muon import Muon, zeropower_via_newtonschulz5
from nanochat_ternary.train.gpu_monitor import GpuUtilization

SMALL = SMALL_CPU_RUN
_train = train_small


# --------------------------------------------------------------------------------------------
# torch.compile

def _has_cxx() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not _has_cxx(), reason="inductor's CPU backend needs a C++ compiler (none on PATH)")
def test_compiled_training_matches_eager(tmp_path, isolated_cache, observe_training):
    """Four steps with gradient checkpointing, MTP and Collider (the most layered path: compiled
    blocks inside torch.utils.checkpoint, the compiled per-chunk softmax of the chunked head for
    Collider's kept rows and each MTP head) against the same run eager. fp32 on both sides; inductor reorders the
    reductions (RMSNorm, the per-token absmax, the group means) and fuses x * 127 / absmax, so
    values differ by float rounding, and now and then one element lands on the other side of a
    rounding boundary of the int8 / ternary quantizers (one quantization step). Observed: 3e-4
    relative after 15 steps; asserted: 2e-3 per step over 4 steps."""
    import torch._dynamo.utils

    common = ["--total-steps", "4", "--set", "gradient_checkpointing=true", "--set", "use_mtp=true",
              "--set", "mtp_n_tokens=2", "--set", "use_collider=true", "--set", "collider_sparsity=0.3"]
    torch._dynamo.reset()  # forget graphs that earlier tests compiled (the same chunk body, other shapes)
    graphs0 = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    eager = _train(tmp_path, "eager", *common, "--set", "compile=false")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs0
    assert observe_training.trainers[0].model.compiled_blocks is None
    compiled = _train(tmp_path, "compiled", *common, "--set", "compile=true")
    tr = observe_training.trainers[1]
    assert tr.compiled and tr.model.compiled_blocks is not None and tr.objective.compiled
    # the blocks (one graph for both) and the chunk softmax were compiled in this run, once each:
    # Collider's kept rows (a different count every step) are padded to the same whole chunk as
    # the MTP heads' rows (without the padding: 3 graphs in these 4 steps)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs0 + 2
    assert all(0.69 < r["kept_frac"] < 1 for r in compiled)
    assert [r["step"] for r in compiled] == [1, 2, 3, 4]
    for a, b in zip(eager, compiled):
        assert abs(a["loss"] - b["loss"]) <= 2e-3 * abs(a["loss"]), (a["loss"], b["loss"])
        assert abs(a["mtp_ce_1"] - b["mtp_ce_1"]) <= 2e-3 * abs(a["mtp_ce_1"])


def test_compile_failure_is_one_line_naming_the_way_out(tmp_path, isolated_cache, monkeypatch, capsys):
    from nanochat_ternary.model import compile as compile_mod

    def broken_backend(gm, example_inputs):
        raise RuntimeError("simulated codegen failure")

    monkeypatch.setattr(compile_mod, "compile_module",
                        lambda module: torch.compile(module, backend=broken_backend, fullgraph=True))
    rc = main(["train", *SMALL, "--total-steps", "2", "--set", "compile=true",
               "--checkpoint-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 1
    lines = [ln for ln in err.splitlines() if "torch.compile failed" in ln]
    assert len(lines) == 1 and "--set compile=false" in lines[0] and "simulated codegen failure" in lines[0]
    assert "Traceback" not in err


def test_compile_field_values():
    assert build_config("tiny-cpu").training.compile == "auto"
    for given, want in (("true", "true"), ("FALSE", "false"), ("auto", "auto")):
        assert build_config("tiny-cpu", overrides=[f"compile={given}"]).training.compile == want
    with pytest.raises(ConfigError, match="auto, true or false"):
        build_config("tiny-cpu", overrides=["compile=sometimes"])
    from nanochat_ternary.config import Config, apply_mapping

    cfg = Config()
    apply_mapping(cfg, {"training": {"compile": True}}, "test.toml")  # a TOML boolean
    assert cfg.training.compile == "true"
    from nanochat_ternary.model.compile import compile_enabled

    assert compile_enabled("auto", torch.device("cuda")) and not compile_enabled("auto", torch.device("cpu"))
    assert compile_enabled("true", torch.device("cpu")) and not compile_enabled("false", torch.device("cuda"))


# --------------------------------------------------------------------------------------------
# chunked linear + cross-entropy

def _reference_ce(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor):
    """float64 plain head: logits, mean CE over y >= 0, and its gradients."""
    h64 = h.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    loss = F.cross_entropy(h64 @ w64.t(), y, ignore_index=-1)
    loss.backward()
    return loss.detach(), h64.grad, w64.grad


@pytest.mark.parametrize("rows", [7, 64, 1024])
def test_chunked_linear_ce_matches_float64_reference(monkeypatch, rows):
    monkeypatch.setattr(linear_ce, "CPU_CHUNK_ROWS", rows)  # 7: many chunks and a ragged last one
    torch.manual_seed(0)
    n, d, v = 50, 24, 37
    h = torch.randn(n, d, requires_grad=True)
    w = (0.3 * torch.randn(v, d)).requires_grad_(True)
    y = torch.randint(0, v, (n,))
    y[[0, 5, 49]] = -1  # ignored rows: no loss, zero gradient
    loss = linear_cross_entropy(h, w, y)
    (2.5 * loss).backward()  # a non-unit upstream gradient reaches both inputs
    ref, gh, gw = _reference_ce(h, w, y)
    # fp32 sums of ~50 terms of O(1): a few ulps, far below 1e-5
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), 2.5 * gh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), 2.5 * gw, rtol=1e-4, atol=1e-6)
    assert h.grad[[0, 5, 49]].abs().max() == 0


def test_chunked_linear_ce_bf16_autocast_matches_plain_head():
    """Under bf16 autocast (what CUDA runs) the matmuls take bf16 operands like the plain head's;
    logits, log-sum-exp and dW's accumulation stay fp32. Against float64: bf16 operands carry
    ~2^-9 relative error, so agreement is to ~1e-2."""
    torch.manual_seed(1)
    n, d, v = 64, 32, 50
    h = torch.randn(n, d, requires_grad=True)
    w = (0.2 * torch.randn(v, d)).requires_grad_(True)
    y = torch.randint(0, v, (n,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ChunkedLinearCE.apply(h, w, y, 16, False) / n
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    ref, gh, gw = _reference_ce(h, w, y)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(h.grad.double(), gh, rtol=5e-2, atol=2e-3)
    torch.testing.assert_close(w.grad.double(), gw, rtol=5e-2, atol=2e-3)


def test_chunk_rows_bound_the_logits_on_cuda():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    rows = linear_ce.chunk_rows(32768, 50257, cuda)
    assert rows % 256 == 0 and rows * 50257 <= linear_ce.CHUNK_ELEMENTS
    assert linear_ce.chunk_rows(100, 50257, cuda) == 100  # never more rows than there are
    assert linear_ce.chunk_rows(32768, 50257, cpu) == linear_ce.CPU_CHUNK_ROWS


# --------------------------------------------------------------------------------------------
# stacked Muon

def test_batched_newton_schulz_equals_per_matrix():
    torch.manual_seed(0)
    stack = torch.randn(5, 24, 40)
    batched = zeropower_via_newtonschulz5(stack, dtype=torch.float32)
    for i in range(5):
        torch.testing.assert_close(batched[i], zeropower_via_newtonschulz5(stack[i], dtype=torch.float32),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("nesterov", [True, False])
def test_stacked_muon_step_equals_per_matrix(monkeypatch, nesterov):
    """Three steps of stacked Muon (forced on, on CPU) against per-matrix Muon from the same start:
    same momentum, same weights, to fp32 rounding of the batched matmuls. A stack limit of two
    matrices makes one shape run in several stacks."""
    import nanochat_ternary.optim.muon as muon_mod

    monkeypatch.setattr(muon_mod, "STACK_ELEMENTS", 2 * 16 * 24)
    torch.manual_seed(0)
    shapes = [(16, 24)] * 5 + [(24, 16)] * 2 + [(8, 8)]
    a = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a = Muon(a, lr=0.05, nesterov=nesterov, weight_decay=0.1, stacked=True)
    opt_b = Muon(b, lr=0.05, nesterov=nesterov, weight_decay=0.1, stacked=False)
    calls = []
    real = Muon._update_stack
    monkeypatch.setattr(Muon, "_update_stack", lambda self, ps, g: (calls.append(len(ps)), real(self, ps, g)))
    for _ in range(3):
        for pa, pb in zip(a, b):
            g = torch.randn_like(pa)
            pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert calls and max(calls) >= 2  # the stacked path ran, on real stacks
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt_a.state[pa]["momentum_buffer"], opt_b.state[pb]["momentum_buffer"])
    assert Muon(a).stacked is None  # default: decided by the device (CUDA only)


# --------------------------------------------------------------------------------------------
# GPU utilization monitor

def test_gpu_monitor_says_why_it_does_not_measure_on_cpu():
    mon = GpuUtilization(torch.device("cpu"))
    assert not mon.available and mon.unavailable_reason == "not a CUDA device"
    mon.start()
    assert mon.take() is None and mon.overall() is None
    mon.stop()


def test_gpu_monitor_averages_nvml_samples(monkeypatch):
    values = iter([40.0, 60.0, 80.0, 100.0] + [100.0] * 1000)
    monkeypatch.setattr(torch.cuda, "utilization", lambda device=None: next(values))
    mon = GpuUtilization(torch.device("cuda"), period_s=0.001)  # construction reads one value
    assert mon.available
    mon.start()
    import time

    deadline = time.time() + 5
    while mon.overall() is None and time.time() < deadline:
        time.sleep(0.01)
    mon.stop()
    first = mon.overall()
    assert first is not None and 60.0 <= first <= 100.0  # samples after 40 are 60, 80, 100, ...
    assert mon.take() == pytest.approx(first)  # everything since start, once
    assert mon.take() is None


def test_padded_head_rows_get_no_probability():
    """A 16-bit head is padded to a multiple of 64 rows (aligned GEMMs); the padding columns of the
    logits must take no probability, in the eager body and in the compiled one (which masks them
    with -inf instead of writing in place). Reference: float64 softmax over the real columns."""
    torch.manual_seed(2)
    c, vocab, vp = 6, 50, linear_ce.padded_vocab(50, torch.bfloat16)
    assert vp == 64 and linear_ce.padded_vocab(50, torch.float32) == 50
    z = torch.randn(c, vp)
    z[:, vocab:] = 0.0  # what zero rows of the head give
    y = torch.tensor([3, 0, 49, -1, 7, 7])
    valid = y >= 0
    ref_p = torch.softmax(z[:, :vocab].double(), dim=-1)
    ref_loss = -torch.log(ref_p[valid, y[valid]]).sum()
    ref_g = ref_p.clone()
    ref_g[torch.arange(c)[valid], y[valid]] -= 1.0
    ref_g[~valid] = 0.0
    bodies = [linear_ce.logit_grads]
    if _has_cxx():
        bodies.append(torch.compile(linear_ce.logit_grads, dynamic=False, fullgraph=True))
    for body in bodies:
        loss, g = body(z.clone(), y, vocab)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g[:, :vocab].double(), ref_g, rtol=1e-5, atol=1e-6)
        assert g[:, vocab:].abs().max() == 0


@pytest.mark.parametrize("latent", [torch.float32, torch.bfloat16])
def test_bitlinear_under_autocast_matches_plain_formulation(latent):
    """Under bf16 autocast (CUDA's training mode, here on CPU) BitLinear casts its quantized input
    to bf16 itself and keeps that cast for the backward. Reference, written here: the fake-quantized
    operands (weight quantized in fp32 even for a bf16 latent) through a plain bf16 F.linear, and the
    straight-through gradients dL/dx = g @ W_q, dL/dW = gᵀ @ x_q. Both sides round the same bf16
    operands, so they agree exactly."""
    from nanochat_ternary.model.bitlinear import BitLinear, _fake_quant_act, _fake_quant_weight

    torch.manual_seed(3)
    lin = BitLinear(256, 96, group_size=128)
    lin.weight.data = lin.weight.data.to(latent)
    x = torch.randn(3, 10, 256, requires_grad=True)
    saved: list[tuple[torch.dtype, tuple]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lin(x)
    # what the backward keeps of the input: its bf16 cast only, no fp32 copy
    assert (torch.bfloat16, (3, 10, 256)) in saved and (torch.float32, (3, 10, 256)) not in saved
    g = torch.randn_like(y, dtype=torch.float32)
    y.float().backward(g)
    xq = _fake_quant_act(x.detach()).bfloat16()
    wq = _fake_quant_weight(lin.weight.detach().float(), 128).bfloat16()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.float32 and lin.weight.grad.dtype == latent
    assert torch.equal(y, F.linear(xq, wq))
    assert torch.equal(x.grad, (g.bfloat16() @ wq).float())
    ref_gw = (g.bfloat16().reshape(-1, 96).t() @ xq.reshape(-1, 256)).to(latent)
    assert torch.equal(lin.weight.grad, ref_gw)
