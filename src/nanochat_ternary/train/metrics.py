"""Metrics sinks: a JSONL file (one object per logged step) and TensorBoard scalars.

Both get the same dict, so a plot from either tells the same story. Only the main rank writes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import UserError


class MetricsLogger:
    def __init__(self, log_file: str = "", tensorboard_dir: str = "", enabled: bool = True) -> None:
        self._fh = None
        self._tb = None
        if not enabled:
            return
        if log_file:
            path = Path(log_file)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = path.open("a", encoding="utf-8")
            except OSError as e:
                raise UserError(f"--log-file {path}: cannot open for writing ({e.strerror or e})") from None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError(
                    "--tensorboard needs the tensorboard package: pip install 'nanochat-ternary[tensorboard]'"
                ) from None
            self._tb = SummaryWriter(log_dir=tensorboard_dir)

    def log(self, record: dict[str, Any]) -> None:
        if self._fh is not None:
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
            self._fh.write(json.dumps(clean) + "\n")
            self._fh.flush()
        if self._tb is not None:
            step = int(record["step"])
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"train/{k}" if not k.startswith("val_") else f"val/{k[4:]}", v, step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
