"""Ternary weights as codes and scales: what the forward multiplies with, in the form files store.

``W_q[i] = t[i] * s[group(i)]`` with ``t`` in {-1, 0, +1} and ``s`` the group's mean |W| (fp32),
``group(i) = i // group_size`` over the row-major flattened ``[out, in]`` weight. The codes come from
the model's own quantizer (``BitLinear.quantized_weight``), so ``codes * scales`` is bit-identical to
the training forward's weight. Used by the checkpoint room (packed files) and every export format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# The BitLinear layers of a block, by their attribute path, in the order formats list them.
BLOCK_LINEARS = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "ffn.w1", "ffn.w3", "ffn.w2")

@dataclass
class TernaryTensor:
    """One BitLinear weight as ternary codes and fp32 group scales (``W_q = codes * scale``)."""

    codes: Tensor  # int8 [out, in], values in {-1, 0, 1}
    scales: Tensor  # fp32 [n_groups]
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def scale_map(self) -> Tensor:
        """fp32 ``[out, in]``: the scale each weight is multiplied by."""
        n = self.codes.numel()
        return self.scales.repeat_interleave(self.group_size)[:n].view(self.shape)

    def dequantize(self) -> Tensor:
        """The weight the training forward uses, bit for bit (``t * s`` is exact in fp32)."""
        return self.codes.float() * self.scale_map()

    def permute_rows(self, order: Tensor) -> tuple[Tensor, Tensor]:
        """``(codes, scale_map)`` with rows reordered (a row keeps its weights and their scales)."""
        return self.codes[order], self.scale_map()[order]


def split_quantized(w_q: Tensor, group_size: int) -> TernaryTensor:
    """``t * s`` (the forward's fake-quantized weight) -> codes ``t`` and per-group scales ``s``.

    Taking the weight the forward actually multiplies with, rather than re-deriving the scales,
    makes ``codes * scales`` bit-identical to it: every non-zero ``|w_q|`` in a group *is* ``s``
    (``t * s`` with ``t = +-1`` is exact in fp32). A group whose codes are all zero gets scale 0.
    """
    flat = w_q.reshape(-1)
    pad = (-flat.numel()) % group_size
    groups = torch.nn.functional.pad(flat, (0, pad)).view(-1, group_size)
    scales = groups.abs().amax(dim=1)
    return TernaryTensor(torch.sign(w_q).to(torch.int8), scales, group_size)
