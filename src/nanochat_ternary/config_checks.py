"""Validation of a resolved :class:`~nanochat_ternary.config.Config`: ranges, choices and the
combinations no code path serves. Every failure is a :class:`ConfigError` whose message is one
line naming the field, its value and what is allowed (the CLI prints it and exits 1)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Config, TrainConfig

# Fields of features that are not built yet: accepted only at the off value shown.
# A feature's issue removes its entries here when it lands.
NOT_AVAILABLE_YET: dict[str, Any] = {}


def _require(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{key} = {value!r} is not valid ({allowed})")


def validate(cfg: Config) -> None:
    m, t = cfg.model, cfg.training
    for key, off in NOT_AVAILABLE_YET.items():
        val = getattr(m, key) if hasattr(m, key) else getattr(t, key)
        if val != off:
            raise ConfigError(
                f"{key} = {val!r}: this feature is not available yet in this version "
                f"(only {off!r} is accepted)"
            )
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len", "group_size"):
        _require(getattr(m, key) >= 1, key, getattr(m, key), "must be >= 1")
    _require(m.dim % m.n_heads == 0, "dim", m.dim, f"must be divisible by n_heads = {m.n_heads}")
    _require(m.head_dim % 2 == 0, "dim", m.dim, "dim / n_heads must be even for RoPE")
    _require(m.n_heads % m.n_kv_heads == 0, "n_kv_heads", m.n_kv_heads,
             f"must divide n_heads = {m.n_heads}")
    _require(m.ffn_mult > 0, "ffn_mult", m.ffn_mult, "must be > 0")
    _require(m.ffn_hidden >= 0, "ffn_hidden", m.ffn_hidden, "must be >= 0 (0 derives it from ffn_mult)")
    _require(m.quantization in ("ternary", "none"), "quantization", m.quantization,
             "allowed: 'ternary', 'none'")
    _require(m.rope_theta > 0, "rope_theta", m.rope_theta, "must be > 0")
    _require(m.norm_eps > 0, "norm_eps", m.norm_eps, "must be > 0")
    _require(m.mtp_n_tokens >= 1, "mtp_n_tokens", m.mtp_n_tokens, "must be >= 1")
    if m.use_mtp:
        _require(t.seq_len > m.mtp_n_tokens, "mtp_n_tokens", m.mtp_n_tokens,
                 f"must be < seq_len = {t.seq_len} (head k needs a token k positions ahead)")

    for key in ("batch_size", "seq_len", "grad_accum_steps", "ns_steps", "eval_batches", "log_interval",
                "quant_block_size", "galore_rank", "galore_update_freq", "n_samples", "num_workers",
                "prefetch_batches"):
        _require(getattr(t, key) >= 1, key, getattr(t, key), "must be >= 1")
    for key in ("total_steps", "warmup_steps", "eval_interval", "checkpoint_interval",
                "keep_last_checkpoints", "threads", "galore_min_dim", "sample_tokens", "seed"):
        _require(getattr(t, key) >= 0, key, getattr(t, key), "must be >= 0")
    _require(t.max_consecutive_skips >= 1, "max_consecutive_skips", t.max_consecutive_skips, "must be >= 1")
    _require(t.seq_len <= m.max_seq_len, "seq_len", t.seq_len,
             f"the model's context is max_seq_len = {m.max_seq_len}")
    _require(t.epochs >= 0, "epochs", t.epochs, "must be >= 0")
    for key in ("lr", "adam_lr"):
        _require(t.__dict__[key] > 0, key, t.__dict__[key], "must be > 0")
    _require(t.weight_decay >= 0, "weight_decay", t.weight_decay, "must be >= 0")
    _require(0 <= t.muon_momentum < 1, "muon_momentum", t.muon_momentum, "must be in [0, 1)")
    _require(all(0 <= b < 1 for b in t.adam_betas), "adam_betas", t.adam_betas, "each must be in [0, 1)")
    _require(t.adam_eps > 0, "adam_eps", t.adam_eps, "must be > 0")
    _require(t.grad_clip >= 0, "grad_clip", t.grad_clip, "must be >= 0 (0 disables)")
    _require(0 <= t.decay_start_frac <= 1, "decay_start_frac", t.decay_start_frac, "must be in [0, 1]")
    _require(0 <= t.min_lr_ratio <= 1, "min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
    _require(0 <= t.collider_sparsity < 1, "collider_sparsity", t.collider_sparsity, "must be in [0, 1)")
    _require(t.mtp_weight >= 0, "mtp_weight", t.mtp_weight, "must be >= 0")
    _require(t.galore_scale > 0, "galore_scale", t.galore_scale, "must be > 0")
    _validate_low_memory(t)
    _validate_parallelism(t)
    _validate_act_quant(cfg)
    _require(0 <= t.val_fraction < 0.5, "val_fraction", t.val_fraction,
             "must be in [0, 0.5); 0: the dataset's default split")
    _require(t.tokenizer_vocab_size >= 260, "tokenizer_vocab_size", t.tokenizer_vocab_size,
             "must be >= 260 (256 bytes + special tokens)")
    _require(t.dataset in ("", "synthetic", "tokens", "text", "stdlib", "pkgdocs"), "dataset", t.dataset,
             "allowed: synthetic, tokens, text, stdlib, pkgdocs, or empty for auto")
    # warm start and FIRE (train/warm_start.py, train/fire.py)
    _require(not (t.init_from and t.resume), "init_from", t.init_from,
             f"a warm start begins a new run, resume = {t.resume!r} continues one: give one of them")
    _require(not t.fire or bool(t.init_from or t.resume), "fire", t.fire,
             "it orthogonalises loaded weights: set init_from (or resume) too")
    if t.dataset in ("tokens", "text"):
        _require(bool(t.data_path), "data_path", t.data_path, f"--dataset {t.dataset} needs --data-path")
    dev = t.device
    _require(dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()), "device",
             dev, "allowed: auto, cpu, cuda, cuda:N")


def _validate_low_memory(t: TrainConfig) -> None:
    """The low-memory options and the combinations they cannot serve (one line each)."""
    _require(t.latent_dtype in ("float32", "bfloat16"), "latent_dtype", t.latent_dtype,
             "allowed: 'float32', 'bfloat16'")
    _require(t.latent_rounding in ("stochastic", "nearest"), "latent_rounding", t.latent_rounding,
             "allowed: 'stochastic', 'nearest'")
    _require(not (t.latent_rounding == "nearest" and t.latent_dtype == "float32"), "latent_rounding",
             t.latent_rounding, "it applies to bfloat16 latents: set latent_dtype = 'bfloat16' too")
    # AdamW's state (embedding, head, norms): "8bit" is the older use_8bit_adamw = true, FOAM folds the moments
    _require(t.adamw_state in ("fp32", "8bit", "foam"), "adamw_state", t.adamw_state,
             "allowed: 'fp32', '8bit', 'foam'")
    _require(0 <= t.foam_fold_level <= 10, "foam_fold_level", t.foam_fold_level,
             "must be in [0, 10]: moments kept per block of 2^level values, 0 is plain AdamW")
    if t.use_8bit_adamw and t.adamw_state == "foam":
        raise ConfigError("use_8bit_adamw = true with adamw_state = 'foam' asks for two AdamW states: choose one "
                          "(use_8bit_adamw = true is adamw_state = '8bit')")
    if t.optimizer_in_backward and t.grad_accum_steps > 1 and t.muon_nesterov:
        raise ConfigError(f"optimizer_in_backward = true with grad_accum_steps = {t.grad_accum_steps} needs "
                          "muon_nesterov = false (Nesterov's update needs the whole step's gradient beside the "
                          "momentum, which the in-backward step never holds)")


# what parallelism = "fsdp" does not serve yet: field, the value that is refused, why
FSDP_UNSUPPORTED = (
    ("optimizer_in_backward", True, "the in-backward step needs whole gradients"),
    ("use_8bit_optim", True, "the sharded Muon keeps fp32 momentum"),
    ("use_galore", True, "the sharded Muon keeps unprojected momentum"),
    ("use_8bit_adamw", True, "sharded AdamW keeps fp32 moments"),
    ("latent_dtype", "bfloat16", "sharded Muon matrices are fp32"),
    ("compile", "true", "compiled blocks under fully_shard are not tested yet"),
    ("init_from", None, "a warm start loads unsharded weights"),
    ("fire", True, "FIRE works on unsharded matrices"),
)


def _validate_parallelism(t: TrainConfig) -> None:
    _require(t.parallelism in ("ddp", "fsdp"), "parallelism", t.parallelism, "allowed: 'ddp', 'fsdp'")
    if t.parallelism != "fsdp":
        return
    for key, refused, why in FSDP_UNSUPPORTED:
        val = getattr(t, key)
        if (val == refused) if refused is not None else bool(val):
            raise ConfigError(f"parallelism = 'fsdp' does not support {key} = {val!r} yet ({why}): "
                              f"use parallelism = 'ddp' or drop {key}")
    if t.adamw_state != "fp32":
        raise ConfigError(f"parallelism = 'fsdp' does not support adamw_state = {t.adamw_state!r} yet "
                          f"(sharded AdamW keeps fp32 moments): use parallelism = 'ddp' or adamw_state = 'fp32'")


ACT_QUANT_CHOICES = ("int8", "int4", "fp4", "a4.8")  # model/act_quant.py's (a test keeps them equal)


def _validate_act_quant(cfg: Config) -> None:
    """BitLinear's activation format and its int8-first schedule."""
    m, t = cfg.model, cfg.training
    _require(m.act_quant in ACT_QUANT_CHOICES, "act_quant", m.act_quant,
             "allowed: " + ", ".join(repr(c) for c in ACT_QUANT_CHOICES))
    _require(m.act_block_size >= 1, "act_block_size", m.act_block_size, "must be >= 1")
    _require(t.act_quant_switch_step >= 0, "act_quant_switch_step", t.act_quant_switch_step, "must be >= 0")
    if m.act_quant != "int8":
        _require(m.quantization == "ternary", "act_quant", m.act_quant,
                 "activation formats apply to ternary BitLinears: quantization = 'none' runs in full precision")
    if m.act_quant == "fp4":
        for key, width in (("dim", m.dim), ("hidden width", m.hidden_dim)):
            _require(width % m.act_block_size == 0, "act_block_size", m.act_block_size,
                     f"fp4 blocks must divide the {key} ({width})")
    if t.act_quant_switch_step > 0:
        _require(m.act_quant != "int8", "act_quant_switch_step", t.act_quant_switch_step,
                 "switches from int8 to act_quant: set act_quant to int4, fp4 or a4.8")
        if t.total_steps > 0:
            _require(t.act_quant_switch_step < t.total_steps, "act_quant_switch_step", t.act_quant_switch_step,
                     f"must be < total_steps = {t.total_steps} (the run would never switch)")
