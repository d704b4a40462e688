"""One benchmark run, in its own process: ``python -m nanochat_ternary.bench.worker SPEC RESULT``.

A fresh process per (configuration, seed) so that its peak memory (its peak RSS, VmHWM, on CPU; the
CUDA caching allocator's high-water mark on GPU) is its own and not a previous run's. It trains through
the ordinary :class:`~nanochat_ternary.train.trainer.Trainer` (the same code path as
``nanochat-train train``) and writes one JSON object: the run's measurements, or
``{"status": "failed", "error": ...}``. The exit status is 0 on success, 1 on failure.

Besides the figures, each run records what it observed its features doing, so a configuration
whose feature silently stayed off cannot pass as the feature: the bytes one micro-batch's forward
keeps for backward (what gradient checkpointing cuts), the data-loader worker processes seen alive
during training (async loader), the int8 and GaLore-projected momenta in the optimizer state, and
the MTP heads in the model.

SPEC (JSON): ``name``, ``config`` (TOML path or "" for the baseline of a peer), ``peer`` (a
:data:`~.peers.PEERS` name or ""), ``model`` (preset), ``seed``, ``overrides`` (``key=value``
strings applied last), ``run_dir``, ``log_file``, and optionally ``tasks`` (what ``eval_tasks``
names, scored once on the final model: ``task_*`` results) and ``task_items``.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import resource
import signal
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

# how many of the last steps the "final train loss" averages (a single step's loss is noisy)
FINAL_LOSS_FRACTION = 0.1


def _peak_memory(device: Any) -> tuple[int, str]:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return _peak_rss_bytes(), "rss"


def vm_hwm_bytes() -> int | None:
    """This process's own peak RSS (``VmHWM``), or None where /proc cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss_bytes() -> int:
    """This process's own peak RSS: VmHWM, which starts afresh with the address space exec makes.
    Not ru_maxrss where VmHWM can be read: Linux carries ru_maxrss across fork and exec, so a worker
    would report at least the peak of the bench process that started it."""
    hwm = vm_hwm_bytes()
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB


class _ChildWatch:
    """Samples how many child processes (data-loader workers) are alive, from a background thread."""

    def __init__(self, period_s: float = 0.02) -> None:
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period_s,), daemon=True)

    def _run(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            try:
                self.most = max(self.most, len(multiprocessing.active_children()))
            except (RuntimeError, OSError):  # a child starting or exiting under us: sample again
                continue

    def __enter__(self) -> _ChildWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def activation_bytes(trainer: Any) -> int:
    """Bytes of the tensors one training micro-batch's forward saves for backward (parameters
    excluded: they are resident anyway), measured with autograd's saved-tensor hooks on the trained
    model and objective. Gradient checkpointing exists to cut this."""
    import torch

    rt, model = trainer.rt, trainer.model
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    x, y = trainer.batches.get(0, 0)
    x, y = x.to(rt.device), y.to(rt.device)
    trainer.objective.prepare(x)  # as the training loop does (a distillation run: its teacher's logits)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), rt.autocast():
        loss, _stats = model(x, targets=y, objective=trainer.objective)
    del loss
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def final_tasks(trainer: Any, cfg: Any, rt: Any, tasks: str, items: int) -> tuple[dict[str, float], float]:
    """``{task_<name>_<metric>: value}`` of the trained model on ``tasks`` (train/task_eval.py's
    syntax, ``items`` each), scored once after training (not timed into tok/s), and its seconds."""
    if not tasks:
        return {}, 0.0
    import copy

    from ..train.task_eval import TaskEval

    cfg = copy.deepcopy(cfg)
    cfg.training.eval_tasks, cfg.training.eval_task_limit = tasks, items
    t0 = time.perf_counter()
    trainer.model.eval()
    scores = TaskEval.from_config(cfg, trainer.model, trainer.data, rt).run()
    return scores, time.perf_counter() - t0


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ..config import build_config
    from ..optim.factory import memory_report, optimizer_state_bytes
    from ..train.runtime import setup_runtime
    from ..train.trainer import Trainer
    from .peers import build_peer

    t_start = time.perf_counter()
    cfg = build_config(spec["config"] or None, overrides=[*spec["overrides"], f"seed={spec['seed']}",
                                                          f"checkpoint_dir={spec['run_dir']}",
                                                          f"log_file={spec['log_file']}"],
                       preset=spec["model"])
    rt = setup_runtime(cfg.training.device, cfg.training.threads)
    factory = (lambda model, tcfg: build_peer(spec["peer"], model, tcfg)) if spec["peer"] else None
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    try:
        trainer = Trainer(cfg, rt, optimizer_factory=factory)
        with _ChildWatch() as children:
            res = trainer.fit()
    finally:
        rt.shutdown()
    peak, peak_kind = _peak_memory(rt.device)  # before the observation below allocates anything
    tasks, task_s = final_tasks(trainer, cfg, rt, spec.get("tasks", ""), spec.get("task_items", 200))
    acts = activation_bytes(trainer)
    opt_rep = memory_report(trainer.optimizers)

    steps = len(res.step_times)
    losses = [res.losses[k] for k in sorted(res.losses)]
    n_last = max(1, math.ceil(FINAL_LOSS_FRACTION * len(losses)))
    timed = res.step_times[1:] if steps > 1 else res.step_times  # step 1 carries one-off warm-up
    kept = [s["kept_frac"] for s in res.step_stats if "kept_frac" in s]
    tps = trainer.tokens_per_step
    return {
        "status": "ok",
        "error": None,
        "seed": spec["seed"],
        "steps": steps,
        "tokens_per_step": tps,
        "params": trainer.model.num_params(),
        "final_train_loss": statistics.fmean(losses[-n_last:]),
        "val_loss": res.val_loss,
        "val_bpb": res.val_bpb,
        "tokens_per_s": tps * len(timed) / sum(timed),
        "median_step_s": statistics.median(timed),
        "optimizer_state_bytes": sum(optimizer_state_bytes(o) for o in trainer.optimizers),
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "data_wait_share": sum(res.data_waits) / sum(res.step_times),
        "gpu_util": res.gpu_util,
        "kept_frac": statistics.fmean(kept) if kept else None,
        "wall_s": time.perf_counter() - t_start,
        "train_curve": [[step, tps * step, loss] for step, loss in sorted(res.losses.items())],
        "val_curve": [[step, tps * step, loss] for step, loss in sorted(res.val_curve.items())],
        "device": str(rt.device),
        "threads": torch.get_num_threads(),
        # what the run's features were observed doing (see the module docstring)
        "activation_bytes": acts,
        "loader_processes": children.most,
        "int8_momenta": opt_rep["muon_int8_tensors"],
        "galore_projected": opt_rep["galore_projected"],
        "mtp_heads": len(trainer.model.mtp.heads) if trainer.model.mtp is not None else 0,
        "tasks": tasks,
        "task_eval_s": task_s,
    }


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the bench process that started us dies, however it dies (kill -9
    included), and stop at once if it is already gone: a worker never trains on for nobody."""
    parent = os.environ.get("NANOCHAT_BENCH_PARENT")
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    from ..errors import UserError

    _die_with_parent()

    spec_path, result_path = (argv if argv is not None else sys.argv[1:])[:2]
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = run(spec)
        code = 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        result, code = {"status": "failed", "error": str(e)}, 1
    except Exception as e:  # any crash is a result too: the suite reports it and goes on
        traceback.print_exc()
        result, code = {"status": "failed", "error": f"{type(e).__name__}: {e}"}, 1
    result["name"] = spec["name"]
    Path(result_path).write_text(json.dumps(result, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
