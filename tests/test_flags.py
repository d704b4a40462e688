"""Flags that take effect: each accepted setting changes what training does, observed from outside.

val_fraction reaches the split, epochs follows one rule from every source, the logged lr follows
the warmup-stable-decay formula, and grad_clip bounds the gradient the optimizers see.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_corpus
from torch.optim.optimizer import register_optimizer_step_pre_hook

from nanochat_ternary.cli import main
from nanochat_ternary.config import build_config
from nanochat_ternary.data.tokenfile import write_tokens
from nanochat_ternary.errors import DataError
from nanochat_ternary.train.dataset import load_training_data
from nanochat_ternary.train.runtime import setup_runtime

SMALL = ["--set", "dim=64", "--set", "n_layers=2", "--set", "n_heads=2", "--set", "n_kv_heads=1",
         "--batch-size", "8", "--seq-len", "32", "--sample-tokens", "0", "--eval-interval", "0"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NANOCHAT_CACHE", str(tmp_path_factory.getbasetemp() / "nanochat-cache"))


def _records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# val_fraction reaches the split


def _split(*overrides: str) -> tuple[int, int, dict]:
    data = load_training_data(build_config(overrides=list(overrides)), setup_runtime("cpu", 0))
    return len(data.train), len(data.val), data.meta


def test_val_fraction_splits_a_token_file(tmp_path):
    f = tmp_path / "t.bin"
    tokens = np.arange(10_000) % 100
    write_tokens(f, tokens, vocab_size=100)
    src = ["dataset=tokens", f"data_path={f}"]
    # the documented rule: the last round(N * val_fraction) tokens are the val split (default 0.01)
    assert _split(*src)[:2] == (9_900, 100)
    assert _split(*src, "val_fraction=0.01")[:2] == (9_900, 100)
    assert _split(*src, "val_fraction=0.2")[:2] == (8_000, 2_000)
    data = load_training_data(build_config(overrides=[*src, "val_fraction=0.2"]), setup_runtime("cpu", 0))
    assert np.array_equal(np.asarray(data.val), tokens[8_000:])


def test_val_fraction_splits_text_documents(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_files=20, n_lines=10)
    src = ["dataset=text", f"data_path={corpus}", "tokenizer_vocab_size=300"]
    default, small, big = _split(*src), _split(*src, "val_fraction=0.01"), _split(*src, "val_fraction=0.2")
    # 20 documents: round(20 * 0.01) -> at least 1 held out; round(20 * 0.2) = 4
    assert default[2]["n_val_docs"] == small[2]["n_val_docs"] == 1
    assert big[2]["n_val_docs"] == 4 and big[2]["n_train_docs"] == 16
    assert big[1] > 3 * small[1] and big[0] < small[0]  # token counts move with the documents


def test_val_fraction_sizes_the_synthetic_val_stream():
    src = ["dataset=synthetic", "n_samples=400", "seq_len=32"]
    assert _split(*src)[2]["n_val_docs"] == 8  # default: max(4, 400 // 50)
    assert _split(*src, "val_fraction=0.01")[2]["n_val_docs"] == 4  # max(4, round(4.0))
    assert _split(*src, "val_fraction=0.2")[2]["n_val_docs"] == 80


def test_val_fraction_refused_for_a_prepared_dir_split_otherwise(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_files=20, n_lines=10)
    out = tmp_path / "prepared"
    assert main(["prepare-data", str(corpus), "--out", str(out), "--vocab-size", "300", "--val-fraction", "0.1"]) == 0
    src = ["dataset=tokens", f"data_path={out}"]
    made = json.loads((out / "meta.json").read_text())["n_val_docs"]  # per-document draws: 3 of these 20
    assert _split(*src)[2]["n_val_docs"] == made >= 1  # unset: the dir's own split
    assert _split(*src, "val_fraction=0.1")[2]["n_val_docs"] == made  # the same split: fine
    with pytest.raises(DataError, match=r"val_fraction = 0.2 cannot apply .*prepare-data \(val_fraction 0.1\)"):
        _split(*src, "val_fraction=0.2")


# ---------------------------------------------------------------------------------------------
# epochs: one rule for every source


def test_epochs_from_every_source_resets_an_earlier_step_count(tmp_path):
    toml = tmp_path / "e.toml"
    toml.write_text("[training]\nepochs = 2.5\n")
    both = tmp_path / "both.toml"
    both.write_text("[training]\nepochs = 2.5\ntotal_steps = 7\n")
    for cfg in (build_config(cli={"epochs": 2.5}), build_config(overrides=["epochs=2.5"]), build_config(str(toml)),
                build_config(config_file=str(toml))):
        assert cfg.preset == "tiny-cpu" and (cfg.training.total_steps, cfg.training.epochs) == (0, 2.5)
    assert build_config().training.total_steps == 300  # the preset's step count when no epochs are given
    # a source that sets both keeps both (total_steps wins at run time); a later step count wins
    assert build_config(str(both)).training.total_steps == 7
    assert build_config(cli={"epochs": 2.5, "total_steps": 9}).training.total_steps == 9
    assert build_config(str(toml), cli={"total_steps": 11}).training.total_steps == 11
    assert build_config(cli={"total_steps": 11}, overrides=["epochs=2.5"]).training.total_steps == 0
    assert build_config(cli={"epochs": 2.5}, overrides=["total_steps=5"]).training.total_steps == 5


@pytest.mark.parametrize("source", ["flag", "set", "toml"])
def test_epochs_trains_that_many_passes_from_every_source(tmp_path, source):
    # a prepared dir of 8 * 32 * 6 + 1 tokens: 48 windows of 32, 6 steps of batch 8 per pass
    d = tmp_path / "data"
    d.mkdir()
    rng = np.random.default_rng(0)
    write_tokens(d / "train.bin", rng.integers(0, 256, 8 * 32 * 6 + 1), vocab_size=256)
    write_tokens(d / "val.bin", rng.integers(0, 256, 200), vocab_size=256)
    toml = tmp_path / "e.toml"
    toml.write_text("epochs = 2\n")
    how = {"flag": ["--epochs", "2"], "set": ["--set", "epochs=2"], "toml": ["--config", str(toml)]}[source]
    log = tmp_path / "log.jsonl"
    assert main(["train", *how, "--dataset", "tokens", "--data-path", str(d), *SMALL, "--set", "vocab_size=256",
                 "--log-interval", "1", "--checkpoint-dir", str(tmp_path / "run"), "--log-file", str(log)]) == 0
    assert [r["step"] for r in _records(log)] == list(range(1, 13))  # 2 passes x 6 steps, not the preset's 300
    assert [p.name for p in (tmp_path / "run").glob("step_*")] == ["step_000012"]


# ---------------------------------------------------------------------------------------------
# the schedule and clipping, observed in the log and at the optimizers


def wsd(step: int, total: int, warmup: int, decay_frac: float, min_ratio: float) -> float:
    """The documented warmup-stable-decay factor at 0-based ``step`` (written out independently)."""
    if step < warmup:
        return (step + 1) / warmup
    start = max(warmup, int(decay_frac * total))
    if step < start:
        return 1.0
    return 1.0 - (1.0 - min_ratio) * (step - start) / (total - start)


def test_logged_lr_follows_the_warmup_stable_decay_formula(tmp_path):
    log = tmp_path / "log.jsonl"
    assert main(["train", "--dataset", "synthetic", "--n-samples", "200", *SMALL, "--total-steps", "20",
                 "--set", "warmup_steps=4", "--set", "decay_start_frac=0.5", "--set", "min_lr_ratio=0.1",
                 "--set", "lr=0.03", "--log-interval", "1", "--checkpoint-dir", str(tmp_path / "run"),
                 "--log-file", str(log)]) == 0
    recs = _records(log)
    assert [r["step"] for r in recs] == list(range(1, 21))
    for r in recs:  # record `step` = steps done; its lr is the one step `step - 1` used
        assert r["lr"] == pytest.approx(0.03 * wsd(r["step"] - 1, 20, 4, 0.5, 0.1), rel=1e-12), r["step"]
    lrs = [r["lr"] for r in recs]
    assert lrs[0] == pytest.approx(0.03 / 4) and max(lrs) == pytest.approx(0.03) and lrs[-1] < 0.03 * 0.2


def _post_clip_norms(tmp_path: Path, name: str, clip: str) -> tuple[list[float], list[float]]:
    """(logged grad_norm per step, norm of the gradients the optimizers actually stepped with)."""
    seen: list[tuple[int, float]] = []

    def hook(opt: torch.optim.Optimizer, _args, _kwargs) -> None:  # every optimizer.step(), any class
        sq = sum(float(p.grad.double().pow(2).sum()) for g in opt.param_groups for p in g["params"]
                 if p.grad is not None)
        seen.append((id(opt), sq))

    handle = register_optimizer_step_pre_hook(hook)
    log = tmp_path / f"{name}.jsonl"
    try:
        assert main(["train", "--dataset", "synthetic", "--n-samples", "200", *SMALL, "--total-steps", "4",
                     "--set", f"grad_clip={clip}", "--log-interval", "1", "--checkpoint-dir", str(tmp_path / name),
                     "--log-file", str(log)]) == 0
    finally:
        handle.remove()
    n_opt = len({i for i, _ in seen})  # Muon + AdamW: together they hold every parameter once
    per_step = [math.sqrt(sum(sq for _, sq in seen[k:k + n_opt])) for k in range(0, len(seen), n_opt)]
    return [r["grad_norm"] for r in _records(log)], per_step


def test_grad_norm_is_the_true_norm_and_clipping_bounds_it(tmp_path):
    logged, stepped = _post_clip_norms(tmp_path, "noclip", "0")
    assert len(stepped) == 4
    for a, b in zip(logged, stepped):  # clipping off: the logged norm is the norm the optimizers use
        assert a == pytest.approx(b, rel=1e-4)
    clip = 0.05
    logged, stepped = _post_clip_norms(tmp_path, "clip", str(clip))
    assert all(n > 2 * clip for n in logged)  # every step is clipped, so the bound is exercised
    for b in stepped:  # torch's rule: scale by clip / (norm + 1e-6) -> the norm lands at clip
        assert b == pytest.approx(clip, rel=1e-4)
