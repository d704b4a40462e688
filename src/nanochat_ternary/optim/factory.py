"""Which parameters get which optimizer, the optimizers for a run, and their measured memory.

Split: Muon takes every 2-D parameter inside the transformer blocks (names starting with
``blocks.``): the attention and MLP matrices. AdamW takes the rest: token embedding, LM head, norms,
scalars, MTP heads. A parameter reachable by several names (tied embedding / head) is listed once,
and goes to Muon only if every one of its names is a block matrix. Frozen parameters
(``requires_grad=False``) are left out.

AdamW runs without weight decay: its parameters are embeddings, the head (tied to the embedding by
default), norm gains and scalars, where decay only pulls rarely-seen token rows and gains towards
zero (nanoGPT/nanochat practice). ``weight_decay`` in the config is Muon's (decoupled) decay.

Every param group gets ``initial_lr`` so a schedule can set ``group["lr"] = group["initial_lr"] * f``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn import Parameter

from ..config import ConfigError, TrainConfig
from .muon import Muon

MUON_PREFIX = "blocks."


def split_named_params(
    model: nn.Module,
) -> tuple[list[tuple[str, Parameter]], list[tuple[str, Parameter]]]:
    """``(muon, adamw)`` lists of ``(name, param)``, each param once, in registration order."""
    names: dict[int, list[str]] = {}
    params: dict[int, Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            continue
        names.setdefault(id(p), []).append(name)
        params.setdefault(id(p), p)
    muon: list[tuple[str, Parameter]] = []
    adamw: list[tuple[str, Parameter]] = []
    for key, p in params.items():
        all_names = names[key]
        to_muon = p.ndim == 2 and all(n.startswith(MUON_PREFIX) for n in all_names)
        (muon if to_muon else adamw).append((all_names[0], p))
    return muon, adamw


def split_params(model: nn.Module) -> tuple[list[Parameter], list[Parameter]]:
    """``(muon_params, adamw_params)``; see :func:`split_named_params`."""
    muon, adamw = split_named_params(model)
    return [p for _, p in muon], [p for _, p in adamw]


def _adamw_impl(params: list[Parameter], device: torch.device) -> dict[str, bool]:
    """Fused AdamW where torch has it for these params (CUDA and CPU, float params), else foreach."""
    if device.type in ("cuda", "cpu") and all(p.is_floating_point() and p.device.type == device.type
                                              for p in params):
        return {"fused": True}
    return {"foreach": True}


def build_optimizers(
    model: nn.Module, tcfg: TrainConfig, device: torch.device
) -> list[torch.optim.Optimizer]:
    """``[Muon(block matrices), AdamW(everything else)]``; an optimizer with no params is left out."""
    if tcfg.use_8bit_optim or tcfg.use_galore:
        raise ConfigError("use_8bit_optim / use_galore: the memory-efficient Muon variants are not "
                          "available yet in this version (set them to false)")
    muon_params, adamw_params = split_params(model)
    optimizers: list[torch.optim.Optimizer] = []
    if muon_params:
        optimizers.append(Muon(muon_params, lr=tcfg.lr, momentum=tcfg.muon_momentum,
                               ns_steps=tcfg.ns_steps, weight_decay=tcfg.weight_decay))
    if adamw_params:
        optimizers.append(torch.optim.AdamW(adamw_params, lr=tcfg.adam_lr, betas=tuple(tcfg.adam_betas),
                                            eps=tcfg.adam_eps, weight_decay=0.0,
                                            **_adamw_impl(adamw_params, torch.device(device))))
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors in ``opt.state`` (momentum, moments, step counters...)."""
    return sum(t.nbytes for state in opt.state.values() for t in _tensors(state))


def _numel(opt: torch.optim.Optimizer) -> int:
    return sum(p.numel() for g in opt.param_groups for p in g["params"])


def memory_report(optimizers: Iterable[torch.optim.Optimizer]) -> dict[str, float]:
    """Measured optimizer-state memory, split into Muon and the rest (AdamW).

    Params are element counts. State exists only after the first step, so call it after one.
    """
    muon_params = muon_bytes = adamw_params = adamw_bytes = 0
    for opt in optimizers:
        if isinstance(opt, Muon):
            muon_params += _numel(opt)
            muon_bytes += optimizer_state_bytes(opt)
        else:
            adamw_params += _numel(opt)
            adamw_bytes += optimizer_state_bytes(opt)
    return {
        "muon_params": muon_params,
        "muon_state_bytes": muon_bytes,
        "adamw_params": adamw_params,
        "adamw_state_bytes": adamw_bytes,
        "total_state_bytes": muon_bytes + adamw_bytes,
        "bytes_per_muon_param": muon_bytes / muon_params if muon_params else 0.0,
    }
