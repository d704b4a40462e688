"""The benchmark suite: shipped configs, `nanochat-train bench` end to end, results.json, the reading."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_corpus

from nanochat_ternary.bench import report
from nanochat_ternary.cli import main
from nanochat_ternary.config import build_config, packaged_config_dir, shipped_configs

ROOT = Path(__file__).resolve().parents[1]
E3 = ["e3/baseline.toml", "e3/mtp_only.toml", "e3/muon_8bit.toml", "e3/galore2.toml", "e3/full.toml"]
NANO = ["nano_125m_8bit.toml", "nano_125m_galore.toml", "nano_125m_8bit_galore.toml"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NANOCHAT_CACHE", str(tmp_path_factory.getbasetemp() / "nanochat-cache"))


# ---------------------------------------------------------------------------------------------
# shipped configs


def test_every_issue_config_is_shipped_and_enables_its_features(tmp_path, monkeypatch):
    assert set(E3 + NANO) <= set(shipped_configs())
    monkeypatch.chdir(tmp_path)  # no checkout here: found in the package
    feats = {}
    for name in E3:
        t = build_config(f"configs/{name}").training
        m = build_config(f"configs/{name}").model
        feats[name] = (m.use_mtp, t.use_collider, t.use_async_loader, t.use_8bit_optim, t.use_galore,
                       t.gradient_checkpointing)
    assert feats == {  # MTP, Collider, async, 8-bit, GaLore, checkpointing (the seeds' E3 table)
        "e3/baseline.toml": (False, False, False, False, False, False),
        "e3/mtp_only.toml": (True, False, False, False, False, False),
        "e3/muon_8bit.toml": (True, True, True, True, False, False),
        "e3/galore2.toml": (True, True, True, False, True, False),
        "e3/full.toml": (True, True, True, True, True, True),
    }
    for name in NANO:
        cfg = build_config(f"configs/{name}")
        assert cfg.preset == "nano-125m" and cfg.model.dim == 768
        assert (cfg.training.use_8bit_optim, cfg.training.use_galore) == {
            "nano_125m_8bit.toml": (True, False), "nano_125m_galore.toml": (False, True),
            "nano_125m_8bit_galore.toml": (True, True)}[name]
    # the repo path resolves to the same files from a checkout
    assert (ROOT / "configs" / "e3" / "full.toml").resolve() == (packaged_config_dir() / "e3" / "full.toml").resolve()


def test_configs_work_after_a_plain_pip_install(tmp_path):
    """Build the wheel, install it into a bare directory, load every shipped config from elsewhere."""
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheel_dir), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(wheel_dir.glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = ("import nanochat_ternary, sys; from nanochat_ternary.config import build_config\n"
            "assert nanochat_ternary.__file__.startswith(sys.argv[1]), nanochat_ternary.__file__\n"
            f"for n in {E3 + NANO!r}: build_config('configs/' + n)\n"
            "print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code, str(target)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_train_accepts_a_shipped_config(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    assert main(["train", "--config", "configs/e3/full.toml", "--dataset", "synthetic", "--n-samples", "64",
                 "--set", "dim=64", "--set", "n_layers=2", "--set", "n_heads=2", "--set", "n_kv_heads=2",
                 "--set", "vocab_size=256", "--set", "galore_rank=16", "--set", "galore_min_dim=16",
                 "--batch-size", "4", "--seq-len", "32", "--total-steps", "3", "--sample-tokens", "0",
                 "--checkpoint-dir", str(tmp_path / "run"), "--log-file", str(log)]) == 0
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert recs[-1]["step"] == 3 and "kept_frac" in recs[-1] and "mtp_ce_4" in recs[-1]


# ---------------------------------------------------------------------------------------------
# the quick suite, end to end (one run shared by the tests below)


@pytest.fixture(scope="module")
def quick_suite(tmp_path_factory):
    """`bench --quick` on the five E3 configs plus one that crashes (an invalid value in its TOML).
    On the CPU wherever it runs: the activation comparison below assumes the CPU's plain loss head."""
    base = tmp_path_factory.mktemp("bench")
    corpus = write_corpus(base / "corpus", n_files=16, n_lines=80)
    bad = base / "broken.toml"
    bad.write_text("[model]\nuse_mtp = true\nmtp_n_tokens = 0\n")
    out = base / "out"
    env = {**os.environ, "NANOCHAT_CACHE": str(base / "cache")}
    proc = subprocess.run([sys.executable, "-m", "nanochat_ternary.cli", "bench", "--quick", "--configs",
                           ",".join(E3[:3] + [str(bad)] + E3[3:]), "--dataset", "text", "--data-path", str(corpus),
                           "--out", str(out), "--threads", "1", "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=600)
    return proc, out


def test_quick_suite_reports_every_config_and_survives_a_crash(quick_suite):
    proc, out = quick_suite
    assert proc.returncode == 0, proc.stderr[-2000:]
    for f in ("REPORT.md", "results.json", "loss.png", "memory.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())
    by_name = {c["name"]: c for c in res["configs"]}
    assert list(by_name) == ["baseline", "baseline-float", "mtp_only", "muon_8bit", "broken", "galore2", "full"]
    assert res["float_twin"] == "baseline-float" and by_name["baseline-float"]["kind"] == "twin"
    assert by_name["broken"]["status"] == "failed" and "mtp_n_tokens" in by_name["broken"]["error"]
    assert "FAILED" in proc.stdout  # the progress line says so as it happens
    table = (out / "REPORT.md").read_text()
    for name, c in by_name.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        if name == "broken":
            assert "failed" in row
            continue
        assert c["status"] == "ok", (name, c["error"])
        cells = [x.strip() for x in row.strip("|").split("|")][2:]
        nums = [float(x.replace(",", "").rstrip("%")) for x in cells if x != "–"]
        assert len(nums) >= 8 and all(math.isfinite(v) for v in nums), row
        run = c["runs"][0]
        assert run["steps"] == 30 and run["tokens_per_step"] == 8 * 64
        assert (run["kept_frac"] is not None) == (name in ("muon_8bit", "galore2", "full"))
        assert 0.0 <= run["data_wait_share"] < 1.0 and run["peak_memory_bytes"] > 0
    # matched: same seed, data and model size; features change what they should
    runs = {n: c["runs"][0] for n, c in by_name.items() if c["status"] == "ok"}
    assert len({r["tokens_per_step"] for r in runs.values()}) == 1
    # the twin is the baseline with full-precision weights: same init, same first batch, so the first
    # loss differs only by the ternary forward (features that change it, e.g. MTP, are not in baseline)
    twin = runs.pop("baseline-float")
    assert twin["params"] == runs["baseline"]["params"]
    assert abs(twin["train_curve"][0][2] - runs["baseline"]["train_curve"][0][2]) > 1e-4
    assert "## What ternary costs" in table and "| val loss |" in table.split("## What ternary costs")[1]
    assert runs["muon_8bit"]["optimizer_state_bytes"] < runs["mtp_only"]["optimizer_state_bytes"]
    assert runs["galore2"]["optimizer_state_bytes"] < runs["mtp_only"]["optimizer_state_bytes"]
    assert "One seed only" in table and "broken" in table.split("## Reading")[1]
    # each configuration's features observed at work in its run, not only named in its TOML
    for name, r in runs.items():
        t = build_config(f"e3/{name}.toml").training
        m = build_config(f"e3/{name}.toml").model
        assert r["mtp_heads"] == (m.mtp_n_tokens if m.use_mtp else 0), name
        assert r["loader_processes"] == (t.num_workers if t.use_async_loader else 0), name
        assert (r["int8_momenta"] > 0) == t.use_8bit_optim and (r["galore_projected"] > 0) == t.use_galore, name
    # full = galore2's features + 8-bit + checkpointing: checkpointing keeps each block's input
    # instead of its ~20 intermediate tensors, and the chunked head keeps no logits (on the CPU,
    # where galore2 has the plain head; on CUDA both have the chunked head)
    assert runs["full"]["activation_bytes"] < 0.5 * runs["galore2"]["activation_bytes"]


def test_results_json_validates_against_the_documented_fields(quick_suite):
    _proc, out = quick_suite
    res = json.loads((out / "results.json").read_text())
    assert report.validate_results(res) == []
    broken = copy.deepcopy(res)
    del broken["configs"][0]["runs"][0]["val_loss"]
    broken["configs"][1]["runs"][0]["tokens_per_s"] = float("nan")
    del broken["configs"][2]["runs"][0]["activation_bytes"]
    del broken["machine"]
    broken["provenance"]["dirty"] = "no"
    errs = report.validate_results(broken)
    assert any("runs[0]: missing 'val_loss'" in e for e in errs)
    assert any("'tokens_per_s' is not finite" in e for e in errs)
    assert any("configs[2].runs[0]: missing 'activation_bytes'" in e for e in errs)
    assert any("missing 'machine'" in e for e in errs)
    assert any("results.provenance: 'dirty' has type str" in e for e in errs)
    del broken["provenance"]
    assert any("missing 'provenance'" in e for e in report.validate_results(broken))
    # docs/bench-suite.md documents every field the validator checks
    doc = (ROOT / "docs" / "bench-suite.md").read_text()
    for spec in (report.TOP_FIELDS, report.CONFIG_FIELDS, report.RUN_FIELDS, report.PROVENANCE_FIELDS):
        for key in spec:
            assert f"`{key}`" in doc, key


def test_results_record_the_code_that_produced_them(quick_suite):
    """Provenance: the package version, and the commit and dirty flag git reports for this checkout."""
    from nanochat_ternary import __version__

    _proc, out = quick_suite
    prov = json.loads((out / "results.json").read_text())["provenance"]
    assert prov["version"] == __version__
    try:
        git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    except FileNotFoundError:  # no git on this machine
        git = subprocess.CompletedProcess([], 1)
    if git.returncode != 0:  # not a git checkout (an unpacked sdist), or no git: nothing to compare with
        assert prov["commit"] is None and prov["dirty"] is None
        return
    assert prov["commit"] == git.stdout.strip() and isinstance(prov["dirty"], bool)
    report_md = (out / "REPORT.md").read_text()
    assert f"- code: nanochat-ternary {__version__}, commit {prov['commit'][:12]}" in report_md


@pytest.mark.parametrize("name", ["e3-cpu-2026-11-22", "collider-cpu-2026-11-22"])
def test_published_reports_name_the_commit_they_ran_on(name):
    """docs/bench's reports predate provenance in results.json: they carry it as a label, taken from
    git history (see docs/bench-suite.md), and still validate against the schema they were written with."""
    d = ROOT / "docs" / "bench" / name
    res = json.loads((d / "results.json").read_text())
    assert report.validate_results(res) == []
    prov = res["provenance"]
    assert len(prov["commit"]) == 40 and prov["note"]
    assert f"- code: nanochat-ternary {prov['version']}, commit {prov['commit'][:12]}" in (d / "REPORT.md").read_text()


def test_bench_refuses_a_non_empty_out_dir(quick_suite, capsys):
    _proc, out = quick_suite
    before = (out / "results.json").read_text()
    assert main(["bench", "--quick", "--out", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before


def test_bench_rejects_unknown_config_and_suite(tmp_path, capsys):
    assert main(["bench", "--quick", "--configs", "e3/nope.toml", "--out", str(tmp_path / "a")]) == 1
    assert "config not found: e3/nope.toml" in capsys.readouterr().err
    assert main(["bench", "--suite", "e4", "--out", str(tmp_path / "b")]) == 1
    assert "unknown suite" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the reading: differences are judged against the seed-to-seed spread


def _cfg(name: str, vals: list[float], tps: list[float], state: int, tokens_per_step: int = 1024) -> dict:
    runs = [{"status": "ok", "val_loss": v, "tokens_per_s": t, "optimizer_state_bytes": state,
             "tokens_per_step": tokens_per_step, "steps": 2,
             "peak_memory_bytes": 1000, "val_curve": [[10, 100, v + 1], [20, 200, v]]} for v, t in zip(vals, tps)]
    return {"name": name, "kind": "config", "source": name, "status": "ok", "error": None, "runs": runs,
            "summary": report.summarize(runs)}


def test_reading_calls_real_only_what_exceeds_the_spread():
    results = {"baseline": "baseline", "configs": [
        _cfg("baseline", [4.00, 4.10], [1000, 1100], 400),
        _cfg("worse", [4.50, 4.60], [1000, 1080], 100),  # +0.5 loss vs spread 0.1: real; speed: noise
        _cfg("same", [3.99, 4.09], [2000, 2100], 400),  # loss: noise; speed 1.95x: real
    ]}
    lines = report.reading(results)
    worse = next(line for line in lines if line.startswith("**worse**"))
    same = next(line for line in lines if line.startswith("**same**"))
    beyond, within = worse.split("within the spread:")
    assert "val loss +0.5000" in beyond and "optimizer state 0.25x" in beyond and "tokens/s" in within
    assert "does not reach" in worse
    beyond, within = same.split("within the spread:")
    assert "tokens/s 1.95x" in beyond and "val loss" in within and "optimizer state 1.00x" in within
    assert "reaches the baseline's final val loss after 200 tokens" in same
    s = report.summarize(results["configs"][0]["runs"])["val_loss"]
    assert s["n"] == 2 and s["spread"] == pytest.approx(0.1) and s["std"] == pytest.approx(0.1 / math.sqrt(2))


def test_ternary_cost_states_the_gap_to_the_full_precision_twin():
    twin = _cfg("baseline-float", [3.90, 3.95], [2000, 2100], 400) | {"kind": "twin"}
    results = {"baseline": "baseline", "float_twin": "baseline-float", "configs": [
        _cfg("baseline", [4.00, 4.10], [1000, 1100], 400), twin, _cfg("other", [4.0, 4.1], [1000, 1100], 400)]}
    rows = report.ternary_cost(results)
    loss = next(r for r in rows if r.startswith("| val loss |"))
    # 4.05 - 3.925 = +0.125 loss, +3.2% of the twin's; spreads 0.1 / 0.05: beyond
    assert "+0.1250 (+3.2%)" in loss and "beyond the spread" in loss
    speed = next(r for r in rows if r.startswith("| tokens/s |"))
    assert "0.51x" in speed  # 1050 / 2050
    # the twin is the comparison's other side, not one more configuration read against the baseline
    assert not any(line.startswith("**baseline-float**") for line in report.reading(results))
    assert report.ternary_cost({"baseline": "baseline", "float_twin": None, "configs": results["configs"]}) == []
    # task scores: beyond the seeds' spread but within the binomial error of 200 items is not real
    for c, acc in ((results["configs"][0], (0.270, 0.266)), (twin, (0.262, 0.262))):
        for r, a in zip(c["runs"], acc):
            r["tasks"] = {"task_t_acc": a}
        c["summary"] = report.summarize(c["runs"])
    results["settings"] = {"task_items": 200}
    row = next(r for r in report.ternary_cost(results) if r.startswith("| t acc |"))
    assert "within sampling error" in row, row
    results["settings"] = {"task_items": 100_000}
    row = next(r for r in report.ternary_cost(results) if r.startswith("| t acc |"))
    assert "beyond the spread" in row, row


def test_reading_with_one_seed_judges_nothing_but_exact_state():
    results = {"baseline": "baseline", "configs": [_cfg("baseline", [4.0], [1000], 400),
                                                   _cfg("other", [5.0], [500], 100)]}
    other = next(line for line in report.reading(results) if line.startswith("**other**"))
    assert "beyond the spread: optimizer state 0.25x;" in other
    assert "not judged (one seed): val loss +1.0000" in other and "within the spread" not in other


def test_peers_run_on_the_same_task_or_are_reported_unavailable(tmp_path):
    """`--peers`: each peer optimizer trains the baseline's model and data, or (package missing) is
    reported unavailable with the reason; its state is measured like ours."""
    out = tmp_path / "out"
    env = {**os.environ, "NANOCHAT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "nanochat_ternary.cli", "bench", "--quick", "--peers", "--configs",
                           "e3/baseline.toml", "--dataset", "synthetic", "--steps", "4", "--threads", "1",
                           "--set", "dim=64", "--set", "n_layers=2", "--set", "n_heads=2", "--set", "n_kv_heads=2",
                           "--set", "vocab_size=256", "--set", "n_samples=64", "--set", "galore_rank=16",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert report.validate_results(res) == []
    by_name = {c["name"]: c for c in res["configs"]}
    assert list(by_name) == ["baseline", "baseline-float", "peer:torch-adamw", "peer:torch-muon", "peer:bnb-adamw8bit",
                             "peer:torchao-adamw8bit", "peer:galore-torch-adamw"]
    assert by_name["peer:torch-adamw"]["status"] == "ok" and by_name["peer:torch-muon"]["status"] == "ok"
    for name, c in by_name.items():
        assert c["status"] in ("ok", "unavailable"), (name, c["error"])
        if c["status"] == "unavailable":
            assert "not installed" in c["error"]
    run = by_name["peer:torch-adamw"]["runs"][0]
    assert math.isfinite(run["val_loss"]) and run["steps"] == 4
    # AdamW keeps two fp32 moments per parameter (+ a step counter per tensor)
    assert 8 * run["params"] <= run["optimizer_state_bytes"] <= 8 * run["params"] + 4096
    # the same task: identical first-step loss (same init, same batch), different optimizers after
    first = {n: c["runs"][0]["train_curve"][0][2] for n, c in by_name.items()
             if c["status"] == "ok" and c["kind"] != "twin"}
    assert max(first.values()) - min(first.values()) < 1e-5


def test_task_scores_of_the_final_models_and_their_ternary_gap(tmp_path):
    """--tasks: each run's final model is scored once (the same items for both sides), and the
    score is in the runs, the summary table and the ternary-vs-float gap."""
    corpus = write_corpus(tmp_path / "corpus", n_files=12, n_lines=60)
    out = tmp_path / "out"
    env = {**os.environ, "NANOCHAT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "nanochat_ternary.cli", "bench", "--quick", "--configs",
                           "e3/baseline.toml", "--dataset", "text", "--data-path", str(corpus), "--steps", "3",
                           "--threads", "1", "--device", "cpu", "--tasks", "stdlib-next-line", "--task-items", "8",
                           "--set", "dim=64", "--set", "n_layers=2", "--set", "n_heads=2", "--set", "n_kv_heads=2",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert report.validate_results(res) == []
    key = "task_stdlib-next-line_acc"
    scores = {c["name"]: c["runs"][0]["tasks"] for c in res["configs"]}
    assert set(scores) == {"baseline", "baseline-float"}
    for s in scores.values():
        assert {key, key + "_norm"} <= set(s) and all(v in [i / 8 for i in range(9)] for v in s.values())
    text = (out / "REPORT.md").read_text()
    assert "## Task scores of the final models" in text
    assert "| stdlib-next-line acc |" in text.split("## What ternary costs")[1]
    assert res["configs"][0]["summary"][key]["n"] == 1


def test_reading_flags_a_config_that_changed_the_batch_shape():
    results = {"baseline": "baseline", "configs": [_cfg("baseline", [4.0, 4.1], [1000, 1100], 400),
                                                   _cfg("bigger", [3.5, 3.6], [1000, 1100], 400, 2048)]}
    lines = report.reading(results)
    assert any(line.startswith("NOT MATCHED: bigger (2 steps x 2,048 tokens)") for line in lines)
    same = {"baseline": "baseline", "configs": [_cfg("baseline", [4.0], [1000], 400), _cfg("b", [4.0], [1000], 1)]}
    assert not any("NOT MATCHED" in line for line in report.reading(same))


def test_peer_adapters_build_each_package_optimizer_from_the_config(monkeypatch):
    """The optional peers' adapters, checked whether or not their packages are installed: a stand-in
    module records what each optimizer is built with (torchao's AdamW8bit needs torch.compile on
    CPU, too slow for the suite; bitsandbytes and galore-torch also run for real in the test above
    when installed). Every parameter once, lr/betas/eps from the config, no weight decay; GaLore's
    projected group is exactly the Muon matrices, with the config's rank and refresh period."""
    import sys
    import types

    import torch

    from nanochat_ternary.bench.peers import build_peer
    from nanochat_ternary.model.gpt import GPT
    from nanochat_ternary.optim.factory import split_params

    class StandIn(torch.optim.Optimizer):
        def __init__(self, params, **kw):
            super().__init__(params, kw)
            self.kw = kw

    bnb = types.ModuleType("bitsandbytes")
    bnb.optim = types.SimpleNamespace(AdamW8bit=type("AdamW8bit", (StandIn,), {}))
    torchao, torchao_optim = types.ModuleType("torchao"), types.ModuleType("torchao.optim")
    torchao_optim.AdamW8bit = type("AdamW8bit", (StandIn,), {})
    galore = types.ModuleType("galore_torch")
    galore.GaLoreAdamW = type("GaLoreAdamW", (StandIn,), {})
    for name, mod in (("bitsandbytes", bnb), ("torchao", torchao), ("torchao.optim", torchao_optim),
                      ("galore_torch", galore)):
        monkeypatch.setitem(sys.modules, name, mod)

    cfg = build_config(overrides=["dim=64", "n_layers=2", "n_heads=2", "n_kv_heads=2", "vocab_size=256",
                                  "adam_lr=0.004", "adam_betas=0.8,0.9", "adam_eps=1e-7", "weight_decay=0.1",
                                  "galore_rank=16", "galore_update_freq=50"])
    model = GPT(cfg.model)
    every = {id(p) for p in model.parameters()}
    want = {"lr": 0.004, "betas": (0.8, 0.9), "eps": 1e-7, "weight_decay": 0.0}
    for peer, cls in (("bnb-adamw8bit", bnb.optim.AdamW8bit), ("torchao-adamw8bit", torchao_optim.AdamW8bit)):
        (opt,) = build_peer(peer, model, cfg.training)
        assert type(opt) is cls and opt.kw == want, peer
        ids = [id(p) for g in opt.param_groups for p in g["params"]]
        assert len(ids) == len(set(ids)) and set(ids) == every, peer  # tied weight once
        assert all(g["initial_lr"] == 0.004 for g in opt.param_groups)
    (opt,) = build_peer("galore-torch-adamw", model, cfg.training)
    assert type(opt) is galore.GaLoreAdamW and opt.kw == want
    muon, rest = split_params(model)
    plain, projected = opt.param_groups
    assert [id(p) for p in plain["params"]] == [id(p) for p in rest]
    assert [id(p) for p in projected["params"]] == [id(p) for p in muon] and muon
    assert (projected["rank"], projected["update_proj_gap"], projected["proj_type"]) == (16, 50, "std")


def test_run_one_applies_an_entrys_overrides_and_reruns_into_the_same_dir(tmp_path):
    """bench's matched run as the convergence scripts call it: a variant is an Entry with ``overrides``
    (no TOML), applied after the shared settings; a second run into the same dir starts afresh
    instead of refusing the checkpoints the first one left."""
    from nanochat_ternary.bench.runner import BenchSettings, Entry, run_one

    settings = BenchSettings(model="tiny-cpu", steps=2, seeds=1, dataset="synthetic", batch_size=2, seq_len=16,
                             eval_points=1, eval_batches=1, threads=1, device="cpu", keep_checkpoints=True,
                             overrides=["n_samples=64", "dim=32", "n_heads=2", "n_kv_heads=2", "log_interval=1"])
    base = run_one(Entry("base", "config", ""), 1, settings, tmp_path / "base", "base", progress=False)
    one = run_one(Entry("one", "config", "", overrides=["n_layers=1"]), 1, settings, tmp_path / "one", "one",
                  progress=False)
    assert base["status"] == "ok" and one["status"] == "ok", (base.get("error"), one.get("error"))
    assert one["params"] < base["params"]  # the override reached the worker's config
    spec = json.loads((tmp_path / "one" / "spec.json").read_text())
    assert spec["overrides"][-1] == "n_layers=1" and "log_interval=1" in spec["overrides"]
    assert (tmp_path / "one" / "checkpoints").is_dir()
    again = run_one(Entry("one", "config", "", overrides=["n_layers=1"]), 1, settings, tmp_path / "one", "one",
                    progress=False)
    assert again["status"] == "ok", again.get("error")
    assert again["val_loss"] == pytest.approx(one["val_loss"], abs=0)  # same seed, same run: the same loss
    # a distillation run (the base run as its teacher) finishes, its post-training observation included
    distill = run_one(Entry("distill", "config", "", overrides=[f"teacher={tmp_path / 'base' / 'checkpoints'}",
                                                                "distill_weight=0.5"]),
                      1, settings, tmp_path / "distill", "distill", progress=False)
    assert distill["status"] == "ok", distill.get("error")
    assert distill["activation_bytes"] > 0


def test_a_worker_reports_its_own_peak_rss_not_its_parents():
    """Linux carries ru_maxrss across fork and exec: a worker started by a process that once held
    512 MiB more would report that. Its own peak (VmHWM) is what a run measures."""
    import torch

    big = torch.ones(128 * 2**20)  # 512 MiB, touched: this process's peak RSS is now above it
    del big
    code = ("import torch\nfrom nanochat_ternary.bench.worker import _peak_memory\n"
            "print(_peak_memory(torch.device('cpu'))[0])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    peak = int(proc.stdout.split()[-1])
    assert 16 * 2**20 < peak < 512 * 2**20  # a torch import's worth, not this process's 512 MiB
