"""Our own packed format: one ``.safetensors`` file that ``generate --checkpoint`` runs directly.

Layout (every tensor little-endian, as safetensors stores them)::

    blocks.{i}.{attr}.codes   uint8 [ceil(out*in / 4)]   2-bit codes t+1 in {0,1,2}, four a byte,
                                                         weight k at bits 2*(k%4) of byte k//4,
                                                         row-major over the [out, in] weight
    blocks.{i}.{attr}.scales  fp32  [ceil(out*in / group_size)]   the group scales s
    tok_emb.weight, norms, lm_head.weight (untied only)  fp32, as trained
    metadata: format, version, config (JSON), step, tokenizer (tokenizer.json text, if any)

Size per block weight: 2 bits + 32 bits / group_size = 2.25 bits at groups of 128, 2.125 at 256
(fp32 scales are kept so the weights are bit-identical to training: fp16 would round them).

Loading rebuilds the GPT and swaps each BitLinear for a :class:`PackedBitLinear`, which keeps the
dequantized ``t * s`` as a buffer and runs the same activation quantizer and ``F.linear`` as the
training forward, so logits, and therefore generated tokens, are identical to the checkpoint's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config
from ..errors import UserError
from ..model.bitlinear import quantize_activations
from ..model.gpt import GPT
from ..model.ternary import BLOCK_LINEARS, TernaryTensor

FORMAT = "nanochat-ternary-packed"
VERSION = "1"


def pack_codes(codes: Tensor) -> Tensor:
    """int8 codes in {-1, 0, 1} (any shape) -> uint8 ``[ceil(n/4)]``, four 2-bit codes a byte."""
    u = (codes.reshape(-1).to(torch.int16) + 1).to(torch.uint8)
    pad = (-u.numel()) % 4
    if pad:
        u = torch.cat([u, torch.ones(pad, dtype=torch.uint8)])  # pad with code 0 (stored as 1)
    u = u.view(-1, 4)
    return u[:, 0] | (u[:, 1] << 2) | (u[:, 2] << 4) | (u[:, 3] << 6)


def unpack_codes(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_codes`: int8 ``[n]`` in {-1, 0, 1}."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
    u = (packed[:, None] >> shifts[None, :]) & 3  # [B, 4]
    return u.reshape(-1)[:n].to(torch.int8) - 1


class PackedBitLinear(nn.Module):
    """A BitLinear whose ternary weight is fixed: ``y = quant(x) @ (t * s).T`` (int8 or the model's
    ``act_quant`` format).

    Same interface as :class:`~nanochat_ternary.model.bitlinear.BitLinear` for inference
    (``quantize_input``, ``forward(x, x_is_quantized)``), same activation quantizer and matmul, and
    ``weight_q`` equal bit for bit to what ``BitLinear`` computes from its shadow weight.
    """

    def __init__(self, tt: TernaryTensor) -> None:
        super().__init__()
        self.out_features, self.in_features = tt.shape
        self.group_size = tt.group_size
        self.act_format = "int8"  # set with the model's act_quant (GPT.set_act_quant), as BitLinear's
        self.act_block_size = 16
        self.register_buffer("weight_q", tt.dequantize())

    def quantize_input(self, x: Tensor) -> Tensor:
        return quantize_activations(x, self.act_format, self.act_block_size)

    def quantized_weight(self) -> Tensor:
        return self.weight_q

    def forward(self, x: Tensor, x_is_quantized: bool = False) -> Tensor:
        if not x_is_quantized:
            x = self.quantize_input(x)
        return F.linear(x, self.weight_q)


def is_packed(path: str | Path) -> bool:
    """True when ``path`` is a file written by :func:`write_packed`."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # not a safetensors file at all
        return False


def load_packed(path: str | Path) -> tuple[Config, GPT, str | None, int]:
    """Rebuild the model of a packed file (eval mode, CPU, fp32): ``(config, model, tokenizer_json, step)``.

    Read through :func:`nanochat_ternary.checkpoint.open_checkpoint`, like every other model file."""
    from safetensors import safe_open

    p = Path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise UserError(f"{p}: not a readable packed model ({str(e).splitlines()[0] if str(e) else e})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{p}: not a {FORMAT} file")
    if meta.get("version") != VERSION:
        raise UserError(f"{p}: packed format version {meta.get('version')!r}, this version reads {VERSION}")
    cfg = Config.from_dict(json.loads(meta["config"]))
    model = GPT(cfg.model)
    for i, block in enumerate(model.blocks):
        for attr in BLOCK_LINEARS:
            name = f"blocks.{i}.{attr}"
            lin = block.get_submodule(attr)
            scales = tensors.pop(f"{name}.scales")
            codes = unpack_codes(tensors.pop(f"{name}.codes"), lin.weight.numel()).view(lin.weight.shape)
            parent, leaf = attr.split(".")
            setattr(block.get_submodule(parent), leaf, PackedBitLinear(TernaryTensor(codes, scales, lin.group_size)))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied_head = "lm_head.weight" if cfg.model.weight_tied else None
    missing = [m for m in missing if not m.endswith(".weight_q") and m != tied_head]
    if missing or unexpected:
        raise UserError(f"{p}: tensors do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if cfg.model.weight_tied:
        model.lm_head.weight = model.tok_emb.weight
    model.set_act_quant(cfg.model.act_quant)  # the packed layers run the format the model trained with
    model.eval()
    return cfg, model, meta.get("tokenizer"), int(meta.get("step", 0))
