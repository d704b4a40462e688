"""Shared test fixtures and helpers."""

from pathlib import Path

import numpy as np
import pytest
import torch

# Modules whose results depend on floating-point arithmetic (kernels, reductions, rounding to the
# ternary grid). `make test` runs them again with ATEN_CPU_CAPABILITY=avx2 and =default, so a test
# that passes only with one CPU's kernels fails on every machine, not on whichever CPU CI draws.
NUMERICS_MODULES = {"test_low_memory", "test_muon", "test_quantized", "test_galore", "test_act_quant",
                    "test_model", "test_adamw_state", "test_generate",
                    "test_eval", "test_int8", "test_recipes", "test_llamacpp"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in NUMERICS_MODULES:
            item.add_marker(pytest.mark.numerics)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one thread avoids waiting on descheduled workers on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# A tiny model on synthetic data, one record per step. --device cpu: runs compared with these args are
# compared at fp32 tolerances; CUDA (bf16 autocast) has its own tests in test_gpu.py.
SMALL_CPU_RUN = ["--set", "dim=64", "--set", "n_layers=2", "--set", "n_heads=2", "--set", "n_kv_heads=1",
                 "--batch-size", "4", "--seq-len", "32", "--sample-tokens", "0", "--dataset", "synthetic",
                 "--n-samples", "200", "--log-interval", "1", "--eval-interval", "0", "--device", "cpu"]


def train_small(tmp_path: Path, name: str, *args: str) -> list[dict]:
    """``nanochat-train train`` with SMALL_CPU_RUN (+ ``args``) in ``tmp_path/name``; its log records."""
    import json

    from nanochat_ternary.cli import main

    log = tmp_path / f"{name}.jsonl"
    rc = main(["train", *SMALL_CPU_RUN, "--checkpoint-dir", str(tmp_path / name), "--log-file", str(log), *args])
    assert rc == 0
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.fixture()
def isolated_cache(tmp_path_factory, monkeypatch):
    """Dataset caches under the test session's temp dir, not the user's."""
    monkeypatch.setenv("NANOCHAT_CACHE", str(tmp_path_factory.getbasetemp() / "nanochat-cache"))


def write_corpus(d: Path, n_files: int = 12, n_lines: int = 60) -> Path:
    """A small directory of Python-looking text files (deterministic), for text-dataset runs."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["def", "return", "class", "self", "import", "for", "in", "if", "else", "print", "value"]
    for i in range(n_files):
        lines = [" ".join(rng.choice(words, size=8)) + f"  # {i}" for _ in range(n_lines)]
        (d / f"f{i}.py").write_text("\n".join(lines) + "\n")
    return d


class TrainingObserver:
    """What an in-process training run really did, seen from outside the trainer: the Trainer
    object (its optimizers' state after the run), how many transformer blocks went through
    ``torch.utils.checkpoint``, and which batch source fed the steps (with its worker processes as
    they were when it started)."""

    def __init__(self) -> None:
        self.trainers: list = []
        self.checkpointed_blocks = 0
        self.sources: list = []
        self.live_workers: list[int] = []  # per source: loader worker processes alive at its start


@pytest.fixture()
def observe_training(monkeypatch) -> TrainingObserver:
    import torch.utils.checkpoint

    from nanochat_ternary.data.loader import AsyncBatches
    from nanochat_ternary.model.gpt import Block
    from nanochat_ternary.train import trainer as trainer_mod

    obs = TrainingObserver()
    real_fit, real_ckpt, real_source = trainer_mod.Trainer.fit, torch.utils.checkpoint.checkpoint, \
        trainer_mod.make_batch_source

    def fit(self):
        obs.trainers.append(self)
        return real_fit(self)

    def checkpoint(fn, *args, **kwargs):
        obs.checkpointed_blocks += isinstance(fn, Block)
        return real_ckpt(fn, *args, **kwargs)

    def make_batch_source(*args, **kwargs):
        src = real_source(*args, **kwargs)
        obs.sources.append(src)
        workers = src._it._workers if isinstance(src, AsyncBatches) else []
        obs.live_workers.append(sum(w.is_alive() for w in workers))
        return src

    monkeypatch.setattr(trainer_mod.Trainer, "fit", fit)
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", checkpoint)
    monkeypatch.setattr(trainer_mod, "make_batch_source", make_batch_source)
    return obs
