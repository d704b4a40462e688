"""Write our packed format (layout and reader: :mod:`nanochat_ternary.checkpoint.packed`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from ..checkpoint.packed import FORMAT, VERSION, pack_codes
from ..config import Config
from .common import LoadedCheckpoint, ternary_weights


def write_packed(ck: LoadedCheckpoint, out: Path, log: Callable[[str], None] = print) -> dict:
    """Write ``ck``'s model to ``out`` (a new file). MTP heads are left out (training only)."""
    from safetensors.torch import save_file

    tern = ternary_weights(ck.model)
    tensors: dict[str, Tensor] = {}
    for name, tt in tern.items():
        tensors[f"{name}.codes"] = pack_codes(tt.codes)
        tensors[f"{name}.scales"] = tt.scales.contiguous()
    skip = {f"{n}.weight" for n in tern}
    for name, t in ck.model.state_dict().items():
        if name in skip or name.startswith("mtp."):
            continue
        if name == "lm_head.weight" and ck.config.model.weight_tied:
            continue  # the same tensor as tok_emb.weight
        tensors[name] = t.detach().float().contiguous()
    cfg = Config.from_dict(ck.config.to_dict())
    cfg.model.use_mtp = False
    meta = {"format": FORMAT, "version": VERSION, "config": json.dumps(cfg.to_dict()), "step": str(ck.step)}
    if ck.tokenizer_path is not None:
        meta["tokenizer"] = ck.tokenizer_path.read_text()
    save_file(tensors, str(out), metadata=meta)
    n_block = sum(tt.codes.numel() for tt in tern.values())
    block_bytes = sum(tensors[f"{n}.codes"].numel() + 4 * tensors[f"{n}.scales"].numel() for n in tern)
    log(f"  {len(tern)} ternary matrices, {n_block:,} weights at {8 * block_bytes / n_block:.3f} bits/weight")
    return {"format": "packed", "block_params": n_block, "block_bytes": block_bytes}
