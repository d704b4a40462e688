"""Distillation from a teacher checkpoint (``teacher``, ``distill_weight``, ``distill_temperature``).

The student's objective gains a KL term on the logits of every token::

    p_t = softmax(z_teacher / T)     log p_s = log_softmax(z_student / T)       [B*T, V]
    KL  = mean over tokens of  sum_v p_t * (log p_t - log p_s)
    loss = objective's loss + distill_weight * T^2 * KL

``T^2`` keeps the KL's gradient on the scale of the CE's as ``T`` grows (Hinton et al., 2015). The
teacher (any of our checkpoints with the same tokenizer and vocab: typically a float model of the
same shape) runs under ``torch.inference_mode`` in eval mode, in the run's autocast (bf16 on CUDA,
fp32 on CPU); it adds one forward per micro-batch, logged as ``teacher_tok_per_s`` (tokens of the
micro-batch / seconds of the teacher's forward) next to the run's ``tok_per_s``. The logged ``loss``
stays the plain next-token CE (comparable with runs without distillation); ``distill_kl`` is the KL.

Memory: the KL needs the student's ``[B*T, V]`` logits (one more LM-head matmul than the plain CE,
and they are kept for its backward) and the teacher's; the chunked head (CUDA, gradient
checkpointing) does not cover this term yet.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checkpoint import open_checkpoint
from ..config import Config
from ..errors import CheckpointError, UserError
from ..model.gpt import GPT


def distill_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Mean over tokens of KL(softmax(t / T) || softmax(s / T)); logits ``[..., V]``, fp32 result."""
    V = student_logits.shape[-1]
    log_s = F.log_softmax(student_logits.float().reshape(-1, V) / temperature, dim=-1)  # [N, V]
    log_t = F.log_softmax(teacher_logits.float().reshape(-1, V) / temperature, dim=-1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)


def load_teacher(path: str, device: torch.device) -> tuple[GPT, dict[str, Any], Path]:
    """The teacher checkpoint (a checkpoint dir, or a run dir: its latest) as an eval-mode GPT on
    ``device`` without gradients, with its meta (its tokenizer is checked against the run's) and dir."""
    opened = open_checkpoint(path, device, kinds=("checkpoint",))
    opened.model.requires_grad_(False)
    return opened.model, opened.meta, opened.path


class Distiller:
    """Wraps the run's objective: ``prepare(x)`` runs the teacher on a micro-batch's inputs; the next
    call (the student's forward, inside ``GPT.forward``) adds the KL term to that batch's loss."""

    def __init__(self, cfg: Config, base: Any, device: torch.device, data_fingerprint: dict[str, Any],
                 autocast: Any) -> None:
        t = cfg.training
        self.base = base
        self.weight, self.temperature = t.distill_weight, t.distill_temperature
        self.autocast = autocast  # the runtime's autocast context factory
        self.teacher, meta, self.ckpt = load_teacher(t.teacher, device)
        tv = self.teacher.cfg.vocab_size
        if tv != cfg.model.vocab_size:
            raise UserError(f"teacher {self.ckpt}: vocab_size {tv} differs from the student's "
                            f"{cfg.model.vocab_size}; the teacher must use the run's tokenizer")
        if self.teacher.cfg.max_seq_len < t.seq_len:
            raise UserError(f"teacher {self.ckpt}: max_seq_len {self.teacher.cfg.max_seq_len} is shorter than the "
                            f"run's seq_len {t.seq_len}")
        theirs = (meta.get("data_fingerprint") or {}).get("tokenizer_sha256")
        ours = data_fingerprint.get("tokenizer_sha256")
        if theirs != ours:
            raise CheckpointError(f"teacher {self.ckpt} was trained with another tokenizer (sha256 "
                                  f"{str(theirs)[:12]} vs the run's {str(ours)[:12]}); its logits mean other tokens")
        self.teacher_logits: Tensor | None = None
        self.teacher_s = 0.0
        self.tokens = 0

    def line(self) -> str:
        q = self.teacher.cfg.quantization
        return (f"distillation: teacher {self.ckpt} ({self.teacher.num_params() / 1e6:.2f}M params, "
                f"quantization={q}), loss += {self.weight:g} * T^2 * KL at T = {self.temperature:g}")

    def prepare(self, x: Tensor) -> None:
        self.base.prepare(x)
        t0 = time.perf_counter()
        with torch.inference_mode(), self.autocast():
            logits = self.teacher(x)  # [B, T, V] fp32
        if logits.is_cuda:
            torch.cuda.synchronize(logits.device)
        self.teacher_s = time.perf_counter() - t0
        self.tokens = x.numel()
        self.teacher_logits = logits.clone()  # out of inference mode: usable in the autograd graph

    def __call__(self, model: Any, h: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss, stats = self.base(model, h, targets)
        if self.teacher_logits is None:
            raise RuntimeError("Distiller: prepare(x) must run before the student's forward")
        if torch.is_grad_enabled() and self.weight > 0:
            kl = distill_kl(model.logits(h), self.teacher_logits, self.temperature)
            loss = loss + (self.weight * self.temperature ** 2) * kl
            stats["distill_kl"] = kl.detach()
        stats["teacher_tok_per_s"] = torch.tensor(self.tokens / max(self.teacher_s, 1e-9))
        self.teacher_logits = None
        return loss, stats
