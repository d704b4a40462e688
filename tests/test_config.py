"""Config layering, TOML forms, and the one-line errors for bad keys and values."""

import pytest

from nanochat_ternary.config import (
    PRESETS,
    Config,
    ConfigError,
    build_config,
)
from nanochat_ternary.config_checks import NOT_AVAILABLE_YET


def test_defaults_are_tiny_cpu():
    cfg = build_config()
    assert cfg.preset == "tiny-cpu"
    assert cfg.model.dim == 256 and cfg.model.n_layers == 4 and cfg.model.vocab_size == 4096
    assert cfg.training.dataset == ""  # auto: the stdlib corpus when no data path is given


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_resolves(name):
    cfg = build_config(name)
    assert cfg.preset == name
    assert cfg.training.seq_len <= cfg.model.max_seq_len
    assert cfg.model.use_mtp == (name == "d20-mtp")  # the one preset that turns a feature on


def test_ffn_hidden_matches_design_table():
    expect = {"tiny-cpu": 512, "d20": 768, "test-8bit": 512, "nano-125m": 2176, "d20-e3-full": 2688,
              "nano-1b": 5504, "medium-3b": 7168, "large-7b": 11008}
    for name, hidden in expect.items():
        assert build_config(name).model.hidden_dim == hidden, name


def test_layering_order_preset_toml_cli_set(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('preset = "d20"\n[model]\nn_layers = 3\n[training]\nbatch_size = 5\nlr = 0.01\n')
    cfg = build_config(str(f), cli={"batch_size": 6}, overrides=["lr=0.03", "n_layers=2"])
    assert cfg.preset == "d20" and cfg.model.dim == 256  # from the preset
    assert cfg.training.batch_size == 6  # CLI beats TOML
    assert cfg.training.lr == 0.03 and cfg.model.n_layers == 2  # --set beats everything


def test_flat_toml_and_seed_aliases(tmp_path):
    f = tmp_path / "flat.toml"
    f.write_text("hidden_dim = 128\nnum_layers = 2\nnum_heads = 4\nnum_kv_heads = 2\n"
                 "seq_length = 64\nlearning_rate = 0.01\nweight_tied = false\n")
    cfg = build_config(config_file=str(f))
    m, t = cfg.model, cfg.training
    assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.weight_tied) == (128, 2, 4, 2, False)
    assert t.seq_len == 64 and t.lr == 0.01


def test_unknown_key_names_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'leraning_rate'.*'lr'"):
        build_config(overrides=["leraning_rate=0.1"])
    f = tmp_path / "bad.toml"
    f.write_text("[training]\nbatch_sise = 4\n")
    with pytest.raises(ConfigError, match=r"bad.toml: unknown config key 'batch_sise' \(did you mean 'batch_size'"):
        build_config(str(f))


def test_unknown_section_and_preset(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'd21'.*did you mean 'd20'"):
        build_config("d21")
    f = tmp_path / "sect.toml"
    f.write_text("[trainig]\nbatch_size = 4\n")
    with pytest.raises(ConfigError, match=r"sect.toml: unknown section \[trainig\] \(sections allowed: model, "):
        build_config(str(f))
    f.write_text("[training.extra]\nbatch_size = 4\n")
    with pytest.raises(ConfigError, match=r"nested section \[training.extra\] is not supported"):
        build_config(str(f))


@pytest.mark.parametrize("item, pattern", [
    ("batch_size=0", r"batch_size = 0 is not valid \(must be >= 1\)"),
    ("batch_size=abc", r"batch_size = 'abc' is not valid \(expected an integer\)"),
    ("lr=-1", r"lr = -1.0 is not valid"),
    ("quantization=binary", r"quantization = 'binary' is not valid \(allowed: 'ternary', 'none'\)"),
    ("seq_len=100000", r"seq_len = 100000 is not valid \(the model's context is max_seq_len = 256\)"),
    ("n_kv_heads=3", r"n_kv_heads = 3 is not valid \(must divide n_heads = 4\)"),
    ("weight_tied=maybe", r"expected true or false"),
    ("device=tpu", r"device = 'tpu' is not valid"),
    ("val_fraction=0.5", r"val_fraction = 0.5 is not valid \(must be in \[0, 0.5\); 0: the dataset's default split\)"),
    ("epochs=-1", r"epochs = -1.0 is not valid \(must be >= 0\)"),
])
def test_bad_values_name_field_value_and_rule(item, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_config(overrides=[item])


def test_wrong_type_in_toml(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text('batch_size = "eight"\n')
    with pytest.raises(ConfigError, match="batch_size = 'eight' is not valid"):
        build_config(str(f))


def test_unbuilt_features_refuse_to_turn_on(monkeypatch):
    """The gate for features not built yet: only the off value passes (every feature is built now,
    so the gate is exercised with a stand-in entry)."""
    monkeypatch.setitem(NOT_AVAILABLE_YET, "use_collider", False)
    with pytest.raises(ConfigError, match="use_collider = True: this feature is not available yet"):
        build_config(overrides=["use_collider=true"])
    build_config(overrides=["use_collider=false"])  # the off value is accepted


def test_dict_round_trip():
    cfg = build_config("d20", overrides=["lr=0.01", "adam_betas=0.8,0.9"])
    back = Config.from_dict(cfg.to_dict())
    assert back == cfg
    assert back.training.adam_betas == (0.8, 0.9)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        build_config("nope/missing.toml")


# ---------------------------------------------------------------------------------------------
# use_8bit_adamw: an alias of adamw_state = "8bit", resolved at load


def _state(tmp_path, toml: str | None = None, sets: list[str] | None = None, base: str | None = None) -> str:
    cfg_file = None
    if toml is not None:
        cfg_file = tmp_path / "c.toml"
        cfg_file.write_text(toml)
    return build_config(base, str(cfg_file) if cfg_file else None, None, sets or []).training.adamw_state


def test_use_8bit_adamw_is_adamw_state_8bit_in_toml_and_set(tmp_path):
    for toml in ("use_8bit_adamw = true\n", "[training]\nuse_8bit_adamw = true\n",
                 "[optimizer]\nuse_8bit_adamw = true\n",
                 'use_8bit_adamw = true\nadamw_state = "fp32"\n'):  # true over the same source's fp32, as before
        assert _state(tmp_path, toml) == "8bit", toml
    assert _state(tmp_path, "use_8bit_adamw = false\n") == "fp32"
    assert _state(tmp_path, 'use_8bit_adamw = false\nadamw_state = "8bit"\n') == "8bit"
    assert _state(tmp_path, sets=["use_8bit_adamw=true"]) == "8bit"
    assert _state(tmp_path, sets=["use-8bit-adamw=yes"]) == "8bit"
    assert _state(tmp_path, sets=["adamw_state=8bit"]) == "8bit"
    cfg = build_config(overrides=["use_8bit_adamw=true"])
    assert "use_8bit_adamw" not in cfg.to_dict()["training"]  # one canonical key in meta.json
    assert cfg.training.use_8bit_adamw  # read-only, for code that asks the older way


def test_a_later_source_overrides_the_alias(tmp_path):
    assert _state(tmp_path, "use_8bit_adamw = true\n", ["use_8bit_adamw=false"]) == "fp32"
    assert _state(tmp_path, "use_8bit_adamw = true\n", ["adamw_state=foam"]) == "foam"
    assert _state(tmp_path, 'adamw_state = "foam"\n', ["use_8bit_adamw=true"]) == "8bit"
    assert _state(tmp_path, 'adamw_state = "foam"\n', ["use_8bit_adamw=false"]) == "foam"  # false leaves foam
    assert _state(tmp_path, base="medium_3b_10gb.toml") == "8bit"  # the shipped configs' spelling
    assert _state(tmp_path, sets=["use_8bit_adamw=false"], base="medium_3b_10gb.toml") == "fp32"


@pytest.mark.parametrize("toml,sets", [('use_8bit_adamw = true\nadamw_state = "foam"\n', []),
                                       (None, ["adamw_state=foam", "use_8bit_adamw=true"])])
def test_the_alias_and_foam_in_one_source_is_one_line(tmp_path, toml, sets):
    with pytest.raises(ConfigError, match="use_8bit_adamw = true with adamw_state = 'foam'") as e:
        _state(tmp_path, toml, sets)
    assert "\n" not in str(e.value)


def test_checkpoint_configs_with_either_spelling_load():
    """meta.json of checkpoints saved before the alias holds both keys; they load to the same state."""
    for old, state, want in [(False, "fp32", "fp32"), (True, "fp32", "8bit"), (False, "8bit", "8bit"),
                             (False, "foam", "foam")]:
        d = build_config().to_dict()
        d["training"] = {"use_8bit_adamw": old, **d["training"], "adamw_state": state}  # the old field order
        assert Config.from_dict(d).training.adamw_state == want, (old, state)


def test_every_shipped_config_loads():
    from nanochat_ternary.config import shipped_configs

    for name in shipped_configs():
        build_config(name)
