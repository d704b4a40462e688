"""Metrics sinks: a JSONL file (one object per logged step) and TensorBoard scalars.

Both get the same dict, so a plot from either tells the same story. Only the main rank writes.

A sink that cannot be opened is an error before training starts (a typo in the path). One that
fails later (a full disk, ``--log-file /dev/full``, a removed mount) is a warning, printed once:
the sink is dropped and training and its checkpoints go on, because losing the run for the sake
of its log would be the worse outcome.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UserError


class MetricsLogger:
    def __init__(self, log_file: str = "", tensorboard_dir: str = "", enabled: bool = True,
                 warn: Callable[[str], None] = lambda _msg: None) -> None:
        self._fh = None
        self._tb = None
        self._warn = warn
        self._log_file = log_file
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
            try:
                self._tb = SummaryWriter(log_dir=tensorboard_dir)
            except OSError as e:
                raise UserError(f"--tensorboard {tensorboard_dir}: cannot write there ({e.strerror or e})") from None

    def _drop_file(self, e: BaseException) -> None:
        fh, self._fh = self._fh, None
        self._warn(f"warning: cannot write the metrics log {self._log_file} ({getattr(e, 'strerror', None) or e}); "
                   f"no more records go to it, training and its checkpoints go on")
        try:
            fh.close()
        except OSError:
            pass

    def log(self, record: dict[str, Any]) -> None:
        if self._fh is not None:
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
            try:
                self._fh.write(json.dumps(clean) + "\n")
                self._fh.flush()
            except (OSError, ValueError) as e:  # ValueError: the file was closed under us
                self._drop_file(e)
        if self._tb is not None:
            step = int(record["step"])
            try:
                for k, v in record.items():
                    if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                        self._tb.add_scalar(f"train/{k}" if not k.startswith("val_") else f"val/{k[4:]}", v, step)
            except OSError as e:
                tb, self._tb = self._tb, None
                self._warn(f"warning: cannot write TensorBoard scalars ({e.strerror or e}); they stop here, "
                           f"training goes on")
                try:
                    tb.close()
                except OSError:
                    pass

    def close(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError as e:
                self._warn(f"warning: the metrics log {self._log_file} may be incomplete "
                           f"({e.strerror or e})")
            self._fh = None
        if self._tb is not None:
            try:
                self._tb.close()
            except OSError:
                pass
            self._tb = None
