"""Property-based fuzzing of what the tool parses (issue #22; budget in docs/reliability.md).

Every generated input must end in success or one ``UserError`` line: never another exception, never
a multi-line message, never a file written outside the test's temp dir. Inputs: TOML files (bytes
and structured tables), ``--set key=value`` strings, ``meta.json`` (structured mutations of a real
one), ``trainer.pt`` (random nested containers and tensors), packed-file metadata and tensors.

Deterministic (``derandomize=True``: the same examples every run, so CI is reproducible) and
without Hypothesis's example database (it would write ``.hypothesis/`` into the working dir). The
example counts are sized so the whole file takes well under 60 s on one core.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from faults import TINY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from safetensors import safe_open
from safetensors.torch import save_file

from nanochat_ternary.checkpoint import files as ck
from nanochat_ternary.checkpoint import open_checkpoint
from nanochat_ternary.cli import main
from nanochat_ternary.config import ALIASES, ALL_KEYS, Config, apply_mapping, build_config, load_toml
from nanochat_ternary.config_checks import validate
from nanochat_ternary.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")
# Hypothesis caches unicode tables in ./.hypothesis: keep even that out of the working dir
set_hypothesis_home_dir(tempfile.mkdtemp(prefix="nanochat-fuzz-hypothesis-"))

FUZZ = settings(derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
KEYS = ALL_KEYS + list(ALIASES)


def fuzz(n: int) -> settings:
    """The file's settings with ``n`` examples (the per-test budget; see docs/reliability.md)."""
    return settings(FUZZ, max_examples=n)


def _one_line_or_ok(fn, *args: Any) -> Any:
    """Run ``fn``: a result, or a UserError of one line; any other exception fails the example."""
    try:
        return fn(*args)
    except UserError as e:
        assert "\n" not in str(e) and str(e), repr(e)
        return None


def _sane(cfg: Config | None) -> None:
    """A config that validated holds only finite numbers of a bounded size (NaN passes every ``>``
    check by failing it silently; inf and 10**30 pass ``> 0``)."""
    if cfg is None:
        return
    for section in (cfg.model, cfg.training):
        for v in vars(section).values():
            for x in (v if isinstance(v, tuple) else (v,)):
                if isinstance(x, float):
                    assert math.isfinite(x), vars(section)
                elif isinstance(x, int) and not isinstance(x, bool):
                    assert abs(x) <= 2**53, vars(section)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """An empty working dir (relative paths in fuzzed inputs land here, and must not) and a 1-step run."""
    base = tmp_path_factory.mktemp("fuzz")
    cache = tmp_path_factory.getbasetemp() / "nanochat-cache"
    old_cache, old_cwd = os.environ.get("NANOCHAT_CACHE"), os.getcwd()
    os.environ["NANOCHAT_CACHE"] = str(cache)
    work = base / "cwd"
    work.mkdir()
    try:
        assert main(["train", *TINY, "--checkpoint-dir", str(base / "run"), "--total-steps", "1"]) == 0
        assert main(["export", "--checkpoint", str(base / "run"), "--format", "packed",
                     "--out", str(base / "m.safetensors")]) == 0
        os.chdir(work)
        yield base
    finally:
        os.chdir(old_cwd)
        if old_cache is None:
            os.environ.pop("NANOCHAT_CACHE", None)
        else:
            os.environ["NANOCHAT_CACHE"] = old_cache


@pytest.fixture()
def untouched(sandbox):
    """Fails the test if anything under the sandbox changed, except the test's own scratch dir."""
    scratch = sandbox / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    before = _tree(sandbox) - {p for p in _tree(sandbox) if p.startswith("scratch")}
    yield scratch
    after = {p for p in _tree(sandbox) if not p.startswith("scratch")}
    assert after == before, f"files touched outside the scratch dir: {sorted(after ^ before)[:5]}"


# ---------------------------------------------------------------------------------------------
# values: JSON-ish scalars with the awkward ones (NaN, inf, huge ints, surrogate-free odd strings)

SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["1e400", "nan", "-inf", "0x10", "1_000", "true", "auto", "", "  ", "cuda:9"]))
JSON = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids,
                                                                                         max_size=3), max_leaves=8)


# ---------------------------------------------------------------------------------------------
# config: TOML bytes, TOML tables, --set strings


@fuzz(150)
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode)
       | st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(
           ["1", "-1", "1e400", "nan", "inf", '"x"', "true", "[1, 2]", "{a = 1}", "2026-01-01", "99999999999999999999",
            "0.5", "[[1]]"])), max_size=4).map(lambda kv: "\n".join(f"{k} = {v}" for k, v in kv).encode()))
def test_fuzz_toml_files(untouched, raw):
    path = untouched / "c.toml"
    path.write_bytes(raw)

    def load():
        return build_config(str(path))

    _sane(_one_line_or_ok(load))


@fuzz(200)
@given(table=st.dictionaries(st.sampled_from(KEYS + ["model", "training", "nope"]),
                             JSON | st.dictionaries(st.sampled_from(KEYS), JSON, max_size=3), max_size=5))
def test_fuzz_config_tables(untouched, table):
    def apply():
        cfg = Config()
        apply_mapping(cfg, table, "fuzz.toml")
        validate(cfg)
        return cfg

    _sane(_one_line_or_ok(apply))


@fuzz(200)
@given(items=st.lists(st.tuples(st.sampled_from(KEYS) | st.text(max_size=6), st.text(max_size=14)
                                | SCALARS.map(str)), min_size=1, max_size=3),
       sep=st.sampled_from(["=", "", " = "]))
def test_fuzz_set_overrides(untouched, items, sep):
    sets = [f"{k}{sep}{v}" for k, v in items]
    _sane(_one_line_or_ok(build_config, None, None, None, sets))


# ---------------------------------------------------------------------------------------------
# meta.json


def _mutate(obj: Any, path: list[Any], value: Any) -> Any:
    """``obj`` with the node at ``path`` (keys/indices, clipped to what exists) replaced by ``value``."""
    if not path or not isinstance(obj, (dict, list)) or not obj:
        return value
    if isinstance(obj, dict):
        keys = sorted(obj)
        k = keys[path[0] % len(keys)] if isinstance(path[0], int) else path[0]
        return {**obj, k: _mutate(obj.get(k), path[1:], value)}
    i = path[0] % len(obj) if isinstance(path[0], int) else 0
    return [*obj[:i], _mutate(obj[i], path[1:], value), *obj[i + 1:]]


@fuzz(150)
@given(path=st.lists(st.integers(0, 50) | st.sampled_from(["config", "model", "training", "step", "fire"]),
                     max_size=4), value=JSON, drop=st.booleans())
def test_fuzz_meta_json(sandbox, untouched, path, value, drop):
    src = ck.list_checkpoints(sandbox / "run")[-1]
    ckpt = untouched / "step_000001"
    shutil.rmtree(ckpt, ignore_errors=True)  # the scratch dir lives for the whole test, not one example
    shutil.copytree(src, ckpt)
    meta = json.loads((src / "meta.json").read_text())
    meta = _mutate(meta, path, value)
    if drop and isinstance(meta, dict) and meta:
        meta.pop(sorted(meta)[len(path) % len(meta)])
    (ckpt / "meta.json").write_text(json.dumps(meta, allow_nan=True))

    def read():
        m = ck.read_meta(ckpt)
        cfg = ck.read_config(ckpt, m)
        ck.check_weights_header(ckpt, cfg)
        return cfg

    cfg = _one_line_or_ok(read)
    _sane(cfg)
    if cfg is not None and cfg.model.max_seq_len <= 4096 and cfg.model.hidden_dim <= 4096:
        _one_line_or_ok(open_checkpoint, ckpt)  # builds the model: only for configs of a sane size


