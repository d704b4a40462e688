"""Muon: MomentUm Orthogonalized by Newton–Schulz (after Keller Jordan's Muon).

Why
---
For a hidden weight matrix ``W`` (``rows x cols``) the gradient-momentum matrix ``M = U S V^T`` is
usually dominated by a few directions: its singular values span orders of magnitude, so an SGD or
Adam step mostly moves ``W`` along those few directions. Muon replaces the step by the nearest
semi-orthogonal matrix, ``O = U V^T`` (every singular value set to 1). That is the steepest-descent
direction under the spectral norm: it changes every direction of ``W`` that the momentum points
along by the same amount, which in practice trains transformers' hidden matrices faster than AdamW
at the same cost, with one fp32 buffer per parameter (AdamW keeps two).

The maths
---------
An SVD per step is too slow, so ``U V^T`` is approximated by an odd matrix polynomial applied to
``X_0 = M / (||M||_F + 1e-7)`` (the Frobenius norm bounds the spectral norm, so all singular values
start in (0, 1]). One quintic Newton–Schulz step is

    A = X X^T,   B = b A + c A A,   X <- a X + B X     (a, b, c) = (3.4445, -4.7750, 2.0315)

which maps each singular value independently, ``s -> a s + b s^3 + c s^5``, and keeps the singular
vectors. The coefficients make the slope at zero large (``a``) so that tiny singular values grow fast,
at the price of not converging to exactly 1: after 5 steps singular values that started
non-negligible sit in roughly [0.7, 1.2], which is as good as exact for optimisation. For a tall
``X`` (``rows > cols``) the step is its transpose, ``A = X^T X``, ``X <- a X + X B``: the Gram
matrix is always the smaller one, and the result keeps ``G``'s layout (no transposed view for the
weight update to read with strides). The iteration is stable in bf16, which is what it runs in on
CUDA; on CPUs bf16 matmul is ~100x slower than fp32, so there it runs in fp32.

The step, per 2-D parameter ``p`` with gradient ``g`` (momentum ``mu``, learning rate ``lr``):

    buf    <- mu * buf + (1 - mu) * g                  (EMA momentum, fp32)
    u      <- (1 - mu) * g + mu * buf  if nesterov else buf
    O      <- NewtonSchulz5(u)
    p      <- p * (1 - lr * weight_decay)              (decoupled weight decay)
    p      <- p - lr * sqrt(max(1, rows / cols)) * O

The ``sqrt(max(1, rows/cols))`` factor keeps the per-element RMS of the update similar for tall
matrices, whose orthogonalised update has smaller entries.

Distributed
-----------
When ``torch.distributed`` is initialised with more than one process, gradients are assumed already
averaged (DDP). Every rank updates the momentum of every parameter (cheap, identical everywhere, so
``state_dict()`` is identical on all ranks), but only one rank runs Newton–Schulz for a parameter:
parameter ``i`` of the optimizer's flattened parameter list (all groups, in order) belongs to rank
``i % world_size``. Parameters are processed in rounds of ``world_size`` consecutive ones; in each
round every rank updates the parameter it owns, copies it into a flat buffer padded to the round's
largest parameter and starts an asynchronous ``all_gather``; while the next round computes, the
previous round's gathered buffers are copied into the other ranks' parameters. Extra memory is two
rounds of padded buffers. Parameters without a gradient are still sent (unchanged, so identical).
Where the step is stacked (see ``_use_stacks``: CUDA), the split is by stack instead: each
same-shape stack is cut into ``world`` contiguous slices, each rank runs one batched Newton–Schulz
on its slice and one all-gather into a single tensor returns the whole stack to every rank.

Variants
--------
The step is split into hooks that subclasses replace: ``_momentum_update`` (advance the momentum,
return the matrix to orthogonalise; run on every rank), ``_orthogonalize`` and ``_apply_update``
(only on the owning rank). :class:`~nanochat_ternary.optim.quantized.Muon8bit` keeps the momentum
as int8 blocks; :class:`~nanochat_ternary.optim.galore.GaLoreMuon` projects momentum and
Newton–Schulz into a rank-``r`` subspace (optionally with int8 momentum too).

Low memory (docs/low_memory.md): :meth:`Muon.step_param` steps one parameter from one micro-batch's
gradient (the step inside the backward, :mod:`~nanochat_ternary.optim.in_backward`), and a bf16
parameter is a 2-byte latent weight: the update runs in fp32 and is written back with stochastic
rounding (:mod:`~nanochat_ternary.optim.low_precision`). ``state_dict()``
holds only tensors and plain values (``torch.load(weights_only=True)`` reads it), and
``load_state_dict`` restores every state tensor with its saved dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .base import StatefulOptimizer
from .low_precision import (
    LATENT_ROUNDINGS,
    STREAM_LATENT,
    is_low_precision,
    seeded_generator,
    write_latent,
)

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
STACK_ELEMENTS = 1 << 27  # most values in one batched Newton–Schulz stack (512 MB in fp32)


def default_ns_dtype(device: torch.device) -> torch.dtype:
    """The dtype Newton–Schulz runs in by default: bf16 on CUDA, fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> Tensor:
    """Approximate ``U V^T`` for ``G = U S V^T`` (over the last two dims; leading dims are a batch).

    Runs in ``dtype`` (None: bf16 on CUDA, fp32 otherwise) and returns a tensor in ``G``'s dtype.
    """
    if G.ndim < 2:
        raise ValueError(f"Newton–Schulz needs a matrix, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype or default_ns_dtype(G.device))
    tall = G.size(-2) > G.size(-1)
    batch_shape = X.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:]) if X.ndim > 2 else X  # one batch dim (or none) for the BLAS forms
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + NS_EPS)
    mm, addmm = (torch.bmm, torch.baddbmm) if X.ndim == 3 else (torch.mm, torch.addmm)
    for _ in range(steps):
        if tall:  # the transpose of the wide step: Gram X^T X (cols x cols), multiplied from the right
            A = mm(X.mT, X)
            B = addmm(A, A, A, beta=b, alpha=c)  # b*A + c*A@A
            X = addmm(X, X, B, beta=a)  # a*X + X@B
        else:
            A = mm(X, X.mT)
            B = addmm(A, A, A, beta=b, alpha=c)
            X = addmm(X, B, X, beta=a)  # a*X + B@X
    return X.reshape(*batch_shape, *X.shape[-2:]).to(G.dtype)


