"""Per-rank parameter, gradient and optimizer-state bytes of a config at ``N`` ranks, ddp vs fsdp.

Size arithmetic on the meta device (no allocation, works for the 7B preset on a laptop), using the
rules the real run follows, so the figures are exact for the tensors they name (a 2-rank gloo run
checks them byte for byte, tests/test_rank_memory.py):

* the optimizer split of :func:`~nanochat_ternary.optim.factory.split_params` (a tied weight once);
* ``ddp``: every rank holds every parameter, its gradient and all optimizer state: fp32 Muon
  momentum (4 B/value) or, with ``use_8bit_optim``, int8 blocks + one fp32 scale per block for a
  matrix of at least ``min_quant_numel`` values (``Muon8bit``, :func:`n_blocks_for`); torch's
  AdamW ``exp_avg`` + ``exp_avg_sq`` (8 B/value) and a 4-byte ``step`` per tensor. DDP's reducer
  buckets (another gradient copy unless ``gradient_as_bucket_view``) are not counted;
* ``fsdp``: FSDP2 shards dim 0 as ``torch.chunk`` does (``c = ceil(rows / N)`` rows per rank, the
  last ranks fewer or none), parameters, gradients, sharded Muon's fp32 momentum and AdamW's
  moments alike; the AdamW ``step`` stays a 4-byte scalar on every rank. With ``use_8bit_optim``
  the owner rank of a matrix (``balance_owners``, as ShardedMuon8bit) holds its whole momentum
  (int8 blocks or fp32 by Muon8bit's rule), the other ranks none of it.

Activations are not here: ``batch_size`` is per rank, so a rank's activations are those one
process measures at the same batch (``nanochat-train memory``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import Config
from ..errors import UserError
from ..model.gpt import GPT
from ..optim.factory import split_params
from ..optim.quantized import DEFAULT_MIN_QUANT_NUMEL, n_blocks_for
from ..optim.sharded_muon import balance_owners

MODES = ("ddp", "fsdp")
ADAMW_STEP_BYTES = 4  # torch's (fused) AdamW keeps ``step`` as a 0-d fp32 tensor per parameter


def shard_rows(rows: int, world: int, rank: int) -> int:
    """Rows of a dim-0 ``fully_shard`` shard on ``rank`` (``torch.chunk``: ``ceil(rows / world)`` each)."""
    c = -(-rows // world)
    return max(0, min(rows, c * (rank + 1)) - c * rank)


def _local_numel(shape: tuple[int, ...], world: int, rank: int, mode: str) -> int:
    numel = 1
    for s in shape:
        numel *= s
    if mode == "ddp" or not shape:
        return numel
    return numel // shape[0] * shard_rows(shape[0], world, rank)


def _muon_state_bytes(numel: int, cfg: Config) -> int:
    """One matrix's momentum bytes under ddp (Muon8bit's rule: int8 at ``min_quant_numel`` values and up)."""
    t = cfg.training
    if t.use_8bit_optim and numel >= DEFAULT_MIN_QUANT_NUMEL:
        nb = n_blocks_for(numel, t.quant_block_size)
        return nb * t.quant_block_size + 4 * nb  # int8 codes [nb, block] + fp32 scales [nb]
    return 4 * numel


def _check_served(cfg: Config) -> None:
    t = cfg.training
    other = [k for k, on in (("use_galore", t.use_galore), ("latent_dtype = bfloat16", t.latent_dtype != "float32"),
                             ("adamw_state", t.adamw_state != "fp32" or t.use_8bit_adamw),
                             ("optimizer_in_backward", t.optimizer_in_backward)) if on]
    if other:
        raise UserError(f"--ranks: the per-rank estimate covers fp32 / 8-bit Muon momentum with fp32 AdamW and "
                        f"fp32 weights, not {other[0]}: measure that config with `nanochat-train memory`")


def per_rank_memory(cfg: Config, world: int) -> dict[str, Any]:
    """``{"world", "modes": {"ddp"|"fsdp": {"ranks": [per-rank bytes], "max": ..., "vs_ddp"}}}``;
    each per-rank entry has ``param_bytes``, ``grad_bytes``, ``muon_state_bytes``,
    ``adamw_state_bytes``, ``optim_bytes``, ``total_bytes``."""
    if world < 1:
        raise UserError(f"--ranks must be >= 1, got {world}")
    _check_served(cfg)
    with torch.device("meta"):
        model = GPT(cfg.model)
    muon, adamw = split_params(model)
    out: dict[str, Any] = {"world": world, "modes": {}}
    for mode in MODES:
        owners = balance_owners([tuple(p.shape) for p in muon], world)  # ShardedMuon's, same order
        ranks = []
        for r in range(world):
            m = [_local_numel(tuple(p.shape), world, r, mode) for p in muon]
            a = [_local_numel(tuple(p.shape), world, r, mode) for p in adamw]
            params = 4 * (sum(m) + sum(a))
            if mode == "ddp":
                muon_b = sum(_muon_state_bytes(n, cfg) for n in m)
            elif cfg.training.use_8bit_optim:  # ShardedMuon8bit: the owner holds the matrix's momentum whole
                muon_b = sum(_muon_state_bytes(p.numel(), cfg) for p, o in zip(muon, owners) if o == r)
            else:  # ShardedMuon: fp32 momentum rows like the parameter's
                muon_b = 4 * sum(m)
            adamw_b = 8 * sum(a) + ADAMW_STEP_BYTES * len(a)
            ranks.append({"param_bytes": params, "grad_bytes": params, "muon_state_bytes": muon_b,
                          "adamw_state_bytes": adamw_b, "optim_bytes": muon_b + adamw_b,
                          "total_bytes": 2 * params + muon_b + adamw_b})
        out["modes"][mode] = {"ranks": ranks, "max": max(ranks, key=lambda x: x["total_bytes"])}
    base = out["modes"]["ddp"]["max"]["total_bytes"]
    for mode in MODES:
        out["modes"][mode]["vs_ddp"] = out["modes"][mode]["max"]["total_bytes"] / base
    return out


def format_per_rank(rep: dict[str, Any]) -> list[str]:
    """Text lines for the CLI: the busiest rank's bytes per mode (MiB)."""
    mib = 2 ** 20
    lines = [f"per rank at {rep['world']} ranks (the busiest rank; size arithmetic of the real run's sharding, "
             f"DDP reducer buckets and activations not included):",
             f"  {'mode':<5} {'params':>10} {'grads':>10} {'optimizer':>10} {'total':>10}  vs ddp"]
    for mode in MODES:
        m = rep["modes"][mode]
        x = m["max"]
        lines.append(f"  {mode:<5} {x['param_bytes'] / mib:>10.2f} {x['grad_bytes'] / mib:>10.2f} "
                     f"{x['optim_bytes'] / mib:>10.2f} {x['total_bytes'] / mib:>10.2f}  {m['vs_ddp']:.3f}  (MiB)")
    return lines
