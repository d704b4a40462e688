"""Hugging Face ``transformers`` directory: ``LlamaForCausalLM.from_pretrained(out)`` loads it as is.

For evaluation harnesses that speak ``transformers``: ``config.json`` (``model_type = "llama"``),
``model.safetensors`` with the *dequantized* ternary weights ``t * s`` in fp32 (exactly the
weights our forward uses) and the tokenizer files, no remote code.

What differs from our model: ``transformers`` runs the activations in full precision where our
BitLinear fake-quantizes them to int8 per token, so logits differ slightly (docs/export.md
reports by how much). The bitnet quantization of ``transformers`` is not used: it holds one weight
scale per tensor, ours has one per group.

Layout: HF Llama's RoPE (``rotate_half``) pairs ``(x_i, x_{i+d/2})``, which is our layout, so q/k
are written unpermuted; GQA is HF's ``repeat_kv`` (kv head ``h // (H / Hkv)``), also ours.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..data.tokenizer import EOT
from .common import BLOCK_LINEARS, LoadedCheckpoint, ternary_weights

HF_NAMES = {"attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
            "attn.wo": "self_attn.o_proj", "ffn.w1": "mlp.gate_proj", "ffn.w3": "mlp.up_proj",
            "ffn.w2": "mlp.down_proj"}


def hf_config(ck: LoadedCheckpoint, eot_id: int | None) -> dict:
    m = ck.config.model
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": m.dim,
        "intermediate_size": m.hidden_dim,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,  # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},  # 5.x
        "attention_bias": False,
        "mlp_bias": False,
        "vocab_size": m.vocab_size,
        "tie_word_embeddings": m.weight_tied,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": "float32",
        "nanochat_ternary": {"group_size": m.group_size, "quantization": m.quantization, "step": ck.step,
                             "note": "weights are dequantized ternary t*s; activations were int8 per token "
                                     "in training"},
    }


def hf_state_dict(ck: LoadedCheckpoint) -> dict[str, torch.Tensor]:
    """Our weights under HF Llama names (ternary matrices dequantized to fp32)."""
    model = ck.model
    tern = ternary_weights(model) if ck.config.model.quantization == "ternary" else {}
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.tok_emb.weight}
    for i, block in enumerate(model.blocks):
        pre = f"model.layers.{i}"
        sd[f"{pre}.input_layernorm.weight"] = block.attn_norm.weight
        sd[f"{pre}.post_attention_layernorm.weight"] = block.ffn_norm.weight
        for attr in BLOCK_LINEARS:
            key = f"blocks.{i}.{attr}"
            w = tern[key].dequantize() if tern else block.get_submodule(attr).weight
            sd[f"{pre}.{HF_NAMES[attr]}.weight"] = w
    sd["model.norm.weight"] = model.norm_f.weight
    if not ck.config.model.weight_tied:
        sd["lm_head.weight"] = model.lm_head.weight
    return {k: v.detach().float().contiguous().clone() for k, v in sd.items()}


def write_hf(ck: LoadedCheckpoint, out: Path, log: Callable[[str], None] = print) -> dict:
    """Write the HF directory into ``out`` (an empty temp dir the caller renames into place)."""
    from safetensors.torch import save_file

    eot_id = None
    eos_ids: int | list[int] | None = None
    if ck.tokenizer_path is not None:
        from ..data.chat_template import END, JINJA, ChatTemplate, has_chat_tokens
        from ..data.tokenizer import load_tokenizer

        tok = load_tokenizer(ck.tokenizer_path)
        eot_id = eos_ids = tok.eot_id
        eos = EOT
        chat: dict = {}
        if has_chat_tokens(tok):
            # a chat model's reply ends at <|end|>; apply_chat_template renders JINJA (see chat_template.py)
            eos, chat = END, {"chat_template": JINJA}
            eos_ids = [ChatTemplate(tok).end_id, eot_id]
            log("  chat model: tokenizer_config.json carries the chat template; eos_token <|end|>")
        (out / "tokenizer.json").write_text(ck.tokenizer_path.read_text())
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": EOT, "eos_token": eos, "unk_token": None, "pad_token": None,
            "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "model_max_length": ck.config.model.max_seq_len, **chat,
        }, indent=2))
        (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": EOT, "eos_token": eos}, indent=2))
    else:
        log("  note: the checkpoint has no tokenizer.json; the HF dir has none either")
    config = hf_config(ck, eot_id)
    config["eos_token_id"] = eos_ids
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": eot_id, "eos_token_id": eos_ids, "do_sample": True}, indent=2))
    save_file(hf_state_dict(ck), str(out / "model.safetensors"), metadata={"format": "pt"})
    return {"format": "hf"}
