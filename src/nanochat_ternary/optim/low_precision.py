"""Low-precision latent weights: bf16 shadow weights written back with stochastic rounding.

Why
---
A ternary model trains full-precision *latent* (shadow) weights that the forward quantizes. Kept
in fp32 they cost 4 bytes per parameter (23.6 GB at 6.2B params); in bf16, 2. But bf16 keeps 8
significant bits: an update smaller than half a unit in the last place (ulp) of a weight is lost
entirely under round-to-nearest, and late in training, at small learning rates, most updates are
that small, so the weights freeze. Stochastic rounding (SR) fixes that in expectation: round up
with probability equal to the fraction of the ulp that the value passed, so ``E[SR(x)] = x`` and
many small updates add up to the right drift (Gupta et al. 2015; Zamirai et al. 2020).

The maths
---------
A finite fp32 value ``x`` is the int32 bit pattern ``b``; bf16 is its top 16 bits. With
``r ~ U{0, ..., 2^16 - 1}``::

    SR(x) = bf16_bits( (b + r) & 0xFFFF0000 )

The low 16 bits of ``b``, ``l``, carry into bit 16 exactly when ``r >= 2^16 - l``, i.e. with
probability ``l / 2^16``: the distance from ``x`` to the bf16 value below it (in magnitude) over
the bf16 ulp at ``x``. So ``E[SR(x)] = x`` within a binade; because fp32 is sign-magnitude, the same
holds for negative ``x`` (the carry increases the magnitude). A carry out of the mantissa bumps
the exponent, which is the correct next value. ``inf`` stays ``inf``; ``NaN`` stays ``NaN``
(handled apart, a carry could turn it into a number).

The update math stays fp32 (:meth:`~nanochat_ternary.optim.muon.Muon._apply_update`): read the
bf16 latent into fp32, decay and add the update there, write it back once with SR. Only one
matrix's fp32 copy exists at a time.

Random streams
--------------
Every draw comes from a ``torch.Generator`` seeded from ``(seed, stream, parameter index, step)``
by :func:`derive_seed` (splitmix64). Its whole state is those integers, which live in the
optimizer's param groups (``seed``) and per-parameter state (a step counter), so the streams are
checkpointed by ``state_dict()``, resume exactly, and agree on every rank without communication.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

LOW_PRECISION = (torch.bfloat16, torch.float16)
LATENT_DTYPES = ("float32", "bfloat16")
LATENT_ROUNDINGS = ("stochastic", "nearest")

_MASK64 = (1 << 64) - 1

# stream tags for derive_seed: which use of randomness a generator is for
STREAM_ROUNDING = 1  # int8 momentum requantisation (optim/quantized.py)
STREAM_PROJECTOR = 2  # GaLore randomized SVD sketch (optim/galore.py)
STREAM_LATENT = 3  # bf16 latent weights (this module)
STREAM_MICRO = 4  # int8 momentum requantisation at an intermediate micro-batch (in-backward step)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixing ``keys`` (splitmix64 chain): distinct keys give unrelated seeds."""
    h = 0
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return h & ((1 << 63) - 1)


def seeded_generator(device: torch.device, *keys: int) -> torch.Generator:
    """A generator on ``device`` seeded by :func:`derive_seed` of ``keys``."""
    return torch.Generator(device=device).manual_seed(derive_seed(*keys))


def is_low_precision(t: Tensor) -> bool:
    """Whether ``t`` is a 2-byte float latent that needs rounding when written back."""
    return t.dtype in LOW_PRECISION


def stochastic_round_to_bf16(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``x`` (any float dtype, any shape) rounded to bf16 stochastically: ``E[out] = x``.

    See the module docstring for the bit trick. Costs one int32 random tensor of ``x``'s shape.
    """
    bits = x.detach().float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, generator=generator, device=x.device)
    out = bits.add(noise).bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)  # exact cast
    nan = torch.isnan(x)
    return torch.where(nan, x.detach().to(torch.bfloat16), out) if nan.any() else out


def write_latent(p: Tensor, value: Tensor, stochastic: bool, generator: torch.Generator | None = None) -> None:
    """Store the fp32 ``value`` into the low-precision tensor ``p`` in place.

    ``stochastic``: unbiased stochastic rounding (bf16 only; fp16 has no SR here and is refused);
    else round to nearest (the cast).
    """
    if not stochastic:
        p.copy_(value)
    elif p.dtype == torch.bfloat16:
        p.copy_(stochastic_round_to_bf16(value, generator))
    else:
        raise ValueError(f"stochastic rounding is implemented for bfloat16 latents, not {p.dtype}")


def cast_params_(params: list[nn.Parameter], dtype: torch.dtype) -> None:
    """Cast parameters in place (same ``Parameter`` objects, so optimizers and hooks keep them).

    The first cast from fp32 rounds to nearest: the initial weights are random draws, so a
    deterministic rounding adds no bias that accumulates.
    """
    for p in params:
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
