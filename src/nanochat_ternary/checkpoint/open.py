"""One way to build a model from a file: :func:`open_checkpoint`.

Every reader of a trained model — generate, eval, chat, serve, export, warm start, a distillation
teacher — opens it here, so a checkpoint is validated, rebuilt and placed on a device the same way
everywhere. Accepted paths:

* a step dir (``step_000500/``: ``meta.json`` + ``model.safetensors`` (+ ``tokenizer.json``));
* a run dir (its newest complete step dir);
* a packed ``.safetensors`` file written by ``export --format packed``.

GGUF files run on llama.cpp, not on our GPT, and HF export dirs on transformers: their readers live
with the commands that use those engines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..data.tokenizer import Tokenizer, load_tokenizer
from ..errors import CheckpointError, UserError
from ..model.gpt import GPT
from . import files
from .packed import is_packed, load_packed

KINDS = ("checkpoint", "packed")


@dataclass
class OpenedModel:
    """A model ready for inference (eval mode, weights loaded, on ``device``) and what came with it."""

    path: Path  # the step dir, or the packed file
    kind: str  # "checkpoint" | "packed"
    config: Config
    model: GPT
    tokenizer: Tokenizer | None  # None for a model trained on bare token ids
    tokenizer_path: Path | None  # tokenizer.json of a step dir (a packed file embeds its tokenizer)
    step: int
    meta: dict[str, Any] = field(default_factory=dict)  # meta.json of a step dir ({} for packed)
    dropped: list[str] = field(default_factory=list)  # training-only parts not in the model (for notes)

    @property
    def name(self) -> str:
        """A short name for reports and the server's model id: run dir / step, or the file name."""
        return f"{self.path.parent.name}/{self.path.name}" if self.kind == "checkpoint" else self.path.name

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise UserError(f"{self.path} has no tokenizer (it was trained on token ids without one); "
                            f"text in or out needs a model trained on text")
        return self.tokenizer


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r}: not a device (auto | cpu | cuda | cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r}: not a device (auto | cpu | cuda | cuda:N)")
    return dev


def _open_step_dir(path: str | Path) -> OpenedModel:
    ckpt = files.resolve_checkpoint(path)
    meta = files.read_meta(ckpt)
    cfg = files.read_config(ckpt, meta)
    files.check_weights_header(ckpt, cfg)  # before building a model of the size the config claims
    model = GPT(cfg.model)
    files.load_model_weights(model, ckpt)
    tok_path = ckpt / "tokenizer.json"
    try:
        tok = load_tokenizer(tok_path) if tok_path.is_file() else None
    except UserError as e:
        raise CheckpointError(f"checkpoint {ckpt}: tokenizer.json: {e}") from None
    dropped = [f"{cfg.model.mtp_n_tokens} multi-token-prediction heads (training only)"] if cfg.model.use_mtp else []
    return OpenedModel(ckpt, "checkpoint", cfg, model, tok, tok_path if tok is not None else None,
                       int(meta["step"]), meta, dropped)


def _open_packed(path: Path) -> OpenedModel:
    cfg, model, tokenizer_json, step = load_packed(path)
    tok = None
    if tokenizer_json is not None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = Tokenizer(HFTokenizer.from_str(tokenizer_json))
        except Exception as e:  # the tokenizers library raises its own exception types
            raise UserError(f"{path}: its embedded tokenizer is unreadable ({str(e).splitlines()[0][:120]})") from None
    return OpenedModel(path, "packed", cfg, model, tok, None, step)


def open_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    kinds: tuple[str, ...] = KINDS) -> OpenedModel:
    """Open a step dir, a run dir or a packed file as a model in eval mode on ``device`` (fp32).

    ``kinds`` limits what is accepted (an export reads only checkpoints). Every problem is one
    ``UserError`` line naming the file."""
    p = Path(path)
    dev = _resolve_device(device)
    if p.is_file():
        if p.suffix == ".gguf":
            raise UserError(f"{p}: a GGUF file runs on llama.cpp; this command reads checkpoints"
                            + (" and packed files" if "packed" in kinds else ""))
        if "packed" not in kinds or not is_packed(p):
            want = "a checkpoint dir, a run dir" + (" or a packed .safetensors" if "packed" in kinds else "")
            raise UserError(f"{p}: not {want}")
        opened = _open_packed(p)
    else:
        opened = _open_step_dir(p)
    opened.model.eval()
    opened.model.to(dev)
    return opened
