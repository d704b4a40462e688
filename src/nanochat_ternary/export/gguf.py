"""GGUF for llama.cpp: our GPT as its ``llama`` architecture, ternary blocks as TQ2_0 / TQ1_0 / Q8_0.

Why ``llama`` and not llama.cpp's ``bitnet``: that one expects BitNet's extra sub-norms, which our
blocks do not have; ``llama`` is exactly our graph (RMSNorm, RoPE, GQA, SwiGLU, optional tied
head) and its matmuls accept the ternary types.

Weight types (one fp16 scale ``d`` per block, dequantized as ``d * q``):

* TQ2_0: 256 weights per block, 2-bit codes ``q+1``: 66 bytes = 2.06 bits/weight.
* TQ1_0: 256 weights per block, base-3 packed codes: 54 bytes = 1.69 bits/weight.
* Q8_0: 32 weights per block, int8 codes: 34 bytes = 8.5 bits/weight. We write ``q = t`` and
  ``d = fp16(s)`` ourselves (gguf's own Q8_0 quantizer would use ``d = s/127``, ``q = 127t``, a
  coarser fp16 scale), so all three types hold exactly ``t * fp16(s)``.
* F16 / F32: the dequantized weights, for speed and accuracy comparisons.

A block holds one scale, so TQ is exact only when every 256 weights share a scale (a model
trained with ``group_size = 256``, or per-row scales with rows a multiple of 256). Anything else
is refused (see :func:`~.common.block_scales`); the only rounding is the scale to fp16 (relative
error <= 2**-11), which GGUF cannot avoid.

RoPE layout: llama.cpp's ``llama`` rotates adjacent pairs, ours rotates ``(x_i, x_{i+d/2})``, so
the q and k rows are permuted per head (:func:`~.common.llama_qk_permutation`). The tokenizer
(byte-level BPE with the GPT-2 split regex) goes in as ``tokenizer.ggml.model = "gpt2"`` with
pre-tokenizer ``"gpt-2"``, padded with unused tokens up to the model's vocab rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .common import BLOCK_LINEARS, ExportError, LoadedCheckpoint, block_scales, llama_qk_permutation, ternary_weights

QUANTS = ("tq2_0", "tq1_0", "q8_0", "f16", "f32")

# our block attribute -> llama.cpp tensor name
GGUF_NAMES = {"attn.wq": "attn_q", "attn.wk": "attn_k", "attn.wv": "attn_v", "attn.wo": "attn_output",
              "ffn.w1": "ffn_gate", "ffn.w3": "ffn_up", "ffn.w2": "ffn_down"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ExportError("--format gguf needs the 'gguf' package: pip install 'nanochat-ternary[export]'") from None
    return gguf


def _q8_0_blocks(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Q8_0 bytes ``[rows, cols/32 * 34]``: per block the fp16 scale then 32 int8 codes."""
    rows, cols = codes.shape
    d = scales.astype(np.float16).reshape(rows, cols // 32, 1).view(np.uint8)  # [R, B, 2]
    q = codes.astype(np.int8).reshape(rows, cols // 32, 32).view(np.uint8)  # [R, B, 32]
    return np.concatenate([d, q], axis=-1).reshape(rows, -1)


def _block_tensor(gguf, codes: torch.Tensor, smap: torch.Tensor, quant: str, name: str, group_size: int):
    """``(data, raw_dtype)`` for one ternary matrix in ``quant``."""
    Q = gguf.GGMLQuantizationType
    if quant in ("f16", "f32"):
        w = (codes.float() * smap).numpy()
        return (w.astype(np.float16), Q.F16) if quant == "f16" else (w.astype(np.float32), Q.F32)
    block = 32 if quant == "q8_0" else 256
    s = block_scales(codes, smap, block, name, quant.upper(), group_size)  # [R, C/block] or refuse
    c = codes.numpy()
    if quant == "q8_0":
        return _q8_0_blocks(c, s), Q.Q8_0
    # TQ: gguf's quantizer takes d = max|x| of the block = s (exact: every non-zero |x| is s), then
    # codes round(x / d) = t; only d is rounded, to fp16.
    x = c.astype(np.float32) * np.repeat(s, block, axis=1)
    qt = Q.TQ2_0 if quant == "tq2_0" else Q.TQ1_0
    return gguf.quants.quantize(x, qt), qt


def _tokenizer_kv(writer, tokenizer_path: Path, n_vocab: int) -> None:
    """Embed the byte-level BPE: tokens (padded to ``n_vocab``), types, merges, special ids."""
    gguf = _gguf()
    from ..data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    data = json.loads(tokenizer_path.read_text())
    if tok.vocab_size > n_vocab:
        raise ExportError(f"tokenizer has {tok.vocab_size} tokens but the model only {n_vocab} embedding rows")
    special = {a["content"] for a in data.get("added_tokens", []) if a.get("special")}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        t = tok.hf.id_to_token(i) if i < tok.vocab_size else None
        if t is None:  # padding rows of the embedding: never produced
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data.get("model", {}).get("merges", [])]
    if not merges:
        # gguf-py drops an empty array, and llama.cpp's gpt2 tokenizer refuses a file without the
        # merges key ("cannot find tokenizer merges"): a GGUF it cannot load is not an export
        raise ExportError(f"{tokenizer_path}: a byte-level tokenizer without merges (a model trained on "
                          f"--dataset synthetic or bare token ids), which llama.cpp's gpt2 tokenizer cannot "
                          f"load; use --format packed or hf, or train on text")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # our ByteLevel(use_regex=True) split = GPT-2's regex
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tok.eot_id)  # documents are separated (not opened) by EOT
    writer.add_eos_token_id(tok.eot_id)
    writer.add_add_bos_token(False)  # our prompts carry no BOS; text is encoded as is


