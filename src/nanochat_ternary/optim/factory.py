"""Which parameters get which optimizer, the optimizers for a run, and their measured memory.

Split: Muon takes every 2-D parameter inside the transformer blocks (names starting with
``blocks.``): the attention and MLP matrices. AdamW takes the rest: token embedding, LM head, norms,
scalars, MTP heads. A parameter reachable by several names (tied embedding / head) is listed once,
and goes to Muon only if every one of its names is a block matrix. Frozen parameters
(``requires_grad=False``) are left out.

AdamW runs without weight decay: its parameters are embeddings, the head (tied to the embedding by
default), norm gains and scalars, where decay only pulls rarely-seen token rows and gains towards
zero (nanoGPT/nanochat practice). ``weight_decay`` in the config is Muon's (decoupled) decay.

The Muon variant follows the config: ``use_8bit_optim`` -> :class:`Muon8bit` (int8 momentum),
``use_galore`` -> :class:`GaLoreMuon` (projected momentum; int8 too with both flags), else fp32
:class:`Muon`. AdamW's state follows ``adamw_state``: ``"fp32"`` torch's AdamW (8 B/param);
``"8bit"`` (or the older spelling ``use_8bit_adamw = true``) int8 ``m`` + bf16 ``v``,
:class:`~nanochat_ternary.optim.adamw_lowmem.AdamW8bit` (3.03 B/param); ``"foam"`` fp32 moments
folded over blocks of ``2^foam_fold_level`` values, :class:`~nanochat_ternary.optim.foam.AdamWFoam`
(8 / 2^level B/param).

Memory is measured, never computed: :func:`memory_report` sums the bytes of every tensor in the
optimizers' state after a step; :func:`measure_optimizer_state` does one step on fresh tensors of a
model's shapes and can add the fp32 Muon baseline measured the same way.

Every param group gets ``initial_lr`` so a schedule can set ``group["lr"] = group["initial_lr"] * f``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn import Parameter

from ..config import ConfigError, TrainConfig
from .adamw_lowmem import AdamW8bit
from .foam import AdamWFoam
from .galore import GaLoreMuon
from .low_precision import cast_params_
from .muon import Muon
from .quantized import Muon8bit

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


def adamw_state(tcfg: TrainConfig) -> str:
    """AdamW's state format, ``"fp32"``, ``"8bit"`` or ``"foam"`` (the config resolves the older
    ``use_8bit_adamw = true`` to ``"8bit"`` when it loads)."""
    return tcfg.adamw_state


def build_muon(params: list[Parameter], tcfg: TrainConfig) -> Muon:
    """The Muon variant ``tcfg`` asks for: Muon, Muon8bit, GaLoreMuon (with int8 momentum or not)."""
    if tcfg.stochastic_rounding and not (tcfg.use_8bit_optim or adamw_state(tcfg) == "8bit"):
        raise ConfigError("stochastic_rounding = true needs use_8bit_optim = true or adamw_state = '8bit' "
                          "(use_8bit_adamw = true) (it applies to the int8 momentum / first moment)")
    base = dict(lr=tcfg.lr, momentum=tcfg.muon_momentum, ns_steps=tcfg.ns_steps,
                weight_decay=tcfg.weight_decay, nesterov=tcfg.muon_nesterov, latent_rounding=tcfg.latent_rounding,
                seed=tcfg.seed)
    quant = dict(quantize=tcfg.use_8bit_optim, block_size=tcfg.quant_block_size,
                 stochastic_rounding=tcfg.stochastic_rounding)
    try:
        if tcfg.use_galore:
            return GaLoreMuon(params, **base, **quant, rank=tcfg.galore_rank,
                              update_freq=tcfg.galore_update_freq, min_dim=tcfg.galore_min_dim,
                              scale=tcfg.galore_scale, proj_dtype=tcfg.galore_proj_dtype)
        if tcfg.use_8bit_optim:
            return Muon8bit(params, **base, **quant)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return Muon(params, **base)


def _build(muon_params: list[Parameter], adamw_params: list[Parameter], tcfg: TrainConfig,
           device: torch.device) -> list[torch.optim.Optimizer]:
    optimizers: list[torch.optim.Optimizer] = []
    if muon_params:
        optimizers.append(build_muon(muon_params, tcfg))
    state = adamw_state(tcfg)
    if adamw_params and state == "foam":
        optimizers.append(AdamWFoam(adamw_params, lr=tcfg.adam_lr, betas=tuple(tcfg.adam_betas), eps=tcfg.adam_eps,
                                    weight_decay=0.0, fold_level=tcfg.foam_fold_level, seed=tcfg.seed))
    elif adamw_params and state == "8bit":
        optimizers.append(AdamW8bit(adamw_params, lr=tcfg.adam_lr, betas=tuple(tcfg.adam_betas), eps=tcfg.adam_eps,
                                    weight_decay=0.0, block_size=tcfg.quant_block_size,
                                    stochastic_rounding=tcfg.stochastic_rounding, seed=tcfg.seed))
    elif adamw_params:
        optimizers.append(torch.optim.AdamW(adamw_params, lr=tcfg.adam_lr, betas=tuple(tcfg.adam_betas),
                                            eps=tcfg.adam_eps, weight_decay=0.0,
                                            **_adamw_impl(adamw_params, torch.device(device))))
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def build_optimizers(
    model: nn.Module, tcfg: TrainConfig, device: torch.device
) -> list[torch.optim.Optimizer]:
    """``[Muon variant(block matrices), AdamW(everything else)]``; one with no params is left out.

    The Muon variant follows ``use_8bit_optim`` / ``use_galore`` (see :func:`build_muon`). With
    ``latent_dtype = "bfloat16"`` the Muon matrices are cast to bf16 here, in place: their storage
    is the optimizer's business, since it decides how they are written back (stochastic rounding).
    """
    muon_params, adamw_params = split_params(model)
    cast_params_(muon_params, getattr(torch, tcfg.latent_dtype))
    return _build(muon_params, adamw_params, tcfg, device)


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes of storage behind ``t``; a wrapper subclass (e.g. torchao's 8-bit state) is measured
    by its inner tensors, not by the dtype it presents."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor and type(t) is not Parameter:
        names, _ = t.__tensor_flatten__()
        # inner tensors only (a DTensor also names its device mesh): a DTensor is its local shard
        return sum(tensor_nbytes(x) for n in names if isinstance(x := getattr(t, n), torch.Tensor))
    return t.nbytes


def _tensors(obj: Any, depth: int = 0) -> Iterable[torch.Tensor]:
    """Tensors reachable from an optimizer's per-parameter state: through dicts, lists and plain
    objects (galore-torch keeps its projector matrix on a projector object)."""
    if depth > 6:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, nn.Module)):
        for v in vars(obj).values():
            yield from _tensors(v, depth + 1)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors in ``opt.state`` (momentum, moments, projectors, step counters...),
    whatever optimizer it is (ours, torch's, bitsandbytes', torchao's, galore-torch's). Tensors that
    share a storage are counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for state in opt.state.values():
        for t in _tensors(state):
            if type(t) is torch.Tensor or type(t) is Parameter:
                ptr = t.untyped_storage().data_ptr()
                key = (ptr, t.untyped_storage().nbytes()) if ptr else (id(t), 0)
                nbytes = t.untyped_storage().nbytes() if ptr else t.nbytes
            else:  # a wrapper subclass (torchao): measured by its inner tensors
                key, nbytes = (id(t), 0), tensor_nbytes(t)
            if key not in seen:
                seen.add(key)
                total += nbytes
    return total


def _numel(opt: torch.optim.Optimizer) -> int:
    return sum(p.numel() for g in opt.param_groups for p in g["params"])


def memory_report(optimizers: Iterable[torch.optim.Optimizer]) -> dict[str, Any]:
    """Measured optimizer-state memory, split into Muon and the rest (AdamW).

    ``variant`` names the Muon variant ("muon", "muon-8bit", "galore-muon", "galore-muon-8bit";
    "none" without Muon). Params are element counts; ``muon_int8_tensors`` counts int8 momenta and
    ``galore_projected`` projected matrices (so both flags visibly take effect). State exists only
    after the first step, so call it after one.
    """
    variant = "none"
    muon_params = muon_bytes = adamw_params = adamw_bytes = int8_tensors = projected = 0
    for opt in optimizers:
        if isinstance(opt, Muon):
            variant = opt.variant
            muon_params += _numel(opt)
            muon_bytes += optimizer_state_bytes(opt)
            for st in opt.state.values():
                int8_tensors += "momentum_codes" in st
                projected += "projector" in st
        else:
            adamw_params += _numel(opt)
            adamw_bytes += optimizer_state_bytes(opt)
    return {
        "variant": variant,
        "muon_params": muon_params,
        "muon_state_bytes": muon_bytes,
        "adamw_params": adamw_params,
        "adamw_state_bytes": adamw_bytes,
        "total_state_bytes": muon_bytes + adamw_bytes,
        "bytes_per_muon_param": muon_bytes / muon_params if muon_params else 0.0,
        "muon_int8_tensors": int8_tensors,
        "galore_projected": projected,
    }


def _measure(shapes: tuple[list[tuple[int, ...]], list[tuple[int, ...]]], tcfg: TrainConfig,
             seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    made = [[Parameter(torch.randn(s, generator=g) * 0.02) for s in part] for part in shapes]
    for p in made[0] + made[1]:
        p.grad = torch.randn(p.shape, generator=g)
    # one Newton–Schulz iteration is enough: the state does not depend on it, and it keeps the
    # measurement cheap (a full fp32 Muon step of a 125M model takes ~15 s on 2 CPU cores)
    optimizers = _build(made[0], made[1], dataclasses.replace(tcfg, ns_steps=1), torch.device("cpu"))
    for opt in optimizers:
        opt.step()
    return memory_report(optimizers)


def measure_optimizer_state(model: nn.Module, tcfg: TrainConfig, baseline: bool = True,
                            seed: int = 0) -> dict[str, Any]:
    """Build ``tcfg``'s optimizers for ``model``'s parameter shapes, run one step, report memory.

    Measured on fresh CPU tensors of the same shapes with random gradients, so ``model`` (which
    may live on any device, or on ``meta``) is left untouched. With ``baseline`` the fp32 Muon of
    the same parameters is measured the same way and the report gains ``fp32_muon_state_bytes``
    and ``muon_state_vs_fp32`` (this variant's Muon state / fp32 Muon's).
    """
    muon, adamw = split_params(model)
    shapes = ([tuple(p.shape) for p in muon], [tuple(p.shape) for p in adamw])
    rep = _measure(shapes, tcfg, seed)
    if baseline:
        base = rep if rep["variant"] in ("muon", "none") else _measure(
            shapes, dataclasses.replace(tcfg, use_8bit_optim=False, use_galore=False,
                                        stochastic_rounding=False), seed)
        rep["fp32_muon_state_bytes"] = base["muon_state_bytes"]
        rep["muon_state_vs_fp32"] = (rep["muon_state_bytes"] / base["muon_state_bytes"]
                                     if base["muon_state_bytes"] else 0.0)
    return rep
