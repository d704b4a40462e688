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
        raise UserError(f"{p}: packed format version {meta.get('version')!r:.40}, this version reads {VERSION}")
    cfg = _packed_config(p, meta)
    step = meta.get("step", "0")
    if not (isinstance(step, str) and step.isdigit() and len(step) < 16):
        raise UserError(f"{p}: metadata 'step' = {step!r:.40} is not a step number")
    try:
        model = _rebuild(cfg, tensors)
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as e:
        detail = f"no tensor {e}" if isinstance(e, KeyError) else (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{p}: tensors do not match its config ({detail[:200]})") from None
    return cfg, model, meta.get("tokenizer"), int(step)


def _packed_config(p: Path, meta: dict[str, str]) -> Config:
    """The ``config`` metadata entry: JSON of a config object, validated like any other source."""
    if "config" not in meta:
        raise UserError(f"{p}: packed file without its 'config' metadata")
    try:
        data = json.loads(meta["config"])
    except (ValueError, RecursionError) as e:
        raise UserError(f"{p}: metadata 'config' is not JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: metadata 'config' is a JSON {type(data).__name__}, not an object")
    try:
        return Config.from_dict(data)
    except UserError as e:
        raise UserError(f"{p}: metadata config: {e}") from None


def _rebuild(cfg: Config, tensors: dict[str, Tensor]) -> GPT:
    """The GPT of ``cfg`` with every block linear a PackedBitLinear from ``tensors`` (consumed)."""
    model = GPT(cfg.model)
    for i, block in enumerate(model.blocks):
        for attr in BLOCK_LINEARS:
            name = f"blocks.{i}.{attr}"
            lin = block.get_submodule(attr)
            scales = tensors.pop(f"{name}.scales")
            codes = tensors.pop(f"{name}.codes")
            n = lin.weight.numel()
            n_groups = -(-n // lin.group_size)
            if codes.dtype != torch.uint8 or codes.shape != (-(-n // 4),):
                raise ValueError(f"{name}.codes is {codes.dtype} {list(codes.shape)}, expected uint8 [{-(-n // 4)}]")
            if scales.dtype != torch.float32 or scales.shape != (n_groups,) or not bool(torch.isfinite(scales).all()):
                raise ValueError(f"{name}.scales is {scales.dtype} {list(scales.shape)}, expected finite "
                                 f"float32 [{n_groups}]")
            codes = unpack_codes(codes, n)
            if bool((codes > 1).any()):  # 2-bit code 3 is not a ternary value
                raise ValueError(f"{name}.codes holds the unused code 3")
            codes = codes.view(lin.weight.shape)
            parent, leaf = attr.split(".")
            setattr(block.get_submodule(parent), leaf, PackedBitLinear(TernaryTensor(codes, scales, lin.group_size)))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied_head = "lm_head.weight" if cfg.model.weight_tied else None
    missing = [m for m in missing if not m.endswith(".weight_q") and m != tied_head]
    if missing or unexpected:
        raise ValueError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} holds NaN/inf values")
    if cfg.model.weight_tied:
        model.lm_head.weight = model.tok_emb.weight
    model.set_act_quant(cfg.model.act_quant)  # the packed layers run the format the model trained with
    model.eval()
    return model
