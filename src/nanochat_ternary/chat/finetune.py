"""``nanochat-train sft``: from a base checkpoint to a chat model (train/sft.py does the training).

This file picks the conversations (``--data`` files, else the embedded default set), the base
config (the checkpoint's model and its preset's training settings, as a warm start does) and the
run dir, then runs the one Trainer with the sft task.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..checkpoint.files import read_meta, resolve_checkpoint
from ..config import Config, build_config
from ..errors import UserError
from ..train.sft import SFTTask
from ..train.trainer import Trainer, TrainResult
from .sft_data import default_conversations, read_conversations, split_conversations

DEFAULT_VAL_FRACTION = 0.1


def sft_config(config: str | None, config_file: str | None, cli: dict[str, Any], sets: list[str],
               data: list[str] | None) -> Config:
    """The run's config: ``--resume``: the sft checkpoint's; ``--init-from``: its model, its preset's
    training settings with no end-of-run sample (a continuation of ``def `` says nothing about chat),
    then the flags. ``data``: the ``--data`` files (absolute, so a resume finds them from anywhere)."""
    resume, init_from = cli.get("resume"), cli.get("init_from")
    if bool(resume) == bool(init_from):
        raise UserError("sft: give --init-from BASE_CHECKPOINT (a new fine-tune) or --resume SFT_RUN (continue one)")
    base = None
    if not (config or config_file):
        saved = Config.from_dict(read_meta(resolve_checkpoint(resume or init_from))["config"])
        if resume:
            base = saved
        else:
            base = build_config(saved.preset or None)
            base.model = saved.model
            base.training.sample_tokens = 0
    if data:
        cli = {**cli, "sft_data": ",".join(str(Path(p).resolve()) for p in data)}
    return build_config(config, config_file, cli, sets, base=base)


def conversations(cfg: Config) -> tuple[list, list, str]:
    """``(train, val, source name)`` from ``sft_data`` (split by ``val_fraction``, default 0.1) or the
    embedded default set (its own held-out split)."""
    t = cfg.training
    if not t.sft_data:
        train, val = default_conversations(seed=0)
        return train, val, "default"
    paths = [p for p in t.sft_data.split(",") if p]
    convs = [c for p in paths for c in read_conversations(p)]
    train, val = split_conversations(convs, t.val_fraction or DEFAULT_VAL_FRACTION, seed=0)
    return train, val, "+".join(Path(p).stem for p in paths)


def run_sft(cfg: Config, runtime: Any) -> TrainResult:
    """Fine-tune ``cfg.training.init_from`` (or continue ``resume``) on the conversations."""
    t = cfg.training
    ckpt = resolve_checkpoint(t.resume or t.init_from)
    tok = ckpt / "tokenizer.json"
    if not tok.is_file():
        raise UserError(f"sft: {ckpt} has no tokenizer.json (it was trained on bare token ids); chat needs a model "
                        f"trained on text")
    if t.resume and not str((read_meta(ckpt).get("data") or {}).get("name", "")).startswith("sft:"):
        raise UserError(f"sft --resume {t.resume}: not a chat fine-tune run; start one from it with --init-from")
    train, val, source = conversations(cfg)
    if not t.checkpoint_dir and not t.resume:
        t.checkpoint_dir = str(Path("runs") / f"sft-{ckpt.parent.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    task = SFTTask(train, val, source, tok, fresh=not t.resume)
    return Trainer(cfg, runtime, task=task).fit()