def exact_quant(ck: LoadedCheckpoint) -> tuple[str, str]:
    """``(quant, why)``: the most compact GGUF type that stores every block matrix exactly: TQ2_0
    when each 256 weights of a row share a scale (groups of 256, or per-row scales), else Q8_0
    (blocks of 32: groups of 128, 64, 32); f16 for a full-precision model. An ExportError when none
    is exact (groups under 32, or rows that are not whole blocks)."""
    m = ck.config.model
    if m.quantization != "ternary":
        return "f16", "a full-precision model: f16"
    tern = ternary_weights(ck.model)
    for quant, block in (("tq2_0", 256), ("q8_0", 32)):
        try:
            for name, tt in tern.items():
                block_scales(tt.codes, tt.scale_map(), block, name, quant.upper(), tt.group_size)
        except ExportError:
            continue
        return quant, f"{quant} is exact for group_size {m.group_size} (one scale per {block} weights)"
    raise ExportError(f"no ternary GGUF type holds group_size {m.group_size} exactly (TQ2_0 needs one scale per 256 "
                      f"weights, Q8_0 per 32): pass --quant f16 or f32")


def _chat_kv(writer, tokenizer_path: Path) -> bool:
    """A chat model's template (``tokenizer.chat_template``) and end-of-turn token
    (``tokenizer.ggml.eot_token_id``: llama.cpp ends a generation there). False for a base model."""
    from ..data.chat_template import JINJA, ChatTemplate, has_chat_tokens
    from ..data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    if not has_chat_tokens(tok):
        return False
    writer.add_chat_template(JINJA)
    writer.add_eot_token_id(ChatTemplate(tok).end_id)
    return True


def write_gguf(ck: LoadedCheckpoint, out: Path, quant: str = "tq2_0", log: Callable[[str], None] = print) -> dict:
    """Write ``ck``'s model to ``out`` (a file path that must not exist yet); returns a summary."""
    gguf = _gguf()
    if quant not in QUANTS:
        raise ExportError(f"--quant {quant}: unknown (gguf takes {', '.join(QUANTS)})")
    if ck.tokenizer_path is None:
        raise ExportError(f"checkpoint {ck.path} has no tokenizer.json, which llama.cpp needs to run the model "
                          "(train on text, a prepared data dir or the default corpus)")
    m = ck.config.model
    model = ck.model
    ternary = m.quantization == "ternary"
    if not ternary and quant not in ("f16", "f32"):
        raise ExportError("this checkpoint is a full-precision model (quantization = 'none'): "
                          "use --quant f16 or f32")
    Q = gguf.GGMLQuantizationType
    ftype = {"tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0, "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "f32": gguf.LlamaFileType.ALL_F32}[quant]
    dense = np.float32 if quant == "f32" else np.float16  # embeddings / untied head

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(f"nanochat-ternary {ck.config.preset or 'custom'} step {ck.step}")
    w.add_context_length(m.max_seq_len)
    w.add_embedding_length(m.dim)
    w.add_block_count(m.n_layers)
    w.add_feed_forward_length(m.hidden_dim)
    w.add_head_count(m.n_heads)
    w.add_head_count_kv(m.n_kv_heads)
    w.add_layer_norm_rms_eps(m.norm_eps)
    w.add_rope_freq_base(m.rope_theta)
    w.add_rope_dimension_count(m.head_dim)
    w.add_vocab_size(m.vocab_size)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer_kv(w, ck.tokenizer_path, m.vocab_size)
    if _chat_kv(w, ck.tokenizer_path):
        log("  chat model: tokenizer.chat_template and the <|end|> end-of-turn token written")

    def f32(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().numpy()

    w.add_tensor("token_embd.weight", f32(model.tok_emb.weight).astype(dense))
    tern = ternary_weights(model) if ternary else {}
    perm_q = llama_qk_permutation(m.n_heads, m.head_dim)
    perm_k = llama_qk_permutation(m.n_kv_heads, m.head_dim)
    for i, block in enumerate(model.blocks):
        w.add_tensor(f"blk.{i}.attn_norm.weight", f32(block.attn_norm.weight))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", f32(block.ffn_norm.weight))
        for attr in BLOCK_LINEARS:
            name = f"blk.{i}.{GGUF_NAMES[attr]}.weight"
            order = perm_q if attr == "attn.wq" else perm_k if attr == "attn.wk" else None
            if ternary:
                tt = tern[f"blocks.{i}.{attr}"]
                codes, smap = (tt.codes, tt.scale_map()) if order is None else tt.permute_rows(order)
                data, raw = _block_tensor(gguf, codes, smap, quant, name, tt.group_size)
            else:
                wt = block.get_submodule(attr).weight.detach().float()
                wt = wt if order is None else wt[order]
                data, raw = f32(wt).astype(dense), (Q.F32 if quant == "f32" else Q.F16)
            w.add_tensor(name, data, raw_dtype=raw if data.dtype == np.uint8 else None)
        log(f"  block {i + 1}/{m.n_layers}")
    w.add_tensor("output_norm.weight", f32(model.norm_f.weight))
    if not m.weight_tied:  # tied: llama.cpp reuses token_embd when output.weight is absent
        w.add_tensor("output.weight", f32(model.lm_head.weight).astype(dense))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"format": "gguf", "quant": quant, "block_params": sum(t.codes.numel() for t in tern.values())}
