"""Warm start (init_from), FIRE and the pkgdocs corpus (issue #13 part 2; docs/roadmap.md section 2)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SMALL_CPU_RUN, write_corpus
from safetensors.torch import load_file

from nanochat_ternary.checkpoint import files as ck
from nanochat_ternary.cli import _cli_overrides, build_parser, main
from nanochat_ternary.config import build_config
from nanochat_ternary.data import datasets, pkgdocs
from nanochat_ternary.model.bitlinear import ternary_quantize_weight
from nanochat_ternary.optim.factory import split_named_params
from nanochat_ternary.train.fire import apply_fire, fire_matrix, fire_scale, polar_newton_schulz
from nanochat_ternary.train.runtime import Runtime
from nanochat_ternary.train.trainer import Trainer

EPS64 = torch.finfo(torch.float64).eps


def _exact_polar(w: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return u @ vh


def _with_condition(m: int, n: int, kappa: float, seed: int) -> torch.Tensor:
    """A random ``[m, n]`` matrix whose singular values are spread log-evenly over [1/kappa, 1]."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -math.log10(kappa), k, dtype=torch.float64)
    return u @ torch.diag(s) @ v.T


# ---------------------------------------------------------------------------------------------
# the maths


@pytest.mark.parametrize("shape,kappa", [((96, 96), 10.0), ((160, 48), 10.0), ((48, 160), 10.0),
                                         ((96, 96), 1e6), ((160, 48), 1e6), ((48, 160), 1e6)])
def test_polar_factor_matches_the_svd(shape, kappa):
    """``U V^T`` to within ``10 (kappa + k) eps`` (``k = min(m, n)``). Two limits, each reached by any
    method, the SVD reference included: the polar factor of a matrix with condition number kappa is
    only defined to about ``kappa eps`` (rounding W by eps moves its smallest singular directions by
    eps / s_min = kappa eps), and an orthogonal matrix is only computed to about ``k eps`` (the
    iteration stops at a Gram residual of ``8 k eps``, the float floor of a sum of k products); 10x is
    margin. Non-square both ways; kappa = 1e6 takes ~40 steps, most in the slow 1.5x phase."""
    w = _with_condition(*shape, kappa, seed=sum(shape))
    res = polar_newton_schulz(w)
    assert res.converged and res.iters > 5
    err = (res.q - _exact_polar(w)).abs().max().item()
    assert err <= 10 * (kappa + min(shape)) * EPS64, err
    # and it is orthogonal: the small Gram is the identity to float precision
    g = res.q @ res.q.T if shape[0] <= shape[1] else res.q.T @ res.q
    assert (g - torch.eye(min(shape), dtype=torch.float64)).abs().max() <= 8 * min(shape) * EPS64


def test_polar_factor_of_a_gaussian_matrix_in_float32():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    res = polar_newton_schulz(w, dtype=torch.float32)
    assert res.converged and res.q.dtype == torch.float32
    assert (res.q.double() - _exact_polar(w)).abs().max() < 1e-4  # fp32, kappa ~ 20 here


def test_a_rank_deficient_matrix_is_reported_not_converged():
    w = _with_condition(32, 48, 10.0, seed=3)
    w[:, :] = w[:1, :].repeat(32, 1)  # rank 1: no orthogonal factor exists, the zero s stay zero
    res = polar_newton_schulz(w, max_iters=60)
    assert not res.converged and res.iters == 60


