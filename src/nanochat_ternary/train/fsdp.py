"""``parallelism = "fsdp"``: the model sharded with PyTorch's FSDP2 (``fully_shard``) over all ranks.

Each transformer block is one FSDP unit (its parameters all-gathered just before its forward and
backward, freed after, gradients reduce-scattered), then the root takes what is left: the token
embedding (tied to the LM head), the final norm and the MTP heads. Every parameter, BitLinear's
fp32 shadow weights included, is a ``DTensor`` sharded on dim 0; each rank keeps ``1 / world`` of
the weights, gradients and optimizer state (:mod:`~nanochat_ternary.optim.sharded_muon` steps the
Muon matrices, torch's AdamW the rest).

Mixed precision: the policy gathers the fp32 shadow weights and reduces gradients in fp32, and the
trainer keeps today's bf16 autocast on CUDA around the forward, so the ternary quantiser reads the
same fp32 weights as under DDP and the matmuls run in bf16 exactly as they do there (an fp32 CPU run
is fp32 throughout). Gathering bf16 instead would halve the all-gather but change what the
quantiser's absmean scale sees; the 2-bit gather (docs/scaling.md) is the planned way to cut it.

With one process there is nothing to shard: ``fsdp`` then runs the plain single-process path, as
``ddp`` does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..config import ModelConfig
from ..model.gpt import GPT
from .runtime import Runtime

# fp32 gathers (the quantiser's input as under DDP) and fp32 gradient reduction; autocast does bf16
MIXED_PRECISION = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)


def shard_model(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """``fully_shard`` every block, then the root, over a 1-D mesh of all ranks (in place; returns
    ``model``). Build the optimizers after this: the parameters are replaced by ``DTensor`` shards."""
    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=MIXED_PRECISION)
    fully_shard(model, mesh=mesh, mp_policy=MIXED_PRECISION)
    return model


def gradient_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """FSDP's ``no_sync``: with ``sync`` False the micro-batch's gradients accumulate unreduced (the
    last micro-batch of a step, ``sync`` True, reduce-scatters the sum), as DDP's ``no_sync`` does.
    Sets the flag now, for the forward and backward that follow; returns a null context so the
    trainer uses it where it uses DDP's."""
    model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global grad norm over the sharded gradients (a plain tensor, the same on every rank), and the
    gradients scaled to at most ``max_norm`` as ``torch.nn.utils.clip_grad_norm_`` does."""
    with_grad = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad], 2.0)
    if isinstance(norm, DTensor):  # partial sums of squares on each rank: reduce them
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, norm)  # takes the parameters, not grads
    return norm


def even_share(items: list, rank: int, world: int) -> list[tuple[object, bool]]:
    """``items[rank::world]`` padded to the same length on every rank, as ``(item, counts)`` pairs.

    Under FSDP every forward is a collective (the blocks' all-gathers), so every rank must run the
    same number of them: a rank with fewer items runs ``items[0]`` again with ``counts`` False."""
    mine = items[rank::world]
    n = -(-len(items) // world)
    return [(x, True) for x in mine] + [(items[0], False)] * (n - len(mine)) if items else []


def empty_cpu_model(cfg: ModelConfig) -> GPT:
    """An unsharded CPU GPT of ``cfg``'s shape, allocated but not initialised (the checkpoint save
    fills it with the gathered weights to write ``model.safetensors``)."""
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    if cfg.weight_tied:  # to_empty gives each use of the tied weight its own tensor
        model.lm_head.weight = model.tok_emb.weight
    return model
