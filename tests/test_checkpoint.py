"""Checkpoint files: atomic writes, discovery, pruning, safe loading, and corruption errors."""

import json
from pathlib import Path

import pytest
import torch

from nanochat_ternary.checkpoint import files as ck
from nanochat_ternary.errors import CheckpointError, UserError


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # shared, like a tied LM head
        self.norm = torch.nn.Parameter(torch.ones(4))


def _save(run: Path, step: int, model=None, keep_last=0):
    model = model or Tied()
    opt = torch.optim.AdamW(model.parameters())
    state = {"optimizers": [opt.state_dict()], "rng": {"torch": torch.get_rng_state()}}
    return ck.save_checkpoint(run, step, model, state, {"config": {"model": {}, "training": {}}},
                              keep_last=keep_last)


def test_save_load_round_trip_with_tied_weights(tmp_path):
    torch.manual_seed(0)
    m = Tied()
    path = _save(tmp_path, 5, m)
    assert path.name == "step_000005"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "trainer.pt"]
    m2 = Tied()
    ck.load_model_weights(m2, path)
    for (n, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n
    assert m2.head.weight is m2.emb.weight
    state = ck.load_trainer_state(path)
    assert isinstance(state["rng"]["torch"], torch.Tensor)
    meta = ck.read_meta(path)
    assert meta["step"] == 5 and meta["format_version"] == ck.FORMAT_VERSION


def test_resolve_picks_latest_complete_and_ignores_temp_dirs(tmp_path):
    _save(tmp_path, 10)
    _save(tmp_path, 20)
    (tmp_path / ".tmp-step_000030-abc").mkdir()  # a crash mid-write leaves only a hidden temp dir
    (tmp_path / "step_000040").mkdir()  # not complete: no files
    assert ck.resolve_checkpoint(tmp_path).name == "step_000020"
    assert ck.resolve_checkpoint(tmp_path / "step_000010").name == "step_000010"


def test_failed_write_leaves_no_checkpoint(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", boom)
    with pytest.raises(ck.CheckpointWriteError, match="disk full"):
        _save(tmp_path, 7)
    assert list(tmp_path.iterdir()) == []


def test_never_overwrites(tmp_path):
    p = _save(tmp_path, 3)
    before = (p / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        _save(tmp_path, 3)
    assert (p / "model.safetensors").read_bytes() == before


def test_keep_last_prunes_oldest(tmp_path):
    for s in (1, 2, 3, 4):
        _save(tmp_path, s, keep_last=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_000003", "step_000004"]


def test_corrupt_and_mismatched_checkpoints_are_one_line_errors(tmp_path):
    p = _save(tmp_path, 1)
    # truncated weights
    data = (p / "model.safetensors").read_bytes()
    (p / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt model.safetensors"):
        ck.load_model_weights(Tied(), p)
    # shape mismatch
    q = _save(tmp_path / "other", 1)
    wrong = Tied()
    wrong.norm = torch.nn.Parameter(torch.ones(5))
    with pytest.raises(CheckpointError, match="does not match the model") as ei:
        ck.load_model_weights(wrong, q)
    assert "\n" not in str(ei.value)
    # truncated trainer state
    (q / "trainer.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable trainer.pt"):
        ck.load_trainer_state(q)
    # bad meta
    (q / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable meta.json"):
        ck.read_meta(q)


class Evil:
    """Any non-allowlisted class: weights_only loading must refuse to construct it."""


def test_trainer_state_refuses_pickled_objects(tmp_path):
    p = _save(tmp_path, 1)

    torch.save({"optimizers": [], "x": Evil()}, p / "trainer.pt")
    with pytest.raises(CheckpointError, match="refused trainer.pt"):
        ck.load_trainer_state(p)


def test_missing_checkpoint_and_unwritable_dir(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        ck.resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        ck.resolve_checkpoint(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="is not writable"):
        ck.ensure_writable_dir(blocker / "sub")


def test_meta_json_is_plain_json(tmp_path):
    """meta.json is readable without torch: non-JSON values (tuples, paths, tensors) become lists
    and strings, and what was saved reads back equal."""
    meta = {"config": {"model": {"dim": 4}, "training": {"adam_betas": (0.9, 0.95)}},
            "data": {"path": tmp_path / "data.bin"}, "metrics": {"loss": torch.tensor(1.5)}}
    p = ck.save_checkpoint(tmp_path, 2, Tied(), {"optimizers": [], "rng": {}}, meta)
    plain = json.loads((p / "meta.json").read_text())
    assert plain["step"] == 2 and plain["format_version"] == ck.FORMAT_VERSION
    assert plain["config"] == {"model": {"dim": 4}, "training": {"adam_betas": [0.9, 0.95]}}
    assert plain["data"] == {"path": str(tmp_path / "data.bin")} and plain["metrics"] == {"loss": 1.5}
    assert ck.read_meta(p)["config"] == plain["config"]
