"""Other people's optimizers, run by the benchmark on our model and data (``bench --peers``).

Each peer replaces the whole optimizer setup of the baseline configuration; everything else (the
ternary model, data, seed, schedule, gradient clipping, step count) stays the suite's. Learning
rates come from the config so the peers are tuned no better and no worse than ours:

    torch-adamw          torch.optim.AdamW on every parameter                   lr = adam_lr
    torch-muon           torch.optim.Muon on the hidden matrices (what our Muon   lr = lr (Muon)
                         takes, same sqrt(max(1, rows/cols)) scaling) + AdamW     adam_lr for the rest
    bnb-adamw8bit        bitsandbytes AdamW8bit on every parameter              lr = adam_lr
    torchao-adamw8bit    torchao AdamW8bit on every parameter                   lr = adam_lr
    galore-torch-adamw   galore-torch GaLoreAdamW: hidden matrices projected     lr = adam_lr
                         (rank = galore_rank, refresh every galore_update_freq)

A peer whose package is not installed (``pip install 'nanochat-ternary[bench]'`` installs them) is
reported as unavailable, not run.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from torch import nn

from ..config import TrainConfig
from ..optim.factory import split_params

PeerFactory = Callable[[nn.Module, TrainConfig], list[torch.optim.Optimizer]]


def _all(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]  # shared (tied) params listed once


def _adam_kw(t: TrainConfig) -> dict:
    return dict(lr=t.adam_lr, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=0.0)


def _torch_adamw(model: nn.Module, t: TrainConfig) -> list[torch.optim.Optimizer]:
    return [torch.optim.AdamW(_all(model), **_adam_kw(t))]


def _torch_muon(model: nn.Module, t: TrainConfig) -> list[torch.optim.Optimizer]:
    muon, rest = split_params(model)
    return [torch.optim.Muon(muon, lr=t.lr, weight_decay=t.weight_decay, momentum=t.muon_momentum,
                             nesterov=True, ns_steps=t.ns_steps, adjust_lr_fn="original"),
            torch.optim.AdamW(rest, **_adam_kw(t))]


def _bnb_adamw8bit(model: nn.Module, t: TrainConfig) -> list[torch.optim.Optimizer]:
    import bitsandbytes as bnb

    return [bnb.optim.AdamW8bit(_all(model), **_adam_kw(t))]


def _torchao_adamw8bit(model: nn.Module, t: TrainConfig) -> list[torch.optim.Optimizer]:
    from torchao.optim import AdamW8bit

    return [AdamW8bit(_all(model), **_adam_kw(t))]


def _galore_adamw(model: nn.Module, t: TrainConfig) -> list[torch.optim.Optimizer]:
    from galore_torch import GaLoreAdamW

    muon, rest = split_params(model)
    groups = [{"params": rest},
              {"params": muon, "rank": t.galore_rank, "update_proj_gap": t.galore_update_freq, "scale": 0.25,
               "proj_type": "std"}]
    return [GaLoreAdamW(groups, **_adam_kw(t))]


# name -> (description, what must be importable, factory)
PEERS: dict[str, tuple[str, str, PeerFactory]] = {
    "torch-adamw": ("torch.optim.AdamW, all params", "torch", _torch_adamw),
    "torch-muon": ("torch.optim.Muon + AdamW", "torch.optim.Muon", _torch_muon),
    "bnb-adamw8bit": ("bitsandbytes AdamW8bit, all params", "bitsandbytes", _bnb_adamw8bit),
    "torchao-adamw8bit": ("torchao AdamW8bit, all params", "torchao", _torchao_adamw8bit),
    "galore-torch-adamw": ("galore-torch GaLoreAdamW", "galore_torch", _galore_adamw),
}


def peer_unavailable(name: str) -> str | None:
    """Why peer ``name`` cannot run here (a missing package), or None if it can."""
    need = PEERS[name][1]
    if need == "torch.optim.Muon":
        return None if hasattr(torch.optim, "Muon") else f"torch {torch.__version__} has no torch.optim.Muon"
    if need != "torch" and importlib.util.find_spec(need) is None:
        return f"{need} is not installed (pip install 'nanochat-ternary[bench]')"
    return None


def build_peer(name: str, model: nn.Module, tcfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """The peer's optimizers for ``model``, each param group carrying ``initial_lr`` (the schedule's
    base)."""
    opts = PEERS[name][2](model, tcfg)
    for opt in opts:
        for group in opt.param_groups:
            group["initial_lr"] = float(group["lr"])
    return opts
