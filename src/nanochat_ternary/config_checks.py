"""Validation of a resolved :class:`~nanochat_ternary.config.Config`: ranges, choices and the
combinations no code path serves. Every failure is a :class:`ConfigError` whose message is one
line naming the field, its value and what is allowed (the CLI prints it and exits 1)."""

from __future__ import annotations

import dataclasses
import math
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


# Upper bounds on the model's shape: far above any real model (large-7b: dim 4096, 32 layers, vocab
# 128000), low enough that a typo or a crafted file (n_layers = 1e12) is refused at config time
# instead of exhausting memory while the model is built; and on a few resource counts.
SHAPE_LIMITS: dict[str, int] = {"dim": 65536, "n_layers": 1024, "n_heads": 4096, "n_kv_heads": 4096,
                                "vocab_size": 2**24, "max_seq_len": 2**20, "ffn_hidden": 2**20,
                                "group_size": 2**30, "act_block_size": 2**16, "mtp_n_tokens": 64,
                                # resources a typo would exhaust: processes, threads, memory
                                "threads": 4096, "num_workers": 256, "prefetch_batches": 4096,
                                "eval_batches": 10**6, "n_samples": 10**8}
MAX_FFN_MULT = 64.0
MAX_EPOCHS = 1e6
# any other integer: exactly representable in JSON/float64 (meta.json, TOML) and within torch's seed range
MAX_INT = 2**53


def _check_numbers(cfg: Config) -> None:
    """Every number is finite and of a sane size, before any range check compares it (NaN compares
    false with everything, so ``lr > 0`` alone lets ``lr = nan`` through, and ``inf`` passes it)."""
    for section in (cfg.model, cfg.training):
        for f in dataclasses.fields(section):
            v = getattr(section, f.name)
            items = v if isinstance(v, tuple) else (v,)
            for x in items:
                if isinstance(x, bool) or not isinstance(x, (int, float)):
                    continue
                if isinstance(x, float) and not math.isfinite(x):
                    raise ConfigError(f"{f.name} = {v!r} is not valid (must be a finite number)")
                if isinstance(x, int) and abs(x) > SHAPE_LIMITS.get(f.name, MAX_INT):
                    raise ConfigError(f"{f.name} = {x} is not valid (must be at most "
                                      f"{SHAPE_LIMITS.get(f.name, MAX_INT):,})")
    _require(cfg.model.ffn_mult <= MAX_FFN_MULT, "ffn_mult", cfg.model.ffn_mult, f"must be <= {MAX_FFN_MULT:g}")
    _require(cfg.model.hidden_dim <= SHAPE_LIMITS["ffn_hidden"], "ffn_mult", cfg.model.ffn_mult,
             f"dim * ffn_mult must be <= {SHAPE_LIMITS['ffn_hidden']:,}")
    _require(cfg.training.epochs <= MAX_EPOCHS, "epochs", cfg.training.epochs, f"must be <= {MAX_EPOCHS:g}")


def validate(cfg: Config) -> None:
    m, t = cfg.model, cfg.training
    _check_numbers(cfg)
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
                "prefetch_batches", "eval_task_limit"):
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
    _require(t.lr_schedule in ("wsd", "bitnet"), "lr_schedule", t.lr_schedule, "allowed: 'wsd', 'bitnet'")
    _require(0 <= t.bitnet_switch_frac <= 1, "bitnet_switch_frac", t.bitnet_switch_frac, "must be in [0, 1]")
    _require(0 < t.bitnet_stage2_ratio <= 1, "bitnet_stage2_ratio", t.bitnet_stage2_ratio, "must be in (0, 1]")
    _require(t.qat_start >= 0 and (t.qat_start < 1 or t.qat_start.is_integer()), "qat_start", t.qat_start,
             "a fraction of the run in [0, 1) or a whole step number >= 1")
    _require(t.qat_ramp_steps >= 0, "qat_ramp_steps", t.qat_ramp_steps, "must be >= 0")
    if t.qat_start > 0 or t.qat_ramp_steps > 0:
        _require(m.quantization == "ternary", "qat_start", t.qat_start, "continual QAT needs quantization = 'ternary'")
    _require(t.distill_weight >= 0, "distill_weight", t.distill_weight, "must be >= 0")
    _require(t.distill_temperature > 0, "distill_temperature", t.distill_temperature, "must be > 0")
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


def resolve_8bit_adamw(t: TrainConfig, on: bool, source: str, state_given: bool) -> None:
    """One source's ``use_8bit_adamw`` (config.VALUE_ALIASES): ``true`` is ``adamw_state = "8bit"``
    (over an fp32 the same source gives, as it always was); ``false`` turns an earlier source's
    ``"8bit"`` back to ``"fp32"`` unless this source names the state itself."""
    if on and state_given and t.adamw_state == "foam":
        raise ConfigError(f"{source}: use_8bit_adamw = true with adamw_state = 'foam' asks for two AdamW states: "
                          f"choose one (use_8bit_adamw = true is adamw_state = '8bit')")
    if on:
        t.adamw_state = "8bit"
    elif not state_given and t.adamw_state == "8bit":
        t.adamw_state = "fp32"


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
    if t.optimizer_in_backward and t.grad_accum_steps > 1 and t.muon_nesterov:
        raise ConfigError(f"optimizer_in_backward = true with grad_accum_steps = {t.grad_accum_steps} needs "
                          "muon_nesterov = false (Nesterov's update needs the whole step's gradient beside the "
                          "momentum, which the in-backward step never holds)")


# what parallelism = "fsdp" does not serve yet: field, the value that is refused, why
FSDP_UNSUPPORTED = (
    ("optimizer_in_backward", True, "the in-backward step needs whole gradients"),
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
    _require(m.ternary_matmul in ("fake_quant", "int8", "auto"), "ternary_matmul", m.ternary_matmul,
             "allowed: 'fake_quant', 'int8', 'auto'")
    _require(m.ternary_backward in ("auto", "float32", "bfloat16"), "ternary_backward", m.ternary_backward,
             "allowed: 'auto', 'float32', 'bfloat16'")
    _require(not (m.ternary_matmul != "fake_quant" and t.compile == "true"), "ternary_matmul", m.ternary_matmul,
             "the int8 path runs eagerly: set compile = false, or ternary_matmul = 'fake_quant' to compile")
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
