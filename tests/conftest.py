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
