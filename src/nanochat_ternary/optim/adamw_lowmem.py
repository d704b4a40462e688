"""AdamW with 3 bytes of state per parameter: int8 normalised first moment, bf16 second moment.

Why
---
The embedding and head of the 7B preset (vocab 128000 x 4096, tied: 524M params) carry 4.2 GB of
fp32 AdamW state, more than GaLore leaves to all of Muon. This keeps the same update with
``m`` as int8 blocks (:class:`~nanochat_ternary.optim.quantized.BlockQuantized`, 1.03 B/value)
and ``v`` in bf16 (2 B/value): 3.03 B/param instead of 8.

Why these formats
-----------------
* The int8 blocks hold ``r = m / sqrt(v)`` (0 where ``v = 0``), not ``m``. Adam divides every
  element by its own ``sqrt(v)``, so a linear code of ``m`` itself (one absmax per block) gives
  the block's small elements a large *relative* error, which the division turns into a full-size
  error of their update: measured on a 256 x 128 quadratic, 30 steps, the weights drifted 13.6%
  (of the distance moved) from fp32 AdamW's with int8 ``m``, against 0.73% with int8 ``r`` (0.30% with
  stochastic rounding). ``r``
  is the normalised update itself, bounded (``|m| <= sqrt(v) (1 - b1) / sqrt((1 - b2)(1 - b1^2 /
  b2))``, ~1.2 at (0.9, 0.95)), so one absmax per block of 128 gives every element an absolute
  error of at most ``absmax / 254`` of its update. For an embedding or head a block is 128 dims
  of one token's row. ``stochastic_rounding`` makes the requantisation unbiased.
* ``v`` is non-negative with a dynamic range of many decades across a tensor; a linear 8-bit
  code would round a block's small entries to 0 and blow up ``m / sqrt(v)`` (bitsandbytes and
  torchao use a non-linear "dynamic" 8-bit map for this reason). bf16 keeps fp32's range with
  8 significant bits; ``v``'s EMA changes by ``(1 - beta2)`` (5% at 0.95) of itself per step, far
  above bf16's 0.4% resolution, so round-to-nearest does not stall it.

Measured alternatives (docs/low_memory.md): torchao's ``AdamW8bit`` runs on CPU with torch 2.13,
but its step is ``torch.compile``d (48 s of compilation for the first step of one shape on this
machine's CPU) and its state is a tensor subclass that ``torch.load(weights_only=True)``
checkpoints do not read as plain tensors; bitsandbytes' CPU backend was not installed here.

The step, per parameter ``p`` with gradient ``g`` (all arithmetic in fp32)::

    m <- r_stored sqrt(v_old)                                 (dequantise)
    m <- beta1 m + (1 - beta1) g;   v <- beta2 v + (1 - beta2) g^2
    p <- p (1 - lr wd) - lr (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
    r_stored <- int8(m / sqrt(v))  (v rounded to bf16 first, the value the next step reads)

A bf16 ``p`` is written back with stochastic rounding (as the Muon latents).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .base import StatefulOptimizer
from .low_precision import STREAM_LATENT, STREAM_ROUNDING, is_low_precision, seeded_generator, write_latent
from .quantized import BlockQuantized, n_blocks_for

CHUNK_ELEMENTS = 1 << 24  # values per slice of the step: 64 MB fp32 temporaries
STREAM_ADAMW = 5  # keys this optimizer's streams apart from Muon's (same seed, same param indices)


class AdamW8bit(StatefulOptimizer):
    """AdamW whose first moment is int8 blocks and second moment bf16 (see the module docstring).

    Args: as ``torch.optim.AdamW`` (``lr``, ``betas``, ``eps``, ``weight_decay``), plus
    ``block_size`` (values per int8 block), ``stochastic_rounding`` (of ``m``'s requantisation)
    and ``seed`` (of the rounding streams, with parameter index and step: checkpointed with the
    state, so a resumed run is exact).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 *, block_size: int = 128, stochastic_rounding: bool = False, seed: int = 0) -> None:
        if lr < 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas) or block_size < 1:
            raise ValueError(f"AdamW8bit: invalid hyperparameters lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay} block_size={block_size}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      block_size=block_size, stochastic_rounding=stochastic_rounding, seed=seed))

    def _check_loaded_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if (state["m_codes"].size(1) * state["m_codes"].size(0) < p.numel() or state["v"].shape != p.shape
                or state["m_codes"].dtype != torch.int8):
            raise ValueError(f"AdamW8bit: the saved state of a {tuple(p.shape)} parameter does not fit")

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = self._run_closure(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    nb = n_blocks_for(p.numel(), group["block_size"])
                    state["step"] = 0
                    state["m_codes"] = torch.zeros(nb, group["block_size"], dtype=torch.int8, device=p.device)
                    state["m_scales"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
                    state["v"] = torch.zeros(p.shape, dtype=torch.bfloat16, device=p.device)
                step = state["step"] + 1
                idx = self._param_index(p)
                sr, low = group["stochastic_rounding"], is_low_precision(p)
                gen_r = seeded_generator(p.device, group["seed"], STREAM_ADAMW, STREAM_ROUNDING, idx, step) \
                    if sr else None
                gen_l = seeded_generator(p.device, group["seed"], STREAM_ADAMW, STREAM_LATENT, idx, step) \
                    if low else None
                # in slices of whole blocks: the fp32 temporaries are one slice's, not the tensor's
                # (a 128000 x 4096 embedding would need ~10 GB of them at once)
                bs, n = group["block_size"], p.numel()
                per = max(bs, CHUNK_ELEMENTS // bs * bs) if p.is_contiguous() else n
                flat_p, flat_g, flat_v = p.view(-1) if per < n else p, p.grad.reshape(-1), state["v"].view(-1)
                for start in range(0, n, per):
                    end = min(n, start + per)
                    b0, b1 = start // bs, (end + bs - 1) // bs
                    self._update_slice(flat_p[start:end] if per < n else p, flat_g[start:end],
                                       state["m_codes"][b0:b1], state["m_scales"][b0:b1], flat_v[start:end],
                                       group, step, gen_r, gen_l)
                state["step"] = step
        return loss

    @staticmethod
    def _update_slice(p: Tensor, grad: Tensor, codes: Tensor, scales: Tensor, v_store: Tensor,
                      group: dict[str, Any], step: int, gen_r: torch.Generator | None,
                      gen_l: torch.Generator | None) -> None:
        """The step for ``p`` (the parameter or a flat slice of whole blocks of it) with its flat
        gradient, int8 first-moment blocks, scales and bf16 second moment (module docstring)."""
        b1, b2 = group["betas"]
        g = grad.float().view(p.shape)
        mq = BlockQuantized(codes, scales, p.shape)
        v = v_store.float().view(p.shape)
        m = mq.dequantize().mul_(v.sqrt()).lerp_(g, 1 - b1)  # r sqrt(v_old) = m
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        v_store.copy_(v.view(v_store.shape))
        v = v_store.float().view(p.shape)  # what the next step reads back
        root = v.sqrt()
        denom = (root / (1 - b2 ** step) ** 0.5).add_(group["eps"])
        low = gen_l is not None
        w = p.float() if low else p
        if group["weight_decay"]:
            w.mul_(1 - group["lr"] * group["weight_decay"])
        w.addcdiv_(m, denom, value=-group["lr"] / (1 - b1 ** step))
        r = torch.where(root > 0, m / root, torch.zeros_like(m))
        mq.assign(r, stochastic=gen_r is not None, generator=gen_r)
        if low:
            write_latent(p, w, stochastic=True, generator=gen_l)