@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (64, 64)])
def test_fire_scales_by_sqrt_dout_over_din(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    q = fire_matrix(w).q
    want = math.sqrt(shape[0] / shape[1])
    assert fire_scale(shape) == pytest.approx(want, rel=1e-15)
    torch.testing.assert_close(q, want * _exact_polar(w), rtol=0, atol=1e-12)
    sv = torch.linalg.svdvals(q)  # every singular value is the scale
    torch.testing.assert_close(sv, torch.full_like(sv, want), rtol=0, atol=1e-12)


def test_apply_fire_reports_group_scales_and_changed_codes():
    """A scaled orthogonal matrix keeps its ternary codes (rounding is per-group scale-invariant) and
    its scales shrink by the scale; a Gaussian one moves codes. Measured as BitLinear quantizes."""
    q = _exact_polar(torch.randn(64, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    p = torch.nn.Parameter((3.0 * q).float())
    rep = apply_fire([("m", p)], group_size=32)
    assert rep.codes_changed == 0.0 and rep.n_matrices == 1 and not rep.not_converged
    assert rep.scale_after / rep.scale_before == pytest.approx(1 / 3, rel=1e-5)
    assert rep.scale_after == pytest.approx(float(ternary_quantize_weight(p, 32)[1].mean()), rel=1e-6)
    g = torch.nn.Parameter(torch.randn(64, 64, generator=torch.Generator().manual_seed(5)) * 0.02)
    t0 = ternary_quantize_weight(g, 32)[0]
    rep = apply_fire([("g", g)], group_size=32)
    t1 = ternary_quantize_weight(g, 32)[0]
    assert rep.codes_changed == pytest.approx(float((t0 != t1).float().mean()))
    assert 0.05 < rep.codes_changed < 0.95
    assert "codes changed" in rep.line() and "\n" not in rep.line()


# ---------------------------------------------------------------------------------------------
# warm start and FIRE in the trainer


def _trainer(tmp_path, *args: str) -> tuple[Trainer, list[str]]:
    """A Trainer as ``nanochat-train train SMALL_CPU_RUN ARGS`` builds it (not fitted: the caller
    fits or closes it); its echoed lines."""
    ns = build_parser().parse_args(["train", *SMALL_CPU_RUN, *args])
    cfg = build_config(ns.config, ns.config_file, _cli_overrides(ns), ns.set)
    lines: list[str] = []
    return Trainer(cfg, Runtime(torch.device("cpu")), echo=lines.append), lines


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ckpt_weights(ckpt) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def _assert_weights(model: torch.nn.Module, want: dict[str, torch.Tensor]) -> None:
    have = model.state_dict()
    for k, v in want.items():
        assert torch.equal(have[k], v), k


@pytest.fixture()
def run_a(tmp_path, isolated_cache, one_thread):
    """Corpus-A checkpoint: 4 steps of the small run."""
    assert main(["train", *SMALL_CPU_RUN, "--total-steps", "4", "--checkpoint-dir", str(tmp_path / "A")]) == 0
    return ck.resolve_checkpoint(tmp_path / "A")


def test_init_from_loads_the_weights_with_a_fresh_optimizer_at_step_0(tmp_path, run_a):
    tr, lines = _trainer(tmp_path, "--init-from", str(tmp_path / "A"), "--total-steps", "3",
                         "--checkpoint-dir", str(tmp_path / "B"), "--set", "warmup_steps=2")
    _assert_weights(tr.model, _ckpt_weights(run_a))
    assert tr.start_step == 0 and tr.tokens_seen == 0
    assert all(len(opt.state) == 0 for opt in tr.optimizers)  # A's trainer.pt holds momenta: not loaded
    assert tr.data.tokenizer_path is not None
    assert datasets.tokenizer_digest(tr.data.tokenizer_path) == datasets.tokenizer_digest(run_a / "tokenizer.json")
    assert any(line.startswith(f"warm start from {run_a}") for line in lines)
    res = tr.fit()
    assert min(res.losses) == 1 and res.step == 3  # steps 1..3 of a new run
    meta = ck.read_meta(res.final_checkpoint)
    assert meta["step"] == 3 and meta["tokens_seen"] == 3 * 4 * 32  # counted from 0
    assert meta["warm_start"]["from"] == str(run_a) and meta["warm_start"]["step"] == 4
    assert meta["config"]["training"]["init_from"] == "" and "fire" not in meta


def test_fire_is_applied_once_on_init_from_and_not_again_on_resume(tmp_path, run_a):
    muon_names = [n for n, _ in split_named_params(_trainer(tmp_path, "--checkpoint-dir",
                                                            str(tmp_path / "probe"))[0].model)[0]]
    want = _ckpt_weights(run_a)
    for n in muon_names:
        want[n] = fire_matrix(want[n]).q.float()
    tr, lines = _trainer(tmp_path, "--init-from", str(run_a), "--total-steps", "2", "--set", "fire=true",
                         "--checkpoint-dir", str(tmp_path / "B"))
    _assert_weights(tr.model, want)  # the block matrices FIRE'd, embedding / norms as loaded
    assert muon_names and all(n.startswith("blocks.") for n in muon_names)
    assert sum(line.startswith("fire: ") for line in lines) == 1
    b = tr.fit().final_checkpoint
    assert ck.read_meta(b)["fire"]["via"] == "init_from" and ck.read_meta(b)["fire"]["step"] == 0
    # resuming the FIRE'd run, even asking for fire again, loads its weights as they are
    tr, lines = _trainer(tmp_path, "--resume", str(tmp_path / "B"), "--total-steps", "3", "--set", "fire=true")
    _assert_weights(tr.model, _ckpt_weights(b))
    assert any("already applied at step 0" in line for line in lines)
    c = tr.fit().final_checkpoint
    assert ck.read_meta(c)["fire"]["via"] == "init_from"  # the record is carried on


def test_fire_on_resume_resets_muon_momentum_once(tmp_path, run_a):
    tr, lines = _trainer(tmp_path, "--resume", str(run_a), "--total-steps", "6", "--set", "fire=true")
    muon, _ = split_named_params(tr.model)
    for n, p in muon:
        torch.testing.assert_close(p.detach(), fire_matrix(_ckpt_weights(run_a)[n]).q.float(), rtol=0, atol=0)
    muon_opt = next(o for o in tr.optimizers if any(p is muon[0][1] for g in o.param_groups for p in g["params"]))
    assert all("momentum_buffer" not in muon_opt.state.get(p, {}) for _, p in muon)
    assert any(len(o.state) > 0 for o in tr.optimizers if o is not muon_opt)  # AdamW's moments stay
    assert tr.start_step == 4
    d = tr.fit().final_checkpoint
    fire = ck.read_meta(d)["fire"]
    assert fire["via"] == "resume" and fire["step"] == 4 and fire["n_matrices"] == len(muon)
    tr, lines = _trainer(tmp_path, "--resume", str(tmp_path / "A"), "--total-steps", "7", "--set", "fire=true")
    _assert_weights(tr.model, _ckpt_weights(d))
    tr.close()


# ---------------------------------------------------------------------------------------------
# one-line errors


def _one_line_error(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(["train", *SMALL_CPU_RUN, *argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_bad_combinations_are_one_line_errors(tmp_path, run_a, capsys):
    assert "fire = True is not valid" in _one_line_error(capsys, "--set", "fire=true")
    err = _one_line_error(capsys, "--init-from", str(run_a), "--resume", str(run_a))
    assert "init_from" in err and "resume" in err
    err = _one_line_error(capsys, "--init-from", str(run_a), "--set", "dim=32", "--checkpoint-dir", str(tmp_path / "x"))
    assert "does not match the config: dim=64 (config 32)" in err
    err = _one_line_error(capsys, "--init-from", str(tmp_path / "nope"))
    assert "checkpoint not found" in err


def test_a_warm_start_never_trains_on_ids_of_another_tokenizer(tmp_path, isolated_cache, one_thread, capsys):
    corpus = write_corpus(tmp_path / "corpus", n_files=6, n_lines=40)
    text = ["--dataset", "text", "--data-path", str(corpus), "--set", "tokenizer_vocab_size=300"]
    assert main(["train", *SMALL_CPU_RUN, *text, "--total-steps", "1", "--checkpoint-dir", str(tmp_path / "T")]) == 0
    # synthetic data comes with byte-tokenizer ids: refused, not trained as if they were T's BPE ids
    err = _one_line_error(capsys, "--init-from", str(tmp_path / "T"), "--checkpoint-dir", str(tmp_path / "x"))
    assert "tokenized with another tokenizer than the checkpoint's" in err
    # text is re-encoded with T's tokenizer, whatever tokenizer_vocab_size says
    tr, _ = _trainer(tmp_path, "--init-from", str(tmp_path / "T"), "--dataset", "text", "--data-path", str(corpus),
                     "--set", "tokenizer_vocab_size=280", "--checkpoint-dir", str(tmp_path / "y"))
    assert datasets.tokenizer_digest(tr.data.tokenizer_path) == datasets.tokenizer_digest(
        ck.resolve_checkpoint(tmp_path / "T") / "tokenizer.json")
    tr.close()


# ---------------------------------------------------------------------------------------------
# corpus B


def _fake_distribution(site, name: str, readme: str, files: dict[str, str]):
    """An installed distribution as importlib.metadata sees one: a dist-info with METADATA and RECORD."""
    import importlib.metadata as md

    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n\n{readme}\n")
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    (info / "RECORD").write_text("".join(f"{rel},,\n" for rel in [*files, f"{info.name}/METADATA"]))
    return md.PathDistribution(info)


def test_pkgdocs_reads_readmes_docs_and_docstrings_once_and_no_licenses(tmp_path, monkeypatch):
    doc = "Why this module exists. " * 20  # >= MIN_DOCSTRING_CHARS
    a = _fake_distribution(tmp_path, "pkg_a", "# pkg-a\nA README.", {
        "pkg_a/__init__.py": f'"""{doc}"""\nX = 1\n', "pkg_a/short.py": '"""Too short."""\n',
        "pkg_a/GUIDE.md": "A guide.", "pkg_a/LICENSE.txt": "MIT License ...", "pkg_a/NOTICE.md": "Notice.",
        "pkg_a/data.json": "{}"})
    b = _fake_distribution(tmp_path, "pkg_b", "# pkg-a\nA README.", {"pkg_b/GUIDE.md": "A guide."})  # copies
    monkeypatch.setattr(pkgdocs, "distributions", lambda: [a, b])
    docs = pkgdocs.collect_pkgdocs()
    assert docs.texts == ["# pkg-a\nA README.", "A guide.", doc.strip()]  # dist, then its files in path order
    assert docs.sources == ["pkg_a==1.0", "pkg_b==1.0"]


def test_pkgdocs_corpus_builds_deterministically(tmp_path, monkeypatch, one_thread):
    few = {"tqdm", "safetensors", "tokenizers", "filelock"}  # a small, always-installed subset: seconds
    real = pkgdocs.distributions
    monkeypatch.setattr(pkgdocs, "distributions", lambda: [d for d in real() if d.metadata["Name"].lower() in few])
    docs = pkgdocs.collect_pkgdocs()
    assert len(docs.texts) >= 4 and docs.n_bytes > 10_000
    assert docs.texts == pkgdocs.collect_pkgdocs().texts and len(set(docs.texts)) == len(docs.texts)
    assert not any(t.lstrip().lower().startswith(("mit license", "apache license")) for t in docs.texts)
    pd = datasets.load_dataset("pkgdocs", cache_dir=tmp_path, vocab_size=300, show_progress=False)
    assert pd.meta["source"].startswith("pkgdocs:") and pd.meta["text_bytes"] == docs.n_bytes
    assert len(pd.train) > 1000 and len(pd.val) > 0 and pd.meta["val_fraction"] == datasets.PKGDOCS_VAL_FRACTION
    # with a given tokenizer: encoded by it, cached apart
    other = datasets.synthetic_dataset(8, 16, 0, cache_dir=tmp_path)
    pd2 = datasets.load_dataset("pkgdocs", cache_dir=tmp_path, vocab_size=300, show_progress=False,
                                tokenizer=other.tokenizer_path)
    assert pd2.dir != pd.dir and pd2.vocab_size == 257 and len(pd2.train) == pd.meta["train_bytes"] + pd.meta[
        "n_train_docs"]  # byte tokenizer: one id per byte, plus a separator per document
    assert json.loads((pd2.dir / "meta.json").read_text())["tokenizer_from"] == str(other.tokenizer_path)
