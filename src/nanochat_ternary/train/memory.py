"""The measured memory of one real training step of a config, on the current device.

``nanochat-train memory`` answers "does this config fit my machine / my card?" by doing what
training does: it builds the :class:`~nanochat_ternary.train.trainer.Trainer` for the config (on
a small file of random token ids, in a temporary run dir) and runs ``steps`` real optimizer steps (the
first allocates the optimizer state, the second runs with it in place), with the config's
options (8-bit / GaLore Muon, bf16 latents, the step in the backward, gradient checkpointing...).

What is measured
----------------
* ``peak_bytes``: on CUDA ``torch.cuda.max_memory_allocated`` over the steps (the allocator's own
  count of live tensors: the figure that has to fit the card). On CPU the process's peak resident
  set (``VmHWM``, reset first through ``/proc/self/clear_refs``) minus its resident set before the
  model was built: it includes allocator slack and freed-but-cached pages, so it is an upper bound
  of what the tensors needed. ``peak_source`` says which.
* Tensor accounting, on any device, each exact for what it names:
  ``weights_bytes`` (every parameter once), ``optimizer_state_bytes`` (the state tensors after the
  steps, :func:`~nanochat_ternary.optim.factory.memory_report`), ``grads_peak_bytes`` (the largest
  sum of live ``.grad`` tensors seen in the backward: all gradients with the normal step, one
  matrix at a time plus AdamW's with the step in the backward), ``activations_saved_bytes`` (the
  tensors autograd saves for the backward in one micro-batch's forward, storages counted once,
  parameters excluded; recomputation inside gradient checkpointing is not counted).

The CUDA path (``--set device=cuda``) is written for the GPU session; on this project's CPU
machines only the CPU path has been run.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config
from ..data.datasets import DEFAULT_VAL_FRACTION
from ..data.tokenfile import dtype_for_vocab, write_tokens
from ..optim.factory import memory_report
from .runtime import Runtime, setup_runtime


def _rss_bytes(field: str = "VmRSS") -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    hwm = _rss_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def random_token_trainer(cfg: Config, rt: Runtime, workdir: Path, steps: int):
    """A :class:`~nanochat_ternary.train.trainer.Trainer` for ``cfg`` on a small file of random token
    ids of the model's vocab, with its run dir in ``workdir``: the trainer's real step
    (``train_step``), without the dataset, evaluation, samples or checkpoints of a run. ``cfg`` is
    not modified. Call ``close()`` on it when done."""
    from .trainer import Trainer

    t = cfg.training
    # enough that the validation split (val_fraction; 0: a lone .bin's default) still holds two batches
    per_batch = t.batch_size * (t.seq_len + 1)
    val_fraction = t.val_fraction or DEFAULT_VAL_FRACTION
    n_tokens = max(4 * per_batch * t.grad_accum_steps * (steps + 1), int(2 * per_batch / val_fraction)) + 4096
    rng = np.random.default_rng(0)
    data = workdir / "tokens.bin"
    write_tokens(data, rng.integers(0, cfg.model.vocab_size, n_tokens, dtype=np.int64)
                 .astype(dtype_for_vocab(cfg.model.vocab_size)), cfg.model.vocab_size)
    run_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model), training=dataclasses.replace(
        t, dataset="tokens", data_path=str(data), total_steps=steps, eval_interval=0,
        sample_tokens=0, checkpoint_dir=str(workdir / "run"), checkpoint_interval=0, resume="",
        log_file="", tensorboard="", use_async_loader=False))
    return Trainer(run_cfg, rt, echo=lambda _m: None)


def measure_training_step(cfg: Config, steps: int = 2) -> dict[str, Any]:
    """Run ``steps`` real training steps of ``cfg`` and report their measured memory (see the
    module docstring). ``cfg`` is not modified; its data settings are replaced by a small file of
    random token ids of the model's vocab (the memory of a step does not depend on the data)."""
    t = cfg.training
    with tempfile.TemporaryDirectory(prefix="nanochat-memory-") as tmp:
        rt = setup_runtime(t.device, t.threads)
        cuda = rt.device.type == "cuda"
        rss0 = _rss_bytes() or 0
        exact_peak = _reset_peak_rss()
        if cuda:
            torch.cuda.synchronize(rt.device)
            torch.cuda.reset_peak_memory_stats(rt.device)
            base_alloc = torch.cuda.memory_allocated(rt.device)
        trainer = random_token_trainer(cfg, rt, Path(tmp), steps)
        model = trainer.model
        params = list({id(p): p for p in model.parameters()}.values())
        weights = sum(p.nbytes for p in params)
        param_ptrs = {p.untyped_storage().data_ptr() for p in params}

        grads_peak = [0]

        def grad_hook(p: torch.Tensor) -> None:
            live = sum(q.grad.nbytes for q in params if q.grad is not None)
            if p.grad is None:  # freed by the in-backward step just before: it was alive
                live += p.numel() * p.element_size()
            grads_peak[0] = max(grads_peak[0], live)

        handles = [p.register_post_accumulate_grad_hook(grad_hook) for p in params if p.requires_grad]
        saved: dict[int, int] = {}
        acts_peak = 0

        def pack(x: torch.Tensor) -> torch.Tensor:
            ptr = x.untyped_storage().data_ptr()
            if ptr not in param_ptrs:
                saved[ptr] = x.untyped_storage().nbytes()
            return x

        step_s: list[float] = []
        try:
            for step in range(steps):
                t0 = time.perf_counter()
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                    saved.clear()
                    trainer.train_step(step)  # returns Python numbers: the step's work is done
                step_s.append(time.perf_counter() - t0)
                acts_peak = max(acts_peak, sum(saved.values()))
        finally:
            for h in handles:
                h.remove()
            trainer.close()
        if cuda:
            torch.cuda.synchronize(rt.device)
            peak, source = torch.cuda.max_memory_allocated(rt.device) - base_alloc, "cuda max_memory_allocated"
        else:
            peak = _peak_rss_bytes() - rss0
            source = "cpu peak RSS (VmHWM) above the process before the model" + ("" if exact_peak else
                                                                                   " (peak not resettable)")
        rep = memory_report(trainer.optimizers)
        rt.shutdown()
    return {
        "preset": cfg.preset,
        "device": str(rt.device),
        "steps": steps,
        "batch": [t.batch_size, t.seq_len, t.grad_accum_steps],
        "params": sum(p.numel() for p in params),
        "peak_bytes": peak,
        "peak_source": source,
        "weights_bytes": weights,
        "weights_by_dtype": _by_dtype(params),
        "grads_peak_bytes": grads_peak[0],
        "optimizer_state_bytes": rep["total_state_bytes"],
        "optimizer": rep,
        "activations_saved_bytes": acts_peak,
        "options": {k: getattr(t, k) for k in ("optimizer_in_backward", "latent_dtype", "latent_rounding",
                                               "use_8bit_optim", "use_galore", "gradient_checkpointing")},
        "step_seconds": step_s,  # with the accounting hooks on: indicative only
        "threads": torch.get_num_threads(),
        "pid_cpu_count": os.cpu_count(),
    }


def _by_dtype(params: list[torch.Tensor]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in params:
        key = str(p.dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + p.nbytes
    return out
