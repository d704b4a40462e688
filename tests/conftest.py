"""Shared test fixtures and helpers."""

from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one thread avoids waiting on descheduled workers on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
