"""Muon on FSDP2-sharded parameters: each matrix orthogonalised whole on one owner rank.

Why
---
Newton–Schulz needs the whole matrix (``U V^T`` of a row slice is not a row slice of ``U V^T``),
but under FSDP2 (``fully_shard``) every rank holds only rows ``[r c, (r + 1) c)`` of each matrix
(``c = ceil(rows / world)``, a ``DTensor`` with placement ``Shard(0)``) and only those rows of its
gradient. PyTorch's own ``torch.optim.Muon`` does not handle that. This is the ZeRO-1 / DistMuon
scheme (Moonlight, nanochat):

    every rank:   buf_r <- mu buf_r + (1 - mu) g_r;  u_r <- lerp(g_r, buf_r, mu)   (its rows only)
    all-to-all:   the owner of matrix i receives every rank's rows u_r of i  ->  whole u_i
    owner:        O_i <- NewtonSchulz5(u_i)
    all-to-all:   rank r receives its rows O_i[r c:(r + 1) c] back from the owner
    every rank:   p_r <- p_r (1 - lr wd) - lr sqrt(max(1, rows / cols)) O_r

The momentum is elementwise, so advancing it on the shards is the same arithmetic as advancing the
whole buffer (it stays sharded: ``1 / world`` of fp32 Muon's state per rank, a ``DTensor`` like the
parameter, so ``torch.distributed.checkpoint`` reshards it). Only the matrices to orthogonalise
travel, twice: ``2 (world - 1) / world`` of the Muon parameters' fp32 bytes per step in and out of
each rank, the volume of one all-reduce of those parameters.

Owners are balanced by Newton–Schulz FLOPs: matrix ``[m, n]`` (``s = min(m, n)``, ``l = max``) costs
``~ s^2 (4 l + 2 s)`` per iteration; matrices are assigned greedily, largest first, to the least
loaded rank (LPT scheduling, within 4/3 of the best balance), the same on every rank without
communication. Matrices are sent in buckets of at most ``bucket_elements`` values (all ranks'
rows together), which bounds the extra memory of a step.

With the same inputs the owner's Newton–Schulz is the same computation as the single-process and
DDP steps, so the weights differ from DDP's only by the gradient reduction's float summation order.

Scope: fp32 Muon (Nesterov or not, any lr / weight decay per group), 8-bit momentum
(:class:`ShardedMuon8bit`: held whole by the owner) and GaLore momentum (:class:`ShardedGaLoreMuon`,
the same way). bf16 latents are refused under FSDP by the config checks for now.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from ..config import TrainConfig
from .factory import split_params
from .galore import GaLoreMuon
from .muon import STACK_ELEMENTS, Muon
from .quantized import Muon8bit


def ns_flops(rows: int, cols: int) -> int:
    """Relative cost of one Newton–Schulz iteration on a ``rows x cols`` matrix (Gram, square, apply)."""
    s, big = min(rows, cols), max(rows, cols)
    return s * s * (4 * big + 2 * s)


def balance_owners(shapes: list[tuple[int, int]], world: int) -> list[int]:
    """Owner rank of each matrix: largest Newton–Schulz cost first to the least loaded rank (ties:
    lowest index, lowest rank), so every rank computes the same answer."""
    load = [0] * world
    owners = [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: (-ns_flops(*shapes[i]), i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += ns_flops(*shapes[i])
    return owners


def _chunk_rows(rows: int, world: int) -> int:
    """Rows per rank under FSDP2's dim-0 sharding (``torch.chunk``: the last ranks may hold fewer)."""
    return -(-rows // world)


class ShardedMuon(Muon):
    """:class:`~nanochat_ternary.optim.muon.Muon` for ``DTensor`` parameters sharded on dim 0 over a
    1-D mesh (FSDP2). Same arguments as Muon, plus ``bucket_elements`` (see the module docstring).
    Its state (``momentum_buffer``) is a ``DTensor`` placed like its parameter."""

    variant_name = "muon"

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], *args: Any,
                 bucket_elements: int = STACK_ELEMENTS, **kwargs: Any) -> None:
        self.bucket_elements = bucket_elements
        self._owners: dict[int, int] | None = None
        super().__init__(params, *args, **kwargs)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if not (isinstance(p, DTensor) and p.device_mesh.ndim == 1 and tuple(p.placements) == (Shard(0),)):
                self.param_groups.pop()
                raise ValueError("ShardedMuon takes DTensor parameters sharded on dim 0 over a 1-D mesh "
                                 "(fully_shard); use Muon for plain tensors")
            if p.dtype != torch.float32:
                self.param_groups.pop()
                raise ValueError(f"ShardedMuon takes fp32 parameters, got {p.dtype}")
        self._owners = None

    def owner_of(self, p: Tensor, world: int) -> int:
        """The rank that orthogonalises ``p`` (:func:`balance_owners` over all of this optimizer's matrices)."""
        if self._owners is None:
            params = [q for g in self.param_groups for q in g["params"]]
            owners = balance_owners([tuple(q.shape) for q in params], world)
            self._owners = {id(q): o for q, o in zip(params, owners)}
        return self._owners[id(p)]

    def _shard_momentum(self, p: DTensor, group: dict[str, Any]) -> Tensor:
        """Advance this rank's rows of the momentum; return its rows of the matrix to orthogonalise."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            local = torch.zeros_like(p.to_local(), dtype=torch.float32, memory_format=torch.contiguous_format)
            state["momentum_buffer"] = DTensor.from_local(local, p.device_mesh, p.placements,
                                                          shape=p.shape, stride=p.stride(), run_check=False)
        buf = state["momentum_buffer"].to_local()  # [local rows, cols], a view: updated in place
        g = p.grad.to_local().float()
        mu = group["momentum"]
        buf.lerp_(g, 1 - mu)
        return g.lerp(buf, mu) if group["nesterov"] else buf

    def _send_rows(self, p: DTensor, group: dict[str, Any]) -> Tensor:
        """This rank's rows of what the owner of ``p`` needs: the (Nesterov) momentum update here."""
        return self._shard_momentum(p, group)

    def _owner_direction(self, p: DTensor, whole: Tensor, group: dict[str, Any]) -> Tensor:
        """On the owner: the orthogonalised update of ``p`` from the assembled ``whole`` ([rows, cols])."""
        return self._orthogonalize(whole, group)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries = [(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None]
        bucket: list[tuple[DTensor, dict[str, Any]]] = []
        size = 0
        for p, group in entries:
            if bucket and size + p.numel() > self.bucket_elements:
                self._step_bucket(bucket)
                bucket, size = [], 0
            bucket.append((p, group))
            size += p.numel()
        if bucket:
            self._step_bucket(bucket)
        return loss

    def _step_bucket(self, bucket: list[tuple[DTensor, dict[str, Any]]]) -> None:
        """Momentum on the shards, gather to owners, Newton–Schulz, scatter back, apply (module docstring)."""
        mesh = bucket[0][0].device_mesh
        pg, world, rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
        owners = [self.owner_of(p, world) for p, _ in bucket]
        chunk = [_chunk_rows(p.size(0), world) * p.size(1) for p, _ in bucket]  # padded values per rank
        mine = [i for i, o in enumerate(owners) if o == rank]
        to_owner = [sum(chunk[i] for i, o in enumerate(owners) if o == j) for j in range(world)]
        from_each = [sum(chunk[i] for i in mine)] * world
        device = bucket[0][0].device
        send = torch.zeros(sum(to_owner), dtype=torch.float32, device=device)
        offsets = _layout(owners, chunk, world)  # offsets[i]: where matrix i's rows sit in its owner's part
        for i, (p, group) in enumerate(bucket):
            u = self._send_rows(p, group).reshape(-1)  # [local rows * cols]
            start = sum(to_owner[:owners[i]]) + offsets[i]
            send[start:start + u.numel()].copy_(u)
        recv = torch.empty(sum(from_each), dtype=torch.float32, device=device)
        dist.all_to_all_single(recv, send, from_each, to_owner, group=pg)
        # recv: from each rank s, that rank's (padded) rows of every matrix this rank owns, in bucket order
        back = torch.empty_like(recv)
        per_rank = from_each[0]
        for i in mine:
            p, group = bucket[i]
            rows, cols = p.shape
            c = chunk[i] // cols
            full = torch.stack([recv[s * per_rank + offsets[i]:s * per_rank + offsets[i] + chunk[i]]
                                for s in range(world)]).view(world * c, cols)  # [world * c, cols]
            ortho = torch.zeros_like(full)
            ortho[:rows] = self._owner_direction(p, full[:rows], group)  # [rows, cols]
            for s in range(world):
                back[s * per_rank + offsets[i]:s * per_rank + offsets[i] + chunk[i]].copy_(
                    ortho[s * c:(s + 1) * c].reshape(-1))
        mine_back = torch.empty_like(send)
        dist.all_to_all_single(mine_back, back, to_owner, from_each, group=pg)
        for i, (p, group) in enumerate(bucket):
            local = p.to_local()  # [local rows, cols], a view of the shard: updated in place
            start = sum(to_owner[:owners[i]]) + offsets[i]
            direction = mine_back[start:start + local.numel()].view_as(local)
            lr, wd = group["lr"], group["weight_decay"]
            scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
            if wd != 0:
                local.mul_(1 - lr * wd)
            local.add_(direction, alpha=-lr * scale)


def _layout(owners: list[int], chunk: list[int], world: int) -> list[int]:
    """Offset of each matrix's padded rows inside the part of the buffer that goes to its owner."""
    filled = [0] * world
    offsets = []
    for o, n in zip(owners, chunk):
        offsets.append(filled[o])
        filled[o] += n
    return offsets


class ShardedMuon8bit(ShardedMuon, Muon8bit):
    """8-bit Muon on ``fully_shard``-ed parameters: the owner rank keeps the int8 blockwise momentum
    of each matrix it owns, whole (Muon8bit's blocks over the flattened matrix, so the same codes,
    scales and stochastic-rounding streams as in one process or under DDP).

    Each rank sends its rows of the *gradient* to the owner (the same all-to-all as
    :class:`ShardedMuon`, which sends its momentum rows instead); the owner dequantises, advances
    and requantises the momentum (``Muon8bit._momentum_update``), runs Newton–Schulz and returns the
    rows. Per rank: ``1.03 B`` per value of the matrices it owns (owners balanced by Newton–Schulz
    FLOPs, so about ``1 / world`` of the Muon values), against 8-bit DDP's ``1.03 B`` per value of
    all of them. Every rank keeps the step counter of every matrix (identical everywhere), so no
    rank's state is empty (torch's checkpoint helpers would otherwise run a lone fake step)."""

    variant_name = "muon-8bit"

    def _send_rows(self, p: DTensor, group: dict[str, Any]) -> Tensor:
        return p.grad.to_local().float()

    def _owner_direction(self, p: DTensor, whole: Tensor, group: dict[str, Any]) -> Tensor:
        return self._orthogonalize(self._momentum_update(p, whole, self.state[p], group), group)

    def _step_bucket(self, bucket: list[tuple[DTensor, dict[str, Any]]]) -> None:
        super()._step_bucket(bucket)
        world, rank = bucket[0][0].device_mesh.size(), bucket[0][0].device_mesh.get_local_rank()
        for p, _ in bucket:  # the owner advanced it in _momentum_update; the others keep count
            if self.owner_of(p, world) != rank:
                self.state[p]["step"] = self.state[p].get("step", 0) + 1


class ShardedGaLoreMuon(ShardedMuon8bit, GaLoreMuon):
    """GaLore Muon (int8 projected momentum or fp32) on ``fully_shard``-ed parameters, the
    :class:`ShardedMuon8bit` way: the owner rank holds each owned matrix's projector and projected
    momentum, projects the assembled gradient, orthogonalises, projects back and returns the rows."""

    variant_name = "galore-muon"

    def _owner_direction(self, p: DTensor, whole: Tensor, group: dict[str, Any]) -> Tensor:
        update = self._momentum_update(p, whole, self.state[p], group)
        return self._back_project(p, self._orthogonalize(update, group), group)


def build_sharded_optimizers(model: torch.nn.Module, tcfg: TrainConfig,
                             bucket_elements: int = STACK_ELEMENTS) -> list[torch.optim.Optimizer]:
    """``[ShardedMuon(block matrices), AdamW(the rest)]`` for a ``fully_shard``-ed model, with the
    hyperparameters :func:`~nanochat_ternary.optim.factory.build_optimizers` uses. AdamW steps its
    ``DTensor`` shards elementwise (torch's fused CPU/CUDA kernels take them)."""
    muon_params, adamw_params = split_params(model)
    optimizers: list[torch.optim.Optimizer] = []
    if muon_params:
        base = dict(lr=tcfg.lr, momentum=tcfg.muon_momentum, ns_steps=tcfg.ns_steps, weight_decay=tcfg.weight_decay,
                    nesterov=tcfg.muon_nesterov, seed=tcfg.seed, bucket_elements=bucket_elements)
        if tcfg.use_galore:
            optimizers.append(ShardedGaLoreMuon(
                muon_params, **base, quantize=tcfg.use_8bit_optim, block_size=tcfg.quant_block_size,
                stochastic_rounding=tcfg.stochastic_rounding, rank=tcfg.galore_rank,
                update_freq=tcfg.galore_update_freq, min_dim=tcfg.galore_min_dim, scale=tcfg.galore_scale,
                proj_dtype=tcfg.galore_proj_dtype))
        elif tcfg.use_8bit_optim:
            optimizers.append(ShardedMuon8bit(muon_params, **base, block_size=tcfg.quant_block_size,
                                              stochastic_rounding=tcfg.stochastic_rounding))
        else:
            optimizers.append(ShardedMuon(muon_params, **base))
    if adamw_params:
        optimizers.append(torch.optim.AdamW(adamw_params, lr=tcfg.adam_lr, betas=tuple(tcfg.adam_betas),
                                            eps=tcfg.adam_eps, weight_decay=0.0, fused=True))
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers
