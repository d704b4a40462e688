"""One typed config for a training run, assembled from layered sources.

Sources, later wins:  preset (``--config d20``)  ->  TOML file (``--config FILE.toml`` /
``--config-file``, flat keys or ``[model]`` / ``[training]`` sections as in the seeds)  ->
explicit CLI flags  ->  ``--set key=value``.

Every field has a default and a public name taken from the earlier (Rust) trainer's configs, so
their TOML files load here. A few of their spellings are accepted as aliases (``hidden_dim`` for
``dim``, ``learning_rate`` for ``lr``...). An unknown key is an error that names the closest valid
key; a wrong type or out-of-range value is an error naming the field, the value and what is
allowed. A field that belongs to a feature that is not built yet is accepted only at its off value.

Run length, one rule for every source: ``total_steps > 0`` trains that many optimizer steps;
``total_steps = 0`` trains ``epochs`` passes over the training tokens (1 when ``epochs`` is 0 too).
A source that sets ``epochs > 0`` without setting ``total_steps`` also resets ``total_steps`` to 0,
so a length in passes from a later source (a TOML file over its preset, a flag over the TOML,
``--set`` over a flag) wins over a step count from an earlier one, such as a preset's default; a
source that sets both keeps both, and ``total_steps`` wins.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from .config_checks import resolve_8bit_adamw, validate
from .errors import ConfigError

# --------------------------------------------------------------------------------------------
# Model


@dataclass
class ModelConfig:
    """Shape of the GPT. ``ffn_hidden`` is derived from ``ffn_mult`` unless set explicitly."""

    dim: int = 256  # model width (residual stream)
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # query heads (head_dim = dim / n_heads)
    n_kv_heads: int = 4  # key/value heads (GQA: query head h uses kv head h // (n_heads / n_kv_heads))
    ffn_mult: float = 2.0  # SwiGLU hidden width as a multiple of dim (see ffn_hidden)
    ffn_hidden: int = 0  # 0: round_up(dim * ffn_mult, 128)
    vocab_size: int = 4096  # token ids; data with a tokenizer sets it (rounded up to a multiple of 64)
    max_seq_len: int = 256  # context length (RoPE tables, KV cache)
    weight_tied: bool = True  # LM head shares the token embedding
    rope_theta: float = 10000.0  # RoPE base frequency
    norm_eps: float = 1e-5  # RMSNorm epsilon
    quantization: str = "ternary"  # "ternary" | "none"
    group_size: int = 128  # BitLinear weight-scale group size
    # BitLinear's activation format (docs/roadmap.md): int8 | int4 | fp4 | a4.8
    act_quant: str = "int8"
    act_block_size: int = 16  # fp4: values per E4M3 block scale
    # BitLinear's forward product (docs/performance.md)
    ternary_matmul: str = "fake_quant"  # fake_quant (GEMM of dequantized values) / int8 (exact int8 GEMM, eager) / auto
    ternary_backward: str = "auto"  # the int8 path's backward GEMMs: auto (bf16 where faster) | float32 | bfloat16
    # multi-token prediction heads (issue: training features)
    use_mtp: bool = False
    mtp_n_tokens: int = 4

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden width actually used."""
        if self.ffn_hidden > 0:
            return self.ffn_hidden
        return 128 * math.ceil(self.dim * self.ffn_mult / 128)


# --------------------------------------------------------------------------------------------
# Training (optimizer, schedule, data, run control)


@dataclass
class TrainConfig:
    # batch shape and length
    batch_size: int = 8
    seq_len: int = 256
    grad_accum_steps: int = 1
    total_steps: int = 0  # > 0: train this many steps; 0: train `epochs` passes (run-length rule above)
    epochs: float = 0.0  # passes over the training tokens, used when total_steps == 0 (0: one pass)
    # optimizer
    lr: float = 0.02  # Muon learning rate (hidden matrices)
    adam_lr: float = 0.003  # AdamW learning rate (embeddings, head, norms)
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    muon_momentum: float = 0.95
    ns_steps: int = 5
    grad_clip: float = 1.0  # 0 disables clipping
    # schedule: linear warmup, flat, linear decay over the last (1 - decay_start_frac)
    warmup_steps: int = 20
    decay_start_frac: float = 0.8
    min_lr_ratio: float = 0.0
    # "wsd" (above) | "bitnet": BitNet b1.58's two stages (train/schedule.py; docs/recipes.md): peak LR
    # until bitnet_switch_frac of the run, then a drop to bitnet_stage2_ratio x peak, linear decay to
    # min_lr_ratio, and weight decay off
    lr_schedule: str = "wsd"
    bitnet_switch_frac: float = 0.5
    bitnet_stage2_ratio: float = 0.3
    # continual QAT (train/qat.py): full precision before qat_start (0: ternary from step 0; in (0, 1):
    # that fraction of the run; >= 1: that step), then ternary, phased in over qat_ramp_steps
    qat_start: float = 0.0
    qat_ramp_steps: int = 0
    # distillation from a teacher checkpoint (train/distill.py): loss += distill_weight * T^2 *
    # KL(teacher || student) on the logits at temperature T = distill_temperature; "" = off
    teacher: str = ""
    distill_weight: float = 0.5
    distill_temperature: float = 1.0
    # memory-efficient optimizer variants (issue: memory-efficient Muon)
    use_8bit_optim: bool = False
    quant_block_size: int = 128
    stochastic_rounding: bool = False
    use_galore: bool = False
    galore_rank: int = 128
    galore_update_freq: int = 200
    galore_min_dim: int = 256
    galore_scale: float = 1.0
    galore_proj_dtype: str = "bfloat16"  # storage dtype of the GaLore projectors (float32, bfloat16, ...)
    muon_nesterov: bool = True  # Nesterov-style Muon update (false: plain EMA momentum)
    # low-memory training (issue: big models on small GPUs; docs/low_memory.md)
    optimizer_in_backward: bool = False  # Muon matrices updated in backward hooks, gradients freed at once
    latent_dtype: str = "float32"  # storage of the Muon matrices' latent weights: float32 | bfloat16
    latent_rounding: str = "stochastic"  # how bfloat16 latents are written back: stochastic | nearest
    adamw_state: str = "fp32"  # AdamW moments: fp32 | 8bit (int8 m, bf16 v; alias use_8bit_adamw = true) | foam
    foam_fold_level: int = 2  # foam: moments kept per block of 2^level values along the last dim (the authors' 2)
    # activation-format schedule (docs/roadmap.md): int8 until this step, then model.act_quant (0: from the start)
    act_quant_switch_step: int = 0
    # data-efficiency and systems features (issue: training features)
    mtp_weight: float = 0.2
    use_collider: bool = False
    collider_threshold: float = 0.3
    collider_sparsity: float = 0.35
    use_async_loader: bool = False
    num_workers: int = 2
    prefetch_batches: int = 4
    gradient_checkpointing: bool = False
    # multi-rank training under torchrun (docs/scaling.md)
    parallelism: str = "ddp"  # ddp: every rank holds the whole model | fsdp: weights, grads, optimizer state sharded
    # speed (issue: GPU speed; docs/gpu.md): "auto" compiles on CUDA only, "true" / "false" force it
    compile: str = "auto"
    # data
    dataset: str = ""  # "" = auto: stdlib without data_path, else tokens/text by the path | synthetic
    data_path: str = ""
    n_samples: int = 2000  # synthetic dataset: number of sequences
    tokenizer_vocab_size: int = 4096  # for datasets tokenized on the fly (text, stdlib)
    val_fraction: float = 0.0  # held-out share; 0: the dataset's default (see data/datasets.py)
    # chat fine-tuning (nanochat-train sft; train/sft.py, docs/chat_and_serving.md)
    sft_data: str = ""  # comma-separated conversation JSONL files; "" = the embedded default set
    sft_batching: str = "pack"  # pack: fixed seq_len windows of the conversation stream | pad: one per row
    # evaluation and logging
    eval_interval: int = 100
    eval_batches: int = 8
    eval_tasks: str = ""  # also scored at each evaluation (train/task_eval.py): task names / files, bpb:PATH; "" = off
    eval_task_limit: int = 100  # eval_tasks: items (bpb: documents) per task
    log_interval: int = 10
    log_file: str = ""
    tensorboard: str = ""
    sample_tokens: int = 200  # > 0: print a sample of this many tokens at the end of training
    sample_prompt: str = "def "
    # checkpoints
    checkpoint_dir: str = ""
    checkpoint_interval: int = 0  # 0: only the final checkpoint
    keep_last_checkpoints: int = 3  # 0: keep all
    resume: str = ""
    allow_data_change: bool = False  # resume on data other than the checkpoint's (its fingerprint differs)
    init_from: str = ""  # warm start: the weights of this checkpoint, a fresh optimizer and schedule
    fire: bool = False  # orthogonalise the loaded matrices once before continuing (FIRE; docs/roadmap.md)
    # faults: skip an update whose loss or grad norm is NaN/inf; stop after this many in a row
    max_consecutive_skips: int = 5
    # run
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # 0: leave torch's default

    @property
    def use_8bit_adamw(self) -> bool:  # the older spelling, read-only
        return self.adamw_state == "8bit"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainConfig = field(default_factory=TrainConfig)
    preset: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "model": dataclasses.asdict(self.model),
            "training": dataclasses.asdict(self.training),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Rebuild a config stored in a checkpoint (validated like any other source)."""
        if not isinstance(d, dict):
            raise ConfigError(f"checkpoint config is a {type(d).__name__}, not an object")
        preset = d.get("preset", "")
        if not isinstance(preset, str):
            raise ConfigError(f"checkpoint config: preset = {preset!r:.40} is not a string")
        cfg = cls(preset=preset)
        for section in ("model", "training"):
            if not isinstance(d.get(section, {}), dict):
                raise ConfigError(f"checkpoint config: '{section}' is a {type(d[section]).__name__}, not an object")
        apply_mapping(cfg, {"model": d.get("model", {}), "training": d.get("training", {})}, "checkpoint")
        validate(cfg)
        return cfg


# --------------------------------------------------------------------------------------------
# Presets. Counts in the comments are for the ternary models with the stated vocab.


def _preset(model: dict[str, Any], training: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    return {"model": model, "training": training or {}}


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # ~3.7M: the CPU default; trains visibly in minutes on 2 cores
    "tiny-cpu": _preset(
        dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=4, ffn_mult=2.0, vocab_size=4096, max_seq_len=256),
        dict(batch_size=16, seq_len=128, total_steps=300, warmup_steps=20, eval_interval=100),
    ),
    # ~18M
    "d20": _preset(
        dict(dim=256, n_layers=6, n_heads=4, n_kv_heads=4, ffn_mult=3.0, vocab_size=50257, max_seq_len=512),
        dict(batch_size=8, seq_len=256),
    ),
    "d20-mtp": _preset(
        dict(dim=256, n_layers=6, n_heads=4, n_kv_heads=4, ffn_mult=3.0, vocab_size=50257, max_seq_len=512,
             use_mtp=True, mtp_n_tokens=4),
        dict(batch_size=8, seq_len=256),
    ),
    # ~28M, untied head
    "test-8bit": _preset(
        dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=8, ffn_mult=2.0, vocab_size=50257, max_seq_len=512,
             weight_tied=False),
        dict(batch_size=4, seq_len=128),
    ),
    # ~127M
    "nano-125m": _preset(
        dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_mult=2.6875, vocab_size=50257,
             max_seq_len=1024),
        dict(batch_size=8, seq_len=512),
    ),
    # ~282M, untied head
    "d20-e3-full": _preset(
        dict(dim=768, n_layers=24, n_heads=12, n_kv_heads=12, ffn_mult=3.5, vocab_size=50257,
             max_seq_len=2048, weight_tied=False),
        dict(batch_size=8, seq_len=1024),
    ),
    # ~1.1B
    "nano-1b": _preset(
        dict(dim=2048, n_layers=20, n_heads=16, n_kv_heads=16, ffn_mult=2.6875, vocab_size=50257,
             max_seq_len=2048),
        dict(batch_size=4, seq_len=2048),
    ),
    # ~1.6B, grouped-query attention
    "medium-3b": _preset(
        dict(dim=2048, n_layers=28, n_heads=32, n_kv_heads=8, ffn_mult=3.5, vocab_size=50257,
             max_seq_len=4096),
        dict(batch_size=4, seq_len=2048),
    ),
    # ~6B
    "large-7b": _preset(
        dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_mult=2.6875, vocab_size=128000,
             max_seq_len=4096),
        dict(batch_size=2, seq_len=4096),
    ),
}

DEFAULT_PRESET = "tiny-cpu"

# The earlier trainer's spellings that mean the same thing as one of our fields.
ALIASES: dict[str, str] = {
    "hidden_dim": "dim",
    "num_layers": "n_layers",
    "num_heads": "n_heads",
    "num_kv_heads": "n_kv_heads",
    "seq_length": "seq_len",
    "learning_rate": "lr",
    "tie_embeddings": "weight_tied",
    "max_steps": "total_steps",
}

# A spelling that sets another field: use_8bit_adamw = true is adamw_state = "8bit" (resolved per source,
# against the adamw_state the same source gives: config_checks.resolve_8bit_adamw).
VALUE_ALIASES: dict[str, tuple[str, str]] = {"use_8bit_adamw": ("adamw_state", "8bit")}  # = true means

# TOML sections are only grouping: a key is resolved by its name wherever it appears.
KNOWN_SECTIONS = ("model", "training", "optimizer", "data", "hardware", "run")

# String fields that take "auto", "true" or "false" (TOML booleans accepted).
TRISTATE_FIELDS = frozenset({"compile"})


_MODEL_FIELDS = {f.name: f for f in fields(ModelConfig)}
_TRAIN_FIELDS = {f.name: f for f in fields(TrainConfig)}
ALL_KEYS = sorted(set(_MODEL_FIELDS) | set(_TRAIN_FIELDS))


def _section_of(key: str) -> str:
    return "model" if key in _MODEL_FIELDS else "training"


def _closest(key: str) -> str:
    match = difflib.get_close_matches(key, ALL_KEYS + list(ALIASES) + list(VALUE_ALIASES), n=1, cutoff=0.0)
    return ALIASES.get(match[0], match[0]) if match else ""


def canonical_key(key: str, source: str) -> str:
    """The field a key names (a value alias, ``use_8bit_adamw``, is returned as itself)."""
    key = key.strip().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in _MODEL_FIELDS and key not in _TRAIN_FIELDS and key not in VALUE_ALIASES:
        raise ConfigError(f"{source}: unknown config key '{key}' (did you mean '{_closest(key)}'?)")
    return key


def _field_type(key: str) -> Any:
    if key in VALUE_ALIASES:
        return "bool"
    f = _MODEL_FIELDS.get(key) or _TRAIN_FIELDS[key]
    return f.type


def coerce(key: str, value: Any, source: str) -> Any:
    """Convert a TOML value or a ``--set`` string to the field's type, or raise ConfigError."""
    typ = _field_type(key)
    from_str = isinstance(value, str)

    def bad(allowed: str) -> ConfigError:
        return ConfigError(f"{source}: {key} = {value!r} is not valid ({allowed})")

    if typ in ("bool", bool):
        if isinstance(value, bool):
            return value
        if from_str and value.lower() in ("true", "1", "yes", "on"):
            return True
        if from_str and value.lower() in ("false", "0", "no", "off"):
            return False
        raise bad("expected true or false")
    if typ in ("int", int):
        if isinstance(value, bool):
            raise bad("expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if from_str:
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    raise bad("expected an integer") from None
                if f.is_integer():
                    return int(f)
        raise bad("expected an integer")
    if typ in ("float", float):
        if isinstance(value, bool):
            raise bad("expected a number")
        if isinstance(value, (int, float)):
            return float(value)
        if from_str:
            try:
                return float(value)
            except ValueError:
                pass
        raise bad("expected a number")
    if typ in ("str", str):
        if key in TRISTATE_FIELDS:  # "auto" | "true" | "false", given as a TOML bool or a string
            text = ("true" if value else "false") if isinstance(value, bool) else value
            if isinstance(text, str) and text.lower() in ("auto", "true", "false"):
                return text.lower()
            raise bad("expected auto, true or false")
        if isinstance(value, str):
            return value
        raise bad("expected a string")
    if typ in ("tuple[float, float]",):
        seq = value
        if from_str:
            seq = [s for s in value.strip("()[] ").split(",") if s.strip()]
        try:
            pair = tuple(float(v) for v in seq)
        except (TypeError, ValueError):
            raise bad("expected two numbers, e.g. 0.9,0.95") from None
        if len(pair) != 2:
            raise bad("expected two numbers, e.g. 0.9,0.95")
        return pair
    raise ConfigError(f"{source}: {key} has an unsupported type {typ}")  # programming error


def apply_items(cfg: Config, items: list[tuple[str, Any, str]]) -> None:
    """One source's ``(key, value, source name)`` in order, later wins; a value alias
    (``use_8bit_adamw``) is resolved once the source's own keys are in."""
    aliased: dict[str, tuple[bool, str]] = {}
    given: set[str] = set()
    for key, value, source in items:
        key = canonical_key(key, source)
        value = coerce(key, value, source)
        if key in VALUE_ALIASES:
            aliased[key] = (value, source)
            continue
        given.add(key)
        setattr(cfg.model if _section_of(key) == "model" else cfg.training, key, value)
    if "use_8bit_adamw" in aliased:
        resolve_8bit_adamw(cfg.training, *aliased["use_8bit_adamw"], state_given="adamw_state" in given)


def apply_mapping(cfg: Config, data: dict[str, Any], source: str) -> None:
    """Apply a (possibly sectioned) mapping such as a parsed TOML file."""
    items: list[tuple[str, Any, str]] = []
    for k, v in data.items():
        if isinstance(v, dict):
            if k not in KNOWN_SECTIONS:
                raise ConfigError(
                    f"{source}: unknown section [{k}] (sections allowed: {', '.join(KNOWN_SECTIONS)})"
                )
            for kk, vv in v.items():
                if isinstance(vv, dict):
                    raise ConfigError(f"{source}: nested section [{k}.{kk}] is not supported")
                items.append((kk, vv, source))
        else:
            items.append((k, v, source))
    apply_items(cfg, items)


def _keys_of(data: dict[str, Any], source: str) -> set[str]:
    """The canonical field names a (possibly sectioned) mapping sets."""
    keys: set[str] = set()
    for k, v in data.items():
        for kk in (v if isinstance(v, dict) else {k: v}):
            keys.add(canonical_key(kk, source))
    return keys


def _apply_length_rule(cfg: Config, keys: set[str]) -> None:
    """One source's run length (see the module docstring): epochs without total_steps means passes."""
    if "epochs" in keys and "total_steps" not in keys and cfg.training.epochs > 0:
        cfg.training.total_steps = 0


def apply_preset(cfg: Config, name: str) -> None:
    if name not in PRESETS:
        match = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.0)
        raise ConfigError(
            f"unknown preset '{name}' (did you mean '{match[0]}'? presets: {', '.join(PRESETS)})"
        )
    apply_mapping(cfg, PRESETS[name], f"preset {name}")
    cfg.preset = name


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():  # a FIFO or device is never opened (it could block or never end)
        what = "not a regular file" if p.exists() else "not found"
        raise ConfigError(f"config file {what}: {p}")
    try:
        with p.open("rb") as fh:
            raw = fh.read(MAX_TOML_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{p}: cannot read it ({e.strerror or e})") from None
    if len(raw) > MAX_TOML_BYTES:
        raise ConfigError(f"{p}: larger than {MAX_TOML_BYTES // 2**20} MiB, not a config file")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a text (UTF-8) file, so not TOML (byte {e.start}: {e.reason})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{p}: invalid TOML: nested too deeply") from None


MAX_TOML_BYTES = 16 * 2**20  # a config is a few KiB; read no more than this (a TOML path could be /dev/zero)


def packaged_config_dir() -> Path:
    """The configs shipped inside the package (presets as TOML, the E3 suite)."""
    return Path(__file__).resolve().parent / "configs"


def resolve_config_path(name: str) -> Path | None:
    """A TOML path as given, else the shipped config of that name: ``e3/full.toml``,
    ``configs/e3/full.toml`` (the repo path, valid from any directory after a plain install) or
    ``e3/full`` all find the packaged file."""
    p = Path(name)
    if p.is_file():
        return p
    rel = Path(*p.parts[1:]) if p.parts[:1] == ("configs",) and len(p.parts) > 1 else p
    q = packaged_config_dir() / rel
    for cand in (q, q.with_suffix(".toml")):
        if cand.is_file():
            return cand
    return None


def shipped_configs() -> list[str]:
    """Names of the TOML configs shipped with the package, relative to its configs dir."""
    root = packaged_config_dir()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.toml"))


def build_config(
    config: str | None = None,
    config_file: str | None = None,
    cli: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    base: Config | None = None,
    preset: str | None = None,
) -> Config:
    """Resolve a config from its sources. ``config`` is a preset name or a TOML path.

    A TOML file may name a base preset with ``preset = "d20"`` at top level; otherwise it applies
    on top of the default preset. ``base`` (a checkpoint's config, when resuming) replaces the
    preset layer. ``preset`` names the base preset outright, over one a TOML file names (the
    benchmark runs every config on its suite's model).
    """
    cfg = Config()
    sources: list[tuple[str, dict[str, Any]]] = []
    forced, preset = preset, DEFAULT_PRESET
    for spec in (config, config_file):
        if not spec:
            continue
        if spec in PRESETS:
            preset = spec
            continue
        path = resolve_config_path(spec)
        if path is None:
            if spec.endswith(".toml") or "/" in spec:
                raise ConfigError(f"config file not found: {spec}")
            apply_preset(cfg, spec)  # raises with a suggestion
        data = load_toml(path)
        named = data.pop("preset", None)
        if named is not None:
            if not isinstance(named, str):
                raise ConfigError(f"{path}: preset must be a string")
            preset = named
        sources.append((str(path), data))
    if forced is not None:
        preset = forced
    if base is not None:
        cfg = dataclasses.replace(base, model=dataclasses.replace(base.model),
                                  training=dataclasses.replace(base.training))
    else:
        apply_preset(cfg, preset)
    for src, data in sources:
        apply_mapping(cfg, data, src)
        _apply_length_rule(cfg, _keys_of(data, src))
    flags = {k: v for k, v in (cli or {}).items() if v is not None}
    apply_items(cfg, [(k, v, f"--{k.replace('_', '-')}") for k, v in flags.items()])
    _apply_length_rule(cfg, {canonical_key(k, "flag") for k in flags})
    sets: list[tuple[str, Any, str]] = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        sets.append((k, v.strip(), f"--set {k.strip()}"))
    apply_items(cfg, sets)
    _apply_length_rule(cfg, {canonical_key(k, src) for k, _, src in sets})
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------
# Printing


def format_config(cfg: Config) -> str:
    """The resolved config as TOML-ish text, printed at the start of a run."""
    model, training = dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.training)
    return "\n".join([f"# preset: {cfg.preset or '-'}", "[model]", *(f"{k} = {_fmt(v)}" for k, v in model.items()),
                      "[training]", *(f"{k} = {_fmt(v)}" for k, v in training.items())])


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, tuple):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return repr(v)
