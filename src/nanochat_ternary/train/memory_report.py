"""``info`` and ``memory``: what a config's model and training step take, as tables or JSON.

``info`` is size arithmetic (no big allocations); ``memory`` measures real steps on the device
(train/memory.py) and the optimizer state from its tensors (optim/factory.py); both can add the
per-rank table of rank_memory.py for N ranks under ddp and fsdp.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import Config, format_config
from ..errors import UserError
from ..model.gpt import GPT
from ..model.info import model_info
from ..optim.factory import measure_optimizer_state
from .memory import measure_training_step
from .rank_memory import format_per_rank, per_rank_memory


def report_info(cfg: Config, ranks: int = 0, as_json: bool = False) -> int:
    """``nanochat-train info``: parameter counts and size arithmetic of ``cfg`` (no big allocations);
    ``ranks``: also the per-rank table at that many ranks (rank_memory.py)."""
    info = model_info(cfg)
    if as_json:
        if ranks:
            info["per_rank"] = per_rank_memory(cfg, ranks)
        print(json.dumps(info, indent=2))
        return 0
    print(format_config(cfg))
    print(f"\nparameters: {info['params']:,} total, {info['non_embedding_params']:,} non-embedding "
          f"({info['params'] / 1e6:.1f}M / {info['non_embedding_params'] / 1e6:.1f}M)")
    print(f"  Muon (hidden matrices): {info['muon_params']:,}   AdamW (rest): {info['adamw_params']:,}")
    print(f"weights: {info['fp32_weight_bytes'] / 2**20:,.1f} MiB fp32 shadow weights; "
          f"{info['ternary_packed_bytes'] / 2**20:,.1f} MiB packed ternary (2 bits/weight + scales)")
    print(f"optimizer state at fp32 (momentum 4 B + AdamW 8 B per param): "
          f"{info['fp32_optimizer_state_bytes'] / 2**20:,.1f} MiB (size arithmetic; measure it with training)")
    if ranks:
        print("\n".join(format_per_rank(per_rank_memory(cfg, ranks))))
    return 0


def _available_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def report_memory(cfg: Config, steps: int = 2, ranks: int = 0, as_json: bool = False) -> int:
    """``nanochat-train memory``: peak memory of ``steps`` real training steps of ``cfg`` on its
    device, and the optimizer state measured from its tensors; ``ranks``: the per-rank table too."""
    per_rank = per_rank_memory(cfg, ranks) if ranks else None  # bad input refused before measuring
    info = model_info(cfg)
    # a real step holds weights, grads, optimizer state (fp32: ~16 B/param) plus activations
    need = info["params"] * 16
    avail = _available_memory_bytes()
    on_cpu = cfg.training.device == "cpu" or (cfg.training.device == "auto" and not torch.cuda.is_available())
    if on_cpu and avail is not None and need > 0.8 * avail:
        raise UserError(f"measuring {cfg.preset or 'this config'} ({info['params'] / 1e9:.2f}B params) needs "
                        f"~{need / 2**30:.0f} GiB; this machine has {avail / 2**30:.0f} GiB available. "
                        f"Not measured (run it on a bigger machine)")
    try:
        step = measure_training_step(cfg, steps=steps)
    except torch.OutOfMemoryError as e:  # on CUDA there is no estimate to refuse with: the step itself says
        first = str(e).splitlines()[0] if str(e) else "out of memory"
        raise UserError(f"measuring {cfg.preset or 'this config'} ({info['params'] / 1e9:.2f}B params) ran out of "
                        f"memory ({first}). Not measured: try a smaller batch_size, gradient_checkpointing=true, "
                        f"use_8bit_optim=true or latent_dtype=bfloat16") from None
    with torch.device("meta"):
        model = GPT(cfg.model)
    rep = measure_optimizer_state(model, cfg.training, baseline=True, seed=cfg.training.seed)
    rep["preset"] = cfg.preset
    rep["step"] = step
    rep["per_rank"] = per_rank
    if as_json:
        print(json.dumps(rep, indent=2))
        return 0
    mib = 2**20
    b, s_len, k = step["batch"]
    print(f"{step['steps']} training step(s) of {cfg.preset or 'custom'} ({step['params'] / 1e6:.1f}M params, "
          f"batch {b} x {s_len} x {k} micro-batches) on {step['device']}, measured:")
    print(f"  peak           {step['peak_bytes'] / mib:>10.1f} MiB   ({step['peak_source']})")
    by = ", ".join(f"{v / mib:.1f} MiB {d}" for d, v in step["weights_by_dtype"].items())
    print(f"  weights        {step['weights_bytes'] / mib:>10.1f} MiB   ({by})")
    print(f"  gradients      {step['grads_peak_bytes'] / mib:>10.1f} MiB   (most alive at once in the backward)")
    print(f"  optimizer      {step['optimizer_state_bytes'] / mib:>10.1f} MiB   (state tensors after the steps)")
    print(f"  activations    {step['activations_saved_bytes'] / mib:>10.1f} MiB   (saved for the backward, one "
          f"micro-batch)")
    print("  options: " + ", ".join(f"{k}={v}" for k, v in step["options"].items()))
    print(f"optimizer state after one step (measured from the state tensors), variant {rep['variant']}")
    print(f"  Muon : {rep['muon_params']:>13,} params  {rep['muon_state_bytes'] / mib:>10.2f} MiB  "
          f"{rep['bytes_per_muon_param']:.3f} B/param  (int8 momenta: {rep['muon_int8_tensors']}, "
          f"GaLore-projected: {rep['galore_projected']})")
    print(f"  AdamW: {rep['adamw_params']:>13,} params  {rep['adamw_state_bytes'] / mib:>10.2f} MiB")
    print(f"  total: {rep['total_state_bytes'] / mib:.2f} MiB")
    print(f"  fp32 Muon on the same params (measured): {rep['fp32_muon_state_bytes'] / mib:.2f} MiB -> "
          f"this variant's Muon state is {rep['muon_state_vs_fp32']:.1%} of it "
          f"({1 - rep['muon_state_vs_fp32']:.1%} less)")
    if per_rank is not None:  # batch_size is per rank: each rank's activations are the ones measured above
        print("\n".join(format_per_rank(per_rank)))
    return 0
