"""How busy the GPU is during training, measured: NVML's utilization, sampled in the background.

``torch.cuda.utilization`` reads NVML's "percent of time over the past sample period during which
one or more kernels was executing" (the period is 1/6 s to 1 s depending on the product), through
``nvidia-ml-py`` (``pynvml``). A thread samples it every ``period_s`` while training runs; the
trainer logs the mean since its previous record as ``gpu_util`` (percent), next to ``data_wait_s``
(the time a step spent waiting for its batch), so a user can see whether the GPU or the input
pipeline is the bottleneck. Where NVML is missing (no ``nvidia-ml-py``, no driver) the monitor says
why once and logs nothing: a figure that was not measured is not printed.
"""

from __future__ import annotations

import threading

import torch


class GpuUtilization:
    def __init__(self, device: torch.device, period_s: float = 0.1) -> None:
        self.device = device
        self.period_s = period_s
        self.unavailable_reason: str | None = None
        self._samples: list[float] = []
        self._all: list[float] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if device.type != "cuda":
            self.unavailable_reason = "not a CUDA device"
            return
        try:
            torch.cuda.utilization(device)
        except Exception as e:  # ModuleNotFoundError (no pynvml), NVML errors: no measurement, no figure
            self.unavailable_reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"

    @property
    def available(self) -> bool:
        return self.unavailable_reason is None

    def start(self) -> None:
        if not self.available or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="gpu-util", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                value = float(torch.cuda.utilization(self.device))
            except Exception:  # a transient NVML error: skip this sample
                continue
            with self._lock:
                self._samples.append(value)
                self._all.append(value)

    def take(self) -> float | None:
        """Mean utilization (percent) of the samples since the last call; None if there were none."""
        with self._lock:
            samples, self._samples = self._samples, []
        return sum(samples) / len(samples) if samples else None

    def overall(self) -> float | None:
        """Mean utilization (percent) over the whole run so far."""
        with self._lock:
            return sum(self._all) / len(self._all) if self._all else None

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
