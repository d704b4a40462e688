"""docs/config.md is generated from config.py; it must be current."""

from pathlib import Path

from nanochat_ternary.config_reference import config_reference

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_config_reference_is_current():
    assert DOC.read_text() == config_reference(), (
        "docs/config.md is stale: python -m nanochat_ternary.config_reference > docs/config.md")


def test_every_field_is_in_the_reference():
    import dataclasses

    from nanochat_ternary.config import ModelConfig, TrainConfig

    text = config_reference()
    for cls in (ModelConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in text, f.name