# torch >= 2.13 renamed all_gather_into_tensor (which now warns); the GPU hosts run 2.11
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)


def _dist_world_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class Muon(StatefulOptimizer):
    """Muon for 2-D parameters (hidden weight matrices). See the module docstring.

    Args:
        params: 2-D parameters or param groups.
        lr: learning rate (scaled per matrix by ``sqrt(max(1, rows/cols))``).
        momentum: EMA coefficient of the momentum buffer.
        nesterov: use the Nesterov-style ``lerp(grad, buf, momentum)`` as the update.
        ns_steps: Newton–Schulz iterations.
        weight_decay: decoupled weight decay (``p *= 1 - lr * weight_decay``).
        ns_dtype: dtype of the Newton–Schulz iteration: a torch dtype or its name ("float32",
            "bfloat16"); None picks bf16 on CUDA and fp32 otherwise. Stored by name in the param
            groups so that ``state_dict()`` holds only plain values.
        latent_rounding: how a bf16/fp16 parameter (a low-precision latent weight) is written back
            after the fp32 update: "stochastic" (unbiased, see
            :mod:`~nanochat_ternary.optim.low_precision`) or "nearest". fp32 parameters are updated
            in place and never rounded.
        seed: seeds the stochastic-rounding streams (with parameter index and step).
        stacked: step same-shape matrices as one batched stack (see :meth:`_use_stacks`); None:
            on CUDA only.
    """

    variant_name = "muon"
    stacked: bool | None = None  # see _use_stacks (subclasses that build their own defaults inherit it)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        ns_dtype: torch.dtype | str | None = None,
        *,
        latent_rounding: str = "stochastic",
        seed: int = 0,
        stacked: bool | None = None,
    ) -> None:
        self.stacked = stacked
        super().__init__(params, muon_defaults(lr, momentum, nesterov, ns_steps, weight_decay, ns_dtype,
                                               latent_rounding, seed))

    @property
    def variant(self) -> str:
        """Short name of the variant, as in the memory report."""
        return self.variant_name

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["ns_dtype"] = _dtype_name(group["ns_dtype"])
        for p in group["params"]:
            if p.ndim != 2:
                self.param_groups.pop()
                raise ValueError(f"Muon only takes 2-D parameters, got one of shape {tuple(p.shape)} "
                                 "(give embeddings, norms and scalars to AdamW)")
        if group["latent_rounding"] not in LATENT_ROUNDINGS:
            self.param_groups.pop()
            raise ValueError(f"Muon: latent_rounding must be one of {LATENT_ROUNDINGS}, "
                             f"got {group['latent_rounding']!r}")
        self._build_index()

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise KeyError(f"{type(self).__name__}: parameter of shape {tuple(p.shape)} is not in this optimizer")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``StatefulOptimizer.load_state_dict`` (state keeps its saved dtype: the fp32 momentum of a
        bf16 parameter, int8 codes, bf16 projectors), and hyperparameters missing from the saved groups
        (a state dict of a simpler variant, e.g. fp32 Muon loaded into 8-bit Muon) take this
        optimizer's defaults."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def _check_loaded_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        self._check_state(p, state, group)

    _STATE_KEYS: frozenset[str] = frozenset({"momentum_buffer", "latent_step"})

    def _momentum_numel(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> int:
        """How many values the momentum of ``p`` holds (GaLore: the projected size)."""
        return p.numel()

    def _check_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Refuse state this variant cannot use (e.g. another variant's), instead of misreading it."""
        unknown = set(state) - self._STATE_KEYS
        buf = state.get("momentum_buffer")
        bad = buf is not None and buf.numel() != self._momentum_numel(p, state, group)
        if unknown or bad:
            raise ValueError(f"{type(self).__name__}: the saved state of a {tuple(p.shape)} parameter "
                             f"({sorted(state)}) does not fit this optimizer's variant or settings")

    # --- the update, in pieces a subclass can replace (8-bit momentum, GaLore projection) ------

    def _momentum_update(
        self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> Tensor:
        """Advance the momentum with ``grad``; return the matrix to orthogonalise (fp32)."""
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32,
                                                        memory_format=torch.contiguous_format)
        buf = state["momentum_buffer"]
        mu = group["momentum"]
        grad = grad.float()
        buf.lerp_(grad, 1 - mu)
        return grad.lerp(buf, mu) if group["nesterov"] else buf

    @staticmethod
    def _ns_dtype(group: dict[str, Any], device: torch.device) -> torch.dtype:
        """The group's ``ns_dtype``, or the device's default (bf16 on CUDA, fp32 elsewhere)."""
        return getattr(torch, group["ns_dtype"]) if group["ns_dtype"] else default_ns_dtype(device)

    def _orthogonalize(self, update: Tensor, group: dict[str, Any]) -> Tensor:
        return zeropower_via_newtonschulz5(update, steps=group["ns_steps"],
                                           dtype=self._ns_dtype(group, update.device))

    def _apply_update(self, p: Tensor, direction: Tensor, group: dict[str, Any]) -> None:
        """``p <- p (1 - lr wd) - lr sqrt(max(1, rows/cols)) direction``, in fp32.

        An fp32 ``p`` is updated in place. A low-precision latent (bf16/fp16 ``p``) is read into
        fp32, updated there and written back with ``latent_rounding`` (stochastic: from a stream
        keyed by ``(seed, parameter index, latent_step)``, so it resumes exactly).
        """
        lr, wd = group["lr"], group["weight_decay"]
        scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
        low = is_low_precision(p)
        w = p.float() if low else p
        if wd != 0:
            w.mul_(1 - lr * wd)
        w.add_(direction.to(w.dtype), alpha=-lr * scale)
        if low:
            state = self.state[p]
            step = state.get("latent_step", 0)
            gen = None
            if group["latent_rounding"] == "stochastic":
                gen = seeded_generator(p.device, group["seed"], STREAM_LATENT, self._param_index(p), step)
            write_latent(p, w, stochastic=gen is not None, generator=gen)
            state["latent_step"] = step + 1

    def _update_param(self, p: Tensor, group: dict[str, Any]) -> None:
        update = self._momentum_update(p, p.grad, self.state[p], group)
        self._apply_update(p, self._orthogonalize(update, group), group)

    # --- the step of one parameter inside the backward (optim/in_backward.py) -------------------

    def _accumulate(self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any],
                    micro: int, n_micro: int) -> Tensor | None:
        """Add micro-batch ``micro`` of ``n_micro`` into the (plain EMA) momentum.

        ``buf <- mu buf`` at the first micro-batch, ``buf <- buf + (1 - mu) g_k`` at every one, so
        after the last ``buf = mu buf_old + (1 - mu) sum_k g_k``: the normal step's momentum for
        the accumulated gradient, up to float summation order. Returns the matrix to orthogonalise
        after the last micro-batch (``buf``: Nesterov is refused with accumulation, see
        :meth:`step_param`), else None.
        """
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32,
                                                        memory_format=torch.contiguous_format)
        buf = state["momentum_buffer"]
        if micro == 0:
            buf.mul_(group["momentum"])
        buf.add_(grad.float(), alpha=1 - group["momentum"])
        return buf if micro == n_micro - 1 else None

    @torch.no_grad()
    def step_param(self, p: Tensor, grad: Tensor, micro: int = 0, n_micro: int = 1) -> None:
        """Update one parameter from micro-batch ``micro`` of ``n_micro`` of its gradient ``grad``.

        With ``n_micro == 1`` this is exactly what :meth:`step` does for ``p`` (same code). With
        more, each micro-batch's gradient goes straight into the momentum (see
        :meth:`_accumulate`) and the update is applied at the last one. The Nesterov update
        ``(1 - mu) G + mu buf_new`` needs the step's whole gradient ``G`` next to the momentum (two
        matrices where the plain EMA needs one: no single running buffer can hold both), so
        accumulation requires ``nesterov=False``. Single process only (gradients are not reduced).
        """
        group = self._group_of(p)
        state = self.state[p]
        if n_micro == 1:
            update: Tensor | None = self._momentum_update(p, grad, state, group)
        else:
            if group["nesterov"]:
                raise ValueError(f"{type(self).__name__}.step_param: accumulating {n_micro} micro-batches "
                                 "into the momentum needs nesterov=False")
            update = self._accumulate(p, grad, state, group, micro, n_micro)
        if update is not None:
            self._apply_update(p, self._orthogonalize(update, group), group)

    # --- step ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = self._run_closure(closure)
        world, rank = _dist_world_rank()
        if world == 1:
            self._step_local()
        else:
            self._step_distributed(world, rank)
        return loss

    def _step_local(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if self._use_stacks(params):
                for stack in _same_shape_stacks(params):
                    self._update_stack(stack, group)
            else:
                for p in params:
                    self._update_param(p, group)

    def _use_stacks(self, params: list[Tensor]) -> bool:
        """Stacked (batched) steps: for plain Muon on fp32 matrices, on CUDA unless ``stacked`` says.

        On CPU one matrix at a time: a single 768-wide fp32 matmul already runs near the cores' peak,
        and stacking measured no faster there. On a GPU one small matmul leaves most of the chip idle
        and every launch costs microseconds, so each same-shape stack runs as one batched chain
        (``bmm``) and the momentum / weight updates as ``_foreach`` kernels. Subclasses that replace a
        piece of the update (8-bit momentum, GaLore) and low-precision latents keep the per-matrix path.
        """
        if not params:
            return False
        stacked = self.stacked if self.stacked is not None else params[0].is_cuda
        plain = all(getattr(type(self), name) is getattr(Muon, name)
                    for name in ("_momentum_update", "_orthogonalize", "_apply_update", "_update_param"))
        return stacked and plain and all(p.dtype == torch.float32 for p in params)

    def _update_stack(self, params: list[Tensor], group: dict[str, Any]) -> None:
        """The step of :meth:`_update_param` for same-shape fp32 matrices at once (same maths)."""
        self._apply_stack(params, self._advance_stack_momentum(params, group), group)

    def _advance_stack_momentum(self, params: list[Tensor], group: dict[str, Any]) -> list[Tensor]:
        """``buf <- mu buf + (1 - mu) g`` for every matrix of the stack (one ``_foreach`` kernel)."""
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32,
                                                            memory_format=torch.contiguous_format)
            bufs.append(state["momentum_buffer"])
        torch._foreach_lerp_(bufs, [p.grad for p in params], 1 - group["momentum"])
        return bufs

    def _apply_stack(self, params: list[Tensor], bufs: list[Tensor], group: dict[str, Any]) -> None:
        """Newton–Schulz and the weight update for same-shape matrices whose momentum is advanced.

        Newton–Schulz runs on stacks of at most ``STACK_ELEMENTS`` values (``[n, rows, cols]``
        through ``bmm``): the stack is a copy, so its size bounds the extra memory."""
        mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        scale = max(1.0, params[0].size(0) / params[0].size(1)) ** 0.5
        ns_dtype = self._ns_dtype(group, params[0].device)
        per = max(1, STACK_ELEMENTS // params[0].numel())
        for i in range(0, len(params), per):
            chunk, chunk_bufs = params[i:i + per], bufs[i:i + per]
            # The matrix to orthogonalise is written straight into the stack in the Newton–Schulz
            # dtype (one pass per matrix: read g and buf, write bf16), and the bf16 result is added
            # to the fp32 weights as is: the same values as stacking fp32 copies and casting twice,
            # at ~2/3 of the memory traffic (nano-1b's 1 B matrices: ~25 GB less per step).
            stack = torch.empty((len(chunk), *params[0].shape), dtype=ns_dtype, device=params[0].device)
            for j, (p, buf) in enumerate(zip(chunk, chunk_bufs)):
                if group["nesterov"]:
                    torch.lerp(p.grad, buf, mu, out=stack[j])
                else:
                    stack[j].copy_(buf)
            ortho = self._orthogonalize(stack, group)  # [n, rows, cols], in ns_dtype
            del stack
            if wd != 0:
                torch._foreach_mul_(chunk, 1 - lr * wd)
            torch._foreach_add_(chunk, list(ortho.unbind(0)), alpha=-lr * scale)
            del ortho

    def _step_distributed(self, world: int, rank: int) -> None:
        entries = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if self._use_stacks(params):
                for stack in _same_shape_stacks(params):
                    self._update_stack_distributed(stack, group, world, rank)
            else:
                entries += [(p, group) for p in group["params"]]
        self._step_rounds(entries, world, rank)

    def _update_stack_distributed(self, params: list[Tensor], group: dict[str, Any], world: int,
                                  rank: int) -> None:
        """A same-shape stack split across ranks: each rank orthogonalises a contiguous slice.

        The stack is cut into rounds of at most ``world * per`` matrices (``per`` bounds a rank's
        slice so that the gathered round is at most ``STACK_ELEMENTS`` values); in each round rank
        ``r`` steps matrices ``[r k, (r + 1) k)`` (``k = ceil(round / world)``) as one batched
        Newton–Schulz, and one all-gather into a single tensor hands every rank the whole round. Every
        rank advances the momentum of the whole stack (identical everywhere, as in the per-matrix
        split), so only the weights travel. The gather of a round overlaps the next round's maths.
        """
        bufs = self._advance_stack_momentum(params, group)
        per = max(1, STACK_ELEMENTS // (params[0].numel() * world))
        pending: tuple[Any, list[Tensor], Tensor, int] | None = None
        for base in range(0, len(params), per * world):
            round_ = params[base:base + per * world]
            k = -(-len(round_) // world)
            lo, hi = min(rank * k, len(round_)), min((rank + 1) * k, len(round_))
            if hi > lo:
                self._apply_stack(round_[lo:hi], bufs[base + lo:base + hi], group)
            send = torch.zeros((k, *params[0].shape), dtype=params[0].dtype, device=params[0].device)
            if hi > lo:
                torch.stack(round_[lo:hi], out=send[:hi - lo])
            recv = torch.empty((world * k, *params[0].shape), dtype=send.dtype, device=send.device)
            work = _all_gather_single(recv, send, async_op=True)
            if pending is not None:
                _finish_stack_round(*pending)
            pending = (work, round_, recv, rank * k)
        if pending is not None:
            _finish_stack_round(*pending)

    def _step_rounds(self, entries: list[tuple[Tensor, dict[str, Any]]], world: int, rank: int) -> None:
        """Per-matrix split: parameter ``i`` of ``entries`` belongs to rank ``i % world`` (module docstring)."""
        pending: tuple[Any, list[Tensor], list[Tensor]] | None = None
        for base in range(0, len(entries), world):
            round_ = entries[base:base + world]
            for i, (p, group) in enumerate(round_):
                if p.grad is None:
                    continue
                if i == rank:
                    self._update_param(p, group)
                else:  # not ours: keep the momentum in step, skip Newton–Schulz
                    self._momentum_update(p, p.grad, self.state[p], group)
            params = [p for p, _ in round_]
            dtype = functools.reduce(torch.promote_types, [p.dtype for p in params])
            size = max(p.numel() for p in params)
            send = torch.zeros(size, dtype=dtype, device=params[0].device)
            if rank < len(params):
                mine = params[rank]
                send[:mine.numel()].copy_(mine.reshape(-1))
            recv = [torch.empty_like(send) for _ in range(world)]
            work = dist.all_gather(recv, send, async_op=True)
            if pending is not None:
                _finish_round(*pending, rank)
            pending = (work, params, recv)
        if pending is not None:
            _finish_round(*pending, rank)


def _same_shape_stacks(params: list[Tensor]) -> list[list[Tensor]]:
    """``params`` grouped by (shape, device), in first-seen order."""
    stacks: dict[tuple, list[Tensor]] = {}
    for p in params:
        stacks.setdefault((tuple(p.shape), p.device), []).append(p)
    return list(stacks.values())


def _finish_round(work: Any, params: list[Tensor], recv: list[Tensor], rank: int) -> None:
    work.wait()
    for owner, p in enumerate(params):
        if owner != rank:
            p.copy_(recv[owner][:p.numel()].view(p.shape))


def _finish_stack_round(work: Any, params: list[Tensor], recv: Tensor, own_lo: int) -> None:
    """Copy a gathered stack round into the matrices this rank did not step itself."""
    work.wait()
    k = recv.size(0) // dist.get_world_size()
    for j, p in enumerate(params):
        if not own_lo <= j < own_lo + k:
            p.copy_(recv[j])


def muon_defaults(lr: float, momentum: float, nesterov: bool, ns_steps: int, weight_decay: float,
                  ns_dtype: torch.dtype | str | None, latent_rounding: str = "stochastic",
                  seed: int = 0) -> dict[str, Any]:
    """Validated Muon hyperparameters as a param-group defaults dict."""
    if lr < 0:
        raise ValueError(f"Muon: lr must be >= 0, got {lr}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"Muon: momentum must be in [0, 1), got {momentum}")
    if ns_steps < 1:
        raise ValueError(f"Muon: ns_steps must be >= 1, got {ns_steps}")
    if weight_decay < 0:
        raise ValueError(f"Muon: weight_decay must be >= 0, got {weight_decay}")
    if latent_rounding not in LATENT_ROUNDINGS:
        raise ValueError(f"Muon: latent_rounding must be one of {LATENT_ROUNDINGS}, got {latent_rounding!r}")
    return dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                weight_decay=weight_decay, ns_dtype=_dtype_name(ns_dtype), latent_rounding=latent_rounding,
                seed=seed)


def _dtype_name(dtype: torch.dtype | str | None, what: str = "Muon: ns_dtype") -> str | None:
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    if not isinstance(getattr(torch, name, None), torch.dtype) or not getattr(torch, name).is_floating_point:
        raise ValueError(f"{what} must be a floating torch dtype or its name, got {dtype!r}")
    return name
