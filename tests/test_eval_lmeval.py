"""lm-eval-harness on our HF export agrees with our eval on a local 20-item task.

The model is full precision (``quantization=none``): its HF export (a LlamaForCausalLM) is then the
same function, so accuracy must be equal and each log-likelihood equal up to fp32 rounding. (A
ternary model's export runs its activations unquantized, unlike our int8 forward: there the two
differ a little; docs/evaluation.md reports both.) Bounded: lm_eval runs in a subprocess with a
timeout, offline; skipped where lm_eval (with its hf backend, which needs accelerate) is absent.
"""

from __future__ import annotations

import glob
import json
import os
import random
import subprocess
import sys

import pytest
from conftest import train_small

from nanochat_ternary.cli import main

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

LM_EVAL_TIMEOUT_S = 540  # lm_eval imports torch, transformers, datasets: ~15 s CPU, minutes on a loaded machine


def _task(d):
    rng = random.Random(0)
    lines = []
    for _ in range(20):
        a = rng.randrange(1, 50)
        opts = [str(a + 4 + rng.randrange(2, 9)), str(max(0, a - rng.randrange(1, 5))), str(a + 3)]
        g = rng.randrange(4)
        opts.insert(g, str(a + 4))
        lines.append(json.dumps({"q": " ".join(str(a + k) for k in range(4)), "options": opts, "label": g}))
    (d / "count20.jsonl").write_text("\n".join(lines) + "\n")
    (d / "count20.yaml").write_text(
        f"task: count20\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / 'count20.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{q}}\"\ndoc_to_choice: \"{{options}}\"\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return d / "count20.yaml"


def test_lm_eval_on_the_hf_export_matches_our_eval(tmp_path):
    train_small(tmp_path, "run", "--total-steps", "20", "--set", "quantization=none", "--set", "max_seq_len=64")
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    yaml_path = _task(task_dir)
    ours = tmp_path / "ours.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--tasks", str(yaml_path), "--json", str(ours),
                 "--device", "cpu", "--no-progress"]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={tmp_path / 'hf'},dtype=float32", "--tasks", "count20", "--include_path", str(task_dir),
           "--device", "cpu", "--batch_size", "4", "--output_path", str(tmp_path / "lm"), "--log_samples"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LM_EVAL_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(open(glob.glob(str(tmp_path / "lm" / "*" / "results_*.json"))[0]).read())["results"]["count20"]
    mine = {x["metric"]: x["value"] for x in json.loads(ours.read_text())["results"]}
    assert res["acc,none"] == pytest.approx(mine["acc"], abs=1e-9)
    assert res["acc_norm,none"] == pytest.approx(mine["acc_norm"], abs=1e-9)
    # item by item: lm-eval's log-likelihoods against our scorer's on the same requests
    from nanochat_ternary.checkpoint import open_checkpoint
    from nanochat_ternary.eval.choice import item_requests
    from nanochat_ternary.eval.score import score_requests
    from nanochat_ternary.eval.taskfile import read_task_yaml

    opened = open_checkpoint(tmp_path / "run")
    items = read_task_yaml(yaml_path).items
    samples = [json.loads(line) for line in open(glob.glob(str(tmp_path / "lm" / "*" / "samples_count20*.jsonl"))[0])]
    for s in samples:
        reqs = item_requests(opened.tokenizer, items[s["doc_id"]], opened.config.model.max_seq_len)
        got = dict(score_requests(opened.model, reqs))
        theirs = [float(ll) for ll, _ in s["filtered_resps"]]
        # both fp32 forwards of the same weights (SDPA vs HF's attention, another op order): a
        # few ulps of logits of size ~10 per token, under 1e-4 on sums of a handful of tokens
        assert [got[k].sum() for k in range(len(reqs))] == pytest.approx(theirs, abs=1e-4)
