"""8-bit Muon: the momentum kept as int8 blocks with one fp32 absmax scale per block.

Storage
-------
A tensor of ``N`` values is cut into ``ceil(N / block)`` blocks of ``block`` values (the last one
zero-padded). Block ``b`` keeps one fp32 scale ``s_b = max|x| / 127`` over the block and the int8
codes ``q = round(x / s_b)`` in [-127, 127] (symmetric, linear: momentum is signed and roughly
zero-centred, and a linear grid makes the rounding error bound exact: ``|x - q s_b| <= s_b / 2``).
Memory is ``1 + 4 / block`` bytes per value: 1.03125 at the default block of 128.

With ``stochastic_rounding`` the code is ``floor(x / s_b + u)``, ``u ~ U[0, 1)``, so
``E[q s_b] = x``: an EMA whose per-step change is below half a quantisation step still moves on
average instead of sticking at the nearest code (deterministic rounding can freeze small
components of the momentum). The uniform draws come from a ``torch.Generator`` seeded from
``(seed, parameter index, step)`` (:func:`derive_seed`): its whole state is those three integers,
which live in the param group (``seed``) and the parameter's state (``step``), so the stream is
checkpointed with ``state_dict()``, resumes exactly, and is identical on every rank of a
distributed run without any communication.

The optimizer
-------------
:class:`Muon8bit` is :class:`~nanochat_ternary.optim.muon.Muon` whose momentum buffer lives only
as ``state["momentum_codes"]`` (int8, ``[n_blocks, block]``) and ``state["momentum_scales"]``
(fp32, ``[n_blocks]``). Each step dequantises it, advances the EMA in fp32, takes the (Nesterov)
update from that fp32 value and requantises; the fp32 copy is dropped at the end of the step.
Tensors with fewer than ``min_quant_numel`` values (default 4096, e.g. 64 x 64) keep an fp32
``momentum_buffer``: below that the saving is at most ~12 KiB per tensor while the padding of the
last block and the scale overhead grow relatively, and hidden matrices of any real model are far
larger. With ``quantize=False`` the class keeps every momentum in fp32 and is exactly Muon.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .low_precision import (  # noqa: F401  (derive_seed, STREAM_PROJECTOR: re-exported for galore and tests)
    STREAM_MICRO,
    STREAM_PROJECTOR,
    STREAM_ROUNDING,
    derive_seed,
    seeded_generator,
)
from .muon import Muon, muon_defaults

QMAX = 127
DEFAULT_MIN_QUANT_NUMEL = 4096


def n_blocks_for(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


class BlockQuantized:
    """A tensor stored as int8 codes ``[n_blocks, block]`` and fp32 absmax scales ``[n_blocks]``.

    A view over the two tensors (they can live in an optimizer's state dict): :meth:`assign`
    writes into them in place, :meth:`dequantize` reads a fresh fp32 tensor of ``shape``.
    """

    def __init__(self, codes: Tensor, scales: Tensor, shape: Iterable[int]) -> None:
        self.codes, self.scales, self.shape = codes, scales, torch.Size(shape)
        if codes.dtype != torch.int8 or codes.ndim != 2 or scales.dtype != torch.float32:
            raise ValueError("BlockQuantized: codes must be int8 [n_blocks, block], scales fp32")
        if scales.shape != codes.shape[:1] or n_blocks_for(self.shape.numel(), codes.size(1)) != len(scales):
            raise ValueError(f"BlockQuantized: {tuple(codes.shape)} codes / {tuple(scales.shape)} scales "
                             f"do not fit shape {tuple(self.shape)}")

    @classmethod
    def zeros(cls, shape: Iterable[int], block_size: int = 128,
              device: torch.device | str | None = None) -> BlockQuantized:
        shape = torch.Size(shape)
        nb = n_blocks_for(shape.numel(), block_size)
        return cls(torch.zeros(nb, block_size, dtype=torch.int8, device=device),
                   torch.zeros(nb, dtype=torch.float32, device=device), shape)

    @classmethod
    def from_tensor(cls, x: Tensor, block_size: int = 128, stochastic: bool = False,
                    generator: torch.Generator | None = None) -> BlockQuantized:
        q = cls.zeros(x.shape, block_size, x.device)
        q.assign(x, stochastic, generator)
        return q

    @property
    def block_size(self) -> int:
        return self.codes.size(1)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes

    def step_size(self) -> Tensor:
        """The quantisation step of every element (its block's scale), fp32 of ``shape``."""
        return self.scales[:, None].expand_as(self.codes).reshape(-1)[: self.shape.numel()].view(self.shape)

    def dequantize(self) -> Tensor:
        out = self.codes.float().mul_(self.scales[:, None])
        return out.view(-1)[: self.shape.numel()].view(self.shape)

    def assign(self, x: Tensor, stochastic: bool = False, generator: torch.Generator | None = None) -> None:
        """Quantise ``x`` (any float dtype, ``shape``) into the codes and scales, in place."""
        if x.shape != self.shape:
            raise ValueError(f"BlockQuantized.assign: shape {tuple(x.shape)} != {tuple(self.shape)}")
        flat = x.detach().reshape(-1).float()
        pad = self.codes.numel() - flat.numel()
        if pad:
            flat = F.pad(flat, (0, pad))
        blocks = flat.view_as(self.codes)
        absmax = blocks.abs().amax(dim=1)
        inv = torch.where(absmax > 0, QMAX / absmax, torch.zeros_like(absmax))
        y = blocks * inv[:, None]
        if stochastic:
            y.add_(torch.rand(y.shape, generator=generator, device=y.device)).floor_()
        else:
            y.round_()
        self.codes.copy_(y.clamp_(-QMAX, QMAX))
        self.scales.copy_(absmax / QMAX)


class Muon8bit(Muon):
    """Muon with the momentum stored as int8 blocks (see the module docstring).

    Args (besides :class:`Muon`'s):
        quantize: store momentum in 8 bits; False keeps fp32 (exactly :class:`Muon`).
        block_size: values per absmax block.
        stochastic_rounding: unbiased stochastic rounding on requantisation.
        min_quant_numel: tensors with fewer values keep an fp32 momentum.
        seed: seeds the stochastic-rounding stream (with parameter index and step).
    """

    variant_name = "muon-8bit"

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
        quantize: bool = True,
        block_size: int = 128,
        stochastic_rounding: bool = False,
        min_quant_numel: int = DEFAULT_MIN_QUANT_NUMEL,
        seed: int = 0,
        latent_rounding: str = "stochastic",
        **extra_defaults: Any,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"{type(self).__name__}: block_size must be >= 1, got {block_size}")
        if min_quant_numel < 0:
            raise ValueError(f"{type(self).__name__}: min_quant_numel must be >= 0, got {min_quant_numel}")
        defaults = muon_defaults(lr, momentum, nesterov, ns_steps, weight_decay, ns_dtype, latent_rounding, seed)
        defaults.update(quantize=quantize, block_size=block_size, stochastic_rounding=stochastic_rounding,
                        min_quant_numel=min_quant_numel, **extra_defaults)
        torch.optim.Optimizer.__init__(self, params, defaults)

    @property
    def variant(self) -> str:
        return self.variant_name if any(g["quantize"] for g in self.param_groups) else "muon"

    _STATE_KEYS = Muon._STATE_KEYS | {"momentum_codes", "momentum_scales", "step"}

    def _check_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        super()._check_state(p, state, group)
        codes, scales = state.get("momentum_codes"), state.get("momentum_scales")
        if (codes is None) != (scales is None) or (codes is not None and (
                codes.dtype != torch.int8 or codes.ndim != 2 or scales.numel() != codes.size(0)
                or scales.numel() != n_blocks_for(self._momentum_numel(p, state, group), codes.size(1)))):
            raise ValueError(f"{type(self).__name__}: the saved int8 momentum of a {tuple(p.shape)} "
                             "parameter does not fit this optimizer's settings")

    # --- momentum storage ------------------------------------------------------------------------

    def _quantized(self, numel: int, group: dict[str, Any]) -> bool:
        return bool(group["quantize"]) and numel >= group["min_quant_numel"]

    def _load_momentum(self, state: dict[str, Any], shape: torch.Size, device: torch.device,
                       group: dict[str, Any]) -> Tensor:
        """The momentum as an fp32 tensor of ``shape`` (zeros on the first step).

        For an fp32 buffer this is the buffer itself (updated in place); for int8 state a fresh
        dequantised tensor that :meth:`_store_momentum` writes back.
        """
        if "momentum_codes" in state:
            return BlockQuantized(state["momentum_codes"], state["momentum_scales"], shape).dequantize()
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(shape, dtype=torch.float32, device=device)
        return state["momentum_buffer"]

    def _store_momentum(self, p: Tensor, state: dict[str, Any], buf: Tensor, group: dict[str, Any],
                        step: int, micro: int | None = None) -> None:
        """Write ``buf`` back (int8 when quantised). ``micro``: an intermediate micro-batch of the
        in-backward step, whose stochastic rounding draws from its own stream."""
        if not self._quantized(buf.numel(), group):
            if state.get("momentum_buffer") is not buf:
                state.pop("momentum_codes", None)
                state.pop("momentum_scales", None)
                state["momentum_buffer"] = buf
            return
        state.pop("momentum_buffer", None)
        if "momentum_codes" not in state or state["momentum_codes"].size(1) != group["block_size"] \
                or state["momentum_scales"].numel() != n_blocks_for(buf.numel(), group["block_size"]):
            q = BlockQuantized.zeros(buf.shape, group["block_size"], buf.device)
            state["momentum_codes"], state["momentum_scales"] = q.codes, q.scales
        q = BlockQuantized(state["momentum_codes"], state["momentum_scales"], buf.shape)
        gen = None
        if group["stochastic_rounding"]:
            keys = (STREAM_ROUNDING, self._param_index(p), step) + (() if micro is None else (STREAM_MICRO, micro))
            gen = seeded_generator(buf.device, group["seed"], *keys)
        q.assign(buf, stochastic=group["stochastic_rounding"], generator=gen)

    # --- the momentum step -------------------------------------------------------------------------

    def _prepare(self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any],
                 step: int) -> tuple[Tensor, Tensor]:
        """``(gradient in momentum space, fp32 momentum)``; GaLore projects (and refreshes) here."""
        return grad, self._load_momentum(state, grad.shape, grad.device, group)

    def _project(self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        """The gradient in momentum space with the current projector (none here: the identity)."""
        return grad

    def _momentum_update(self, p: Tensor, grad: Tensor, state: dict[str, Any],
                         group: dict[str, Any]) -> Tensor:
        step = state.get("step", 0)
        g, buf = self._prepare(p, grad.float(), state, group, step)
        mu = group["momentum"]
        buf.lerp_(g, 1 - mu)
        update = g.lerp(buf, mu) if group["nesterov"] else buf
        self._store_momentum(p, state, buf, group, step)
        state["step"] = step + 1
        return update

    def _accumulate(self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any],
                    micro: int, n_micro: int) -> Tensor | None:
        """:meth:`Muon._accumulate` with the momentum stored by this variant (int8 or fp32).

        The first micro-batch goes through :meth:`_prepare` (GaLore refreshes its projector from
        it at a refresh step: with accumulation the projector sees that micro-batch's gradient,
        not the whole step's), the others are only projected. Each micro-batch dequantises, adds
        and requantises the momentum: with int8 momentum that is ``n_micro - 1`` extra roundings
        per step, each within half a quantisation step per value (unbiased with
        ``stochastic_rounding``); fp32 momentum adds none.
        """
        step = state.get("step", 0)
        mu = group["momentum"]
        grad = grad.float()
        if micro == 0:
            g, buf = self._prepare(p, grad, state, group, step)
            buf.mul_(mu)
        else:
            g = self._project(p, grad, state, group)
            buf = self._load_momentum(state, g.shape, g.device, group)
        buf.add_(g, alpha=1 - mu)
        last = micro == n_micro - 1
        self._store_momentum(p, state, buf, group, step, None if last else micro)
        if not last:
            return None
        state["step"] = step + 1
        return buf
