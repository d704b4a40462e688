"""The models ``eval`` scores: ours (a step dir, run dir or packed file), a GGUF on llama.cpp, or
an HF export dir on transformers — one :class:`EvalModel` each, so the task code is the same.

What each engine computes (the exported weights are our exact ternary weights in every case):

* ours: int8 activations per token (absmax), fp32 arithmetic — the training forward;
* HF export (``AutoModelForCausalLM``): the same dequantized weights with full-precision
  activations (transformers does not quantize them), so the logits differ slightly;
* GGUF: the export stores the embeddings and the head in f16; llama.cpp quantizes activations to
  8 bits per block (Q8_K, 256 values, for TQ2_0 / TQ1_0; Q8_0, 32 values, for Q8_0; F32 keeps
  them), and keeps its KV cache in f16.

Scores therefore agree closely but not bit for bit; tests/test_eval_engines.py measures by how much.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import open_checkpoint
from ..data.tokenizer import load_tokenizer
from ..errors import UserError
from ..generate import generate
from .score import GPTScorer, Request, Scorer, padded_batch, split_scores, token_logprobs

# generate(prompt_ids, max_tokens, temperature, top_p, seed, stop_ids) -> new token ids
Generate = Callable[[list[int], int, float, float, int, list[int]], Iterator[int]]


@dataclass
class EvalModel:
    """What eval needs of a model, whatever runs it."""

    name: str
    path: Path
    kind: str  # "checkpoint" | "packed" | "gguf" | "hf"
    step: int | None
    max_seq_len: int
    tokenizer: Any  # encode / encode_batch / decode / eot_id (our Tokenizer, or llama.cpp's vocab)
    scorer: Scorer
    generate: Generate
    info: dict[str, Any]  # the JSON's "model" entry
    meta: dict[str, Any] = field(default_factory=dict)

    def require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise UserError(f"{self.path} has no tokenizer (it was trained on token ids without one); "
                            f"text in or out needs a model trained on text")
        return self.tokenizer


# ---------------------------------------------------------------- ours


def _ours(path: str, device: str) -> EvalModel:
    opened = open_checkpoint(path, device=device)
    m, model = opened.config.model, opened.model

    def gen(ids: list[int], n: int, temperature: float, top_p: float, seed: int, stop: list[int]) -> Iterator[int]:
        return generate(model, ids, n, temperature=temperature, top_k=None, top_p=top_p, seed=seed, stop_ids=stop)

    info = {"name": opened.name, "path": str(opened.path), "kind": opened.kind, "step": opened.step,
            "engine": "nanochat-ternary", "quantization": m.quantization, "act_quant": m.act_quant,
            "params": model.num_params(), "max_seq_len": m.max_seq_len,
            "dataset": opened.meta.get("config", {}).get("training", {}).get("dataset")}
    return EvalModel(opened.name, opened.path, opened.kind, opened.step, m.max_seq_len, opened.tokenizer,
                     GPTScorer(model), gen, info, opened.meta)


# ---------------------------------------------------------------- GGUF on llama.cpp


class LlamaTokenizer:
    """The GGUF's own vocab as eval's tokenizer (the export writes ours: the same ids, tested)."""

    def __init__(self, llm: Any) -> None:
        self.llm, self.eot_id = llm, llm.eos  # the export writes EOT as the GGUF's eos

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.llm.tokenize(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids)


class GGUFScorer(Scorer):
    """One llama.cpp context; each request is one fresh sequence (llama.cpp runs them one by one)."""

    def __init__(self, llm: Any, max_seq_len: int) -> None:
        self.llm, self.max_seq_len = llm, max_seq_len

    def batch_logprobs(self, reqs: list[Request]) -> list[np.ndarray]:
        out = []
        for r in reqs:
            logits = torch.from_numpy(self.llm.logits(r.ids[:-1], last=r.n_score))  # [n_score, V] fp32
            out.append(token_logprobs(logits, torch.tensor(r.ids[-r.n_score:])))
        return out


def _gguf(path: Path, threads: int) -> EvalModel:
    from ..checkpoint.llamacpp import open_gguf

    llm = open_gguf(path, threads=threads)
    ctx = llm.n_ctx

    def gen(ids: list[int], n: int, temperature: float, top_p: float, seed: int, stop: list[int]) -> Iterator[int]:
        return llm.generate(ids, n, temperature=temperature, top_k=None, top_p=top_p, seed=seed, stop=stop)

    info = {"name": path.name, "path": str(path), "kind": "gguf", "step": None, "engine": f"llama.cpp ({llm.backend})",
            "max_seq_len": ctx, "vocab": llm.n_vocab}
    return EvalModel(path.name, path, "gguf", None, ctx, LlamaTokenizer(llm), GGUFScorer(llm, ctx), gen, info)


# ---------------------------------------------------------------- HF export on transformers


class HFScorer(Scorer):
    """``AutoModelForCausalLM`` in fp32; right-padded batches (causal attention: padding is never read)."""

    def __init__(self, model: Any, max_seq_len: int, device: torch.device) -> None:
        self.model, self.max_seq_len, self.device = model, max_seq_len, device

    @torch.inference_mode()
    def batch_logprobs(self, reqs: list[Request]) -> list[np.ndarray]:
        x, rows, cols, tgts = padded_batch(reqs)
        logits = self.model(input_ids=x.to(self.device)).logits  # [B, L, V]
        picked = logits[torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)]  # [M, V]
        return split_scores(token_logprobs(picked, torch.tensor(tgts, device=self.device)), reqs)


def is_hf_dir(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file() and not (p / "meta.json").is_file() and any(
        p.glob("*.safetensors"))


def _hf(path: Path, device: str) -> EvalModel:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise UserError(f"{path}: an HF model dir needs transformers: pip install 'nanochat-ternary[eval]'") from None
    if not (path / "tokenizer.json").is_file():
        raise UserError(f"{path}: no tokenizer.json (eval scores text; export from a checkpoint with a tokenizer)")
    try:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r}: not a device (auto | cpu | cuda | cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(dev).eval()
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: transformers cannot load it ({str(e).splitlines()[0][:160]})") from None
    cfg = json.loads((path / "config.json").read_text())
    ctx = int(cfg.get("max_position_embeddings") or 2048)
    tok = load_tokenizer(path / "tokenizer.json")

    @torch.inference_mode()
    def gen(ids: list[int], n: int, temperature: float, top_p: float, seed: int, stop: list[int]) -> Iterator[int]:
        torch.manual_seed(seed)
        kw = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 else {
            "do_sample": False}
        out = model.generate(torch.tensor([ids], device=dev), max_new_tokens=max(0, min(n, ctx - len(ids))),
                             eos_token_id=stop or None, pad_token_id=tok.eot_id, **kw)[0, len(ids):]
        for t in out.tolist():
            if t in stop:
                return
            yield t

    ours = cfg.get("nanochat_ternary", {})
    info = {"name": path.name, "path": str(path), "kind": "hf", "step": ours.get("step"),
            "engine": f"transformers {type(model).__name__}", "quantization": ours.get("quantization"),
            "params": sum(p.numel() for p in model.parameters()), "max_seq_len": ctx}
    return EvalModel(path.name, path, "hf", ours.get("step"), ctx, tok, HFScorer(model, ctx, dev), gen, info)


def open_eval_model(path: str, device: str = "auto", threads: int = 0) -> EvalModel:
    """A step dir, run dir or packed file (ours), a ``.gguf`` (llama.cpp) or an HF export dir."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        if device not in ("auto", "cpu"):
            raise UserError(f"--device {device}: a .gguf runs on llama.cpp's CPU backend here; use --device cpu")
        return _gguf(p, threads)
    if is_hf_dir(p):
        return _hf(p, device)
    return _ours(path, device)
