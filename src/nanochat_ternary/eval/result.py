"""One scored figure (task, metric, value, standard error, n) and the standard errors used here."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class Result:
    """``value`` of ``metric`` on ``n`` items of ``task``; ``partial``: interrupted before the end."""

    task: str
    metric: str
    value: float
    stderr: float | None
    n: int
    partial: bool = False
    notes: dict[str, Any] = field(default_factory=dict)  # how it was scored (stride, bytes, chance...)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mean_stderr(values: list[float] | np.ndarray) -> float | None:
    """Standard error of a mean, with the sample standard deviation (ddof=1), as lm-eval-harness
    reports for acc; None below two values."""
    a = np.asarray(values, dtype=np.float64)
    if len(a) < 2:
        return None
    return float(a.std(ddof=1) / math.sqrt(len(a)))


def ratio_stderr(num: np.ndarray, den: np.ndarray) -> float | None:
    """Standard error of ``sum(num) / sum(den)`` over independent units (documents), by the delta
    method: ``sqrt(n / (n - 1) * sum((num_i - R den_i)^2)) / sum(den)``; None below two units."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    n = len(num)
    if n < 2 or den.sum() <= 0:
        return None
    r = num.sum() / den.sum()
    return float(math.sqrt(n / (n - 1) * float(((num - r * den) ** 2).sum())) / den.sum())