# ---------------------------------------------------------------------------------------------
# trainer.pt


TENSORS = st.sampled_from([torch.zeros(3), torch.zeros(2, 2, dtype=torch.uint8), torch.tensor(float("nan")),
                           torch.zeros(0), torch.ones(5056, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64)])
STATE = st.recursive(SCALARS.filter(lambda v: not isinstance(v, int) or abs(v) < 2**63) | TENSORS,
                     lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
                         st.sampled_from(["optimizers", "rng", "torch", "state", "param_groups", "params", "lr",
                                          "in_backward", "momentum_buffer", 0, 1]), kids, max_size=4),
                     max_leaves=10)


@pytest.fixture(scope="module")
def trainer(sandbox):
    from nanochat_ternary.train.runtime import setup_runtime
    from nanochat_ternary.train.trainer import Trainer

    cfg = build_config(None, None, {"checkpoint_dir": str(sandbox / "trainer-run")},
                       [a for a in TINY[1::2] if "=" in a] + ["dataset=synthetic", "n_samples=120", "batch_size=4",
                                                              "seq_len=16", "device=cpu", "total_steps=2"])
    t = Trainer(cfg, setup_runtime("cpu", 1), echo=lambda _m: None)
    yield t
    t.close()


@fuzz(120)
@given(state=STATE | st.builds(lambda o, r: {"optimizers": o, "rng": r}, STATE, STATE))
def test_fuzz_trainer_pt(sandbox, trainer, untouched, state):
    src = ck.list_checkpoints(sandbox / "run")[-1]
    ckpt = untouched / "step_000001"
    shutil.rmtree(ckpt, ignore_errors=True)  # the scratch dir lives for the whole test, not one example
    shutil.copytree(src, ckpt)
    torch.save(state, ckpt / "trainer.pt")
    rng = torch.get_rng_state()
    try:
        _one_line_or_ok(trainer._restore, ckpt, ck.read_meta(ckpt))
    finally:
        torch.set_rng_state(rng)


# ---------------------------------------------------------------------------------------------
# packed files


@fuzz(60)
@given(key=st.sampled_from(["config", "step", "version", "format", "tokenizer"]),
       value=st.text(max_size=20) | JSON.map(lambda v: json.dumps(v, allow_nan=True)),
       config_path=st.lists(st.integers(0, 50) | st.sampled_from(["model", "training"]), max_size=3),
       config_value=JSON, tensor_op=st.sampled_from(["none", "drop", "truncate", "dtype", "nan"]),
       which=st.integers(0, 100))
def test_fuzz_packed_file(sandbox, untouched, key, value, config_path, config_value, tensor_op, which):
    with safe_open(str(sandbox / "m.safetensors"), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if key == "config" and config_path:
        meta["config"] = json.dumps(_mutate(json.loads(meta["config"]), config_path, config_value), allow_nan=True)
    else:
        meta[key] = value
    name = sorted(tensors)[which % len(tensors)]
    if tensor_op == "drop":
        del tensors[name]
    elif tensor_op == "truncate":
        tensors[name] = tensors[name].reshape(-1)[:-1].clone()
    elif tensor_op == "dtype":
        tensors[name] = tensors[name].to(torch.float16 if tensors[name].dtype == torch.uint8 else torch.uint8)
    elif tensor_op == "nan" and tensors[name].is_floating_point():
        tensors[name] = tensors[name].clone().reshape(-1).index_fill_(0, torch.tensor([0]), float("nan"))
    path = untouched / "p.safetensors"
    save_file(tensors, str(path), metadata=meta)
    opened = _one_line_or_ok(open_checkpoint, path)
    if opened is not None:
        assert opened.kind == "packed"


def test_fuzz_toml_loader_refuses_non_files(untouched):
    """Not hypothesis: the special files a TOML path can name (no hang, one line)."""
    for p in ("/dev/zero", "/dev/null", str(untouched)):
        if Path(p).exists():
            _one_line_or_ok(load_toml, p)
