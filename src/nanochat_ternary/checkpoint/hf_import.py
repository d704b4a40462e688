"""Import a Hugging Face ``LlamaForCausalLM`` directory from disk into our GPT (issue #25).

The first step of "ternarize a model you already have": the HF weights become our GPT's, with
BitLinear layers (``quantization = "ternary"``: their shadow weights, quantized in every forward;
continue training with ``qat_start`` / ``teacher`` to recover) or as a float model
(``quantization = "none"``: logits equal transformers' up to summation order).

Accepted: ``config.json`` with ``model_type = "llama"`` (or a Llama-shaped variant that differs only
in config: no attention or MLP biases, SiLU, default RoPE, ``head_dim = hidden_size / heads``) and
``model.safetensors`` (one file). Nothing is downloaded. The name mapping is the inverse of
export/hf.py's; HF Llama's RoPE (``rotate_half``) and GQA layouts are ours, so no permutation.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ModelConfig
from ..errors import CheckpointError
from ..model.gpt import GPT

# our block linear -> HF module (export/hf.py writes the same names)
HF_LINEARS = {"attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
              "attn.wo": "self_attn.o_proj", "ffn.w1": "mlp.gate_proj", "ffn.w3": "mlp.up_proj",
              "ffn.w2": "mlp.down_proj"}


def hf_model_config(cfg: dict, quantization: str, source: Path) -> ModelConfig:
    """Our ModelConfig from an HF ``config.json`` dict; one-line error for what we cannot represent."""
    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"{source}: {why}; only Llama-architecture models import")

    if cfg.get("model_type") not in ("llama", "mistral", "qwen2"):
        raise refuse(f"model_type {cfg.get('model_type')!r}")
    if cfg.get("attention_bias") or cfg.get("mlp_bias") or cfg.get("model_type") == "qwen2":
        # Qwen2 always has q/k/v biases, which our attention does not
        raise refuse("the attention or MLP layers have biases")
    if cfg.get("hidden_act", "silu") != "silu":
        raise refuse(f"hidden_act {cfg.get('hidden_act')!r} (ours is SiLU)")
    rope = cfg.get("rope_scaling") or {}
    if rope and rope.get("rope_type", rope.get("type", "default")) != "default":
        raise refuse(f"rope_scaling {rope!r}")
    dim, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    if int(cfg.get("head_dim") or dim // heads) != dim // heads:
        raise refuse(f"head_dim {cfg.get('head_dim')} != hidden_size / num_attention_heads")
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", cfg.get("model_type") == "mistral"):
        raise refuse("sliding-window attention")
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return ModelConfig(dim=dim, n_layers=int(cfg["num_hidden_layers"]), n_heads=heads,
                       n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                       ffn_hidden=int(cfg["intermediate_size"]), vocab_size=int(cfg["vocab_size"]),
                       max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
                       weight_tied=bool(cfg.get("tie_word_embeddings", False)), rope_theta=float(theta),
                       norm_eps=float(cfg.get("rms_norm_eps", 1e-5)), quantization=quantization)


def import_hf(path: str | Path, quantization: str = "ternary") -> tuple[GPT, Path | None]:
    """``(our GPT in eval mode with the HF weights, the dir's tokenizer.json or None)``."""
    from safetensors.torch import load_file

    d = Path(path)
    if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
        raise CheckpointError(f"{d}: not a Hugging Face model dir (needs config.json and model.safetensors)")
    mcfg = hf_model_config(json.loads((d / "config.json").read_text()), quantization, d)
    hf = load_file(str(d / "model.safetensors"))
    sd = {"tok_emb.weight": hf.pop("model.embed_tokens.weight"), "norm_f.weight": hf.pop("model.norm.weight")}
    for i in range(mcfg.n_layers):
        pre = f"model.layers.{i}"
        sd[f"blocks.{i}.attn_norm.weight"] = hf.pop(f"{pre}.input_layernorm.weight")
        sd[f"blocks.{i}.ffn_norm.weight"] = hf.pop(f"{pre}.post_attention_layernorm.weight")
        for ours, theirs in HF_LINEARS.items():
            sd[f"blocks.{i}.{ours}.weight"] = hf.pop(f"{pre}.{theirs}.weight")
    if "lm_head.weight" in hf:
        head = hf.pop("lm_head.weight")
        if not mcfg.weight_tied:
            sd["lm_head.weight"] = head
    hf = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}
    if hf:
        raise CheckpointError(f"{d}: weights this importer does not know: {sorted(hf)[:3]}")
    model = GPT(mcfg)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if not (mcfg.weight_tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{d}: weights do not match the config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    tok = d / "tokenizer.json"
    return model.eval(), (tok if tok.is_file() else None)
