"""Tests of the eval room: span scoring, bits per byte, multiple choice, task files, the command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import train_small
from helpers.models import tiny_model

from nanochat_ternary.cli import main
from nanochat_ternary.data.tokenizer import byte_tokenizer
from nanochat_ternary.errors import UserError
from nanochat_ternary.eval.bpb import bits_per_byte, read_texts, windows
from nanochat_ternary.eval.choice import ChoiceItem, ChoiceTask, read_jsonl, score_choice_task
from nanochat_ternary.eval.score import Request, score_requests
from nanochat_ternary.eval.taskfile import read_task_yaml
from nanochat_ternary.eval.tasks import N_CHOICES, next_line_items
from nanochat_ternary.model import GPT

TOK = byte_tokenizer()  # id b = byte b, <|endoftext|> = 256
pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(quant: str = "ternary", max_seq_len: int = 48) -> GPT:
    """A tiny random model in float64: the scorer and the reference then differ only in how they
    batch, pad and gather (plus the scorer's fp32 logits), not in the model's arithmetic."""
    # matrices x 4: a trained-looking spread of logits, not a near-uniform one
    return tiny_model(n_heads=4, n_kv_heads=2, ffn_hidden=128, vocab_size=TOK.vocab_size, max_seq_len=max_seq_len,
                      group_size=32, quantization=quant, matrix_scale=4.0, dtype=torch.float64)


def ref_logprobs(model: GPT, ids: list[int]) -> torch.Tensor:
    """``log p(ids[j] | ids[:j])`` for j >= 1, one sequence, no padding, all in float64."""
    with torch.no_grad():
        h = model.hidden_states(torch.tensor([ids[:-1]]))[0]  # [T, D] float64
        logits = F.linear(h, model.lm_head.weight.double())  # [T, V]
        return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


# The scorer rounds logits to fp32 (model.logits) and takes its logsumexp in fp32: |logit| < 64
# here, so each token's log-prob is off by < ~4 * 64 * 2**-24 ~ 2e-5; sums of <= 48 tokens < 1e-3.
TOL = 1e-3


@pytest.mark.parametrize("quant", ["ternary", "none"])
def test_batched_scores_match_plain_float64_per_item(quant):
    model = make_model(quant)
    g = torch.Generator().manual_seed(1)
    reqs = []
    for n in (2, 5, 17, 30, 48, 49, 9, 3):  # mixed lengths: padding, sorting and mapping back matter
        ids = torch.randint(0, 256, (n,), generator=g).tolist()
        reqs.append(Request(ids, max(1, n // 3)))
    got = dict(score_requests(model, reqs, batch_size=3))
    assert sorted(got) == list(range(len(reqs)))
    for i, r in enumerate(reqs):
        ref = ref_logprobs(model, r.ids)[-r.n_score:]
        assert got[i].shape == (r.n_score,)
        torch.testing.assert_close(torch.from_numpy(got[i]), ref, rtol=0, atol=TOL / 10)


def test_windows_cover_every_token_once():
    for n, c, s in [(1, 8, 4), (8, 8, 4), (9, 8, 4), (50, 8, 3), (50, 8, 8), (33, 16, 1)]:
        scored, prev = [], 0
        for lo, hi in windows(n, c, s):
            assert hi - lo <= c and lo >= 0
            scored += range(prev + 1, hi + 1)
            prev = hi
        assert scored == list(range(1, n + 1))


def _ref_bpb(model: GPT, text: str, context: int, stride: int) -> float:
    """Bits per byte re-derived token by token: target j of ``[eot] + ids`` belongs to the first
    window when j <= context, else to the window ending at context + k * stride (or at the end)."""
    seq = [TOK.eot_id, *TOK.encode(text)]
    n = len(seq) - 1
    nats, cache = 0.0, {}
    for j in range(1, n + 1):
        hi = min(n, context if j <= context else context + math.ceil((j - context) / stride) * stride)
        lo = max(0, hi - context)
        if (lo, hi) not in cache:  # one forward per window (the targets of a window share it)
            cache[(lo, hi)] = ref_logprobs(model, seq[lo:hi + 1])
        nats -= float(cache[(lo, hi)][j - lo - 1])
    return nats / (math.log(2) * len(text.encode("utf-8")))


def test_bpb_of_a_known_text_matches_a_plain_recomputation():
    model = make_model(max_seq_len=48)
    short = "def f(x):\n    return x + 1  # é, 日本\n"  # multi-byte characters: bytes, not characters
    assert len(TOK.encode(short)) <= 48
    full = _ref_bpb(model, short, 48, 48)
    # the doc fits: windowing with any stride is the full-context score
    for stride in (48, 5, 1):
        r = bits_per_byte(model, TOK, [short], "short", stride=stride, batch_size=2)
        assert r.value == pytest.approx(full, abs=TOL / len(short))
        assert r.notes["scored_bytes"] == len(short.encode("utf-8"))
    long = "".join(f"line {i}: value = {i * i}\n" for i in range(7))  # 124 tokens > 48
    for stride in (48, 7):
        r = bits_per_byte(model, TOK, [long, short], "two", stride=stride, batch_size=4)
        want = (_ref_bpb(model, long, 48, stride) * len(long) + full * len(short.encode())) / (
            len(long) + len(short.encode()))
        assert r.value == pytest.approx(want, abs=TOL / 100)
        assert r.notes["scored_tokens"] == len(TOK.encode(long)) + len(TOK.encode(short))
        assert r.n == 2 and r.stderr is not None


def test_read_texts_files_dirs_globs_and_prepared_dir(tmp_path):
    from nanochat_ternary.data.corpus import prepare_data

    d = tmp_path / "docs"
    d.mkdir()
    texts = [f"document {i}\n" * (i + 1) for i in range(6)]
    for i, t in enumerate(texts):
        (d / f"{i}.txt").write_text(t)
    (d / "blob.bin").write_bytes(b"\x00\xff\xfe")  # binaries in a dir are skipped
    assert read_texts(str(d / "0.txt")) == texts[:1]
    assert sorted(read_texts(str(d))) == sorted(texts)
    assert sorted(read_texts(str(d / "*.txt"))) == sorted(texts)
    prep = prepare_data([d], tmp_path / "prep", vocab_size=300, val_fraction=0.34, show_progress=False)
    val = read_texts(str(prep))
    assert len(val) == 2 and all(v in texts for v in val)  # decoded back to the very documents
    with pytest.raises(UserError, match="no such file"):
        read_texts(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="glob matches no files"):
        read_texts(str(tmp_path / "*.nothing"))


def _ref_choice(model: GPT, item: ChoiceItem) -> tuple[float, float]:
    """acc / acc_norm of one item from per-choice float64 log-likelihoods (byte tokenizer: the
    context's tokens are its bytes, the continuation's follow)."""
    ctx = TOK.encode(item.context) or [TOK.eot_id]
    lls = [float(ref_logprobs(model, ctx + TOK.encode(c))[-len(c.encode()):].sum()) for c in item.continuations]
    norm = [ll / len(c.encode("utf-8")) for ll, c in zip(lls, item.continuations)]
    return float(max(range(len(lls)), key=lls.__getitem__) == item.gold), \
        float(max(range(len(norm)), key=norm.__getitem__) == item.gold)


def test_multiple_choice_matches_plain_per_item_recomputation():
    model = make_model()
    g = torch.Generator().manual_seed(2)
    items = []
    for i in range(12):
        n_choices = 2 + i % 4
        choices = ["".join(chr(97 + int(c)) for c in torch.randint(0, 26, (1 + (i * k) % 9,), generator=g))
                   for k in range(1, n_choices + 1)]
        items.append(ChoiceItem(f"q{i}: pick one of {n_choices}:" if i % 5 else "", choices, i % n_choices, f"t:{i}"))
    task = ChoiceTask("t", items)
    sink: list = []
    acc, acc_norm = score_choice_task(model, TOK, task, batch_size=5, sink=sink)
    ref = [_ref_choice(model, it) for it in items]
    assert acc.value == pytest.approx(sum(r[0] for r in ref) / len(ref))
    assert acc_norm.value == pytest.approx(sum(r[1] for r in ref) / len(ref))
    assert sorted(sink) == sorted(ref)  # item by item, not only on average
    assert acc.n == 12 and task.chance == pytest.approx(sum(1 / (2 + i % 4) for i in range(12)) / 12)


def _write(p: Path, lines: list[str]) -> Path:
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.mark.parametrize("line, field", [
    ('{"query": "a", "choices": ["x", "y"]', "not valid JSON"),
    ('{"query": "a", "choices": ["x", "y"]}', "missing field 'gold'"),
    ('{"query": "a", "choices": ["x", "y"], "gold": 2}', "field 'gold' = 2 is out of range"),
    ('{"query": "a", "choices": ["x", ""], "gold": 0}', "field 'choices[1]' is empty"),
    ('{"query": "a", "choices": ["x"], "gold": 0}', "field 'choices' must be a list of at least 2"),
    ('{"query": 3, "choices": ["x", "y"], "gold": 0}', "field 'query' must be a string"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_task_lines_name_file_line_and_field(tmp_path, line, field):
    p = _write(tmp_path / "t.jsonl", ['{"query": "ok", "choices": ["a", "b"], "gold": 1}', line])
    with pytest.raises(UserError) as e:
        read_jsonl(p)
    assert str(e.value).startswith(f"{p}:2: ") and field in str(e.value) and "\n" not in str(e.value)


def test_lm_eval_yaml_over_local_files(tmp_path):
    data = _write(tmp_path / "data.jsonl", [
        json.dumps({"question": "2 + 2", "options": ["3", "4", "5"], "label": 1}),
        json.dumps({"question": "red or blue", "options": ["red", "blue"], "label": "blue"}),
    ])
    (tmp_path / "base.yaml").write_text("output_type: multiple_choice\ndataset_path: json\n")
    y = tmp_path / "task.yaml"
    y.write_text(f"include: base.yaml\ntask: sums\ndataset_kwargs:\n  data_files:\n    test: {data.name}\n"
                 "test_split: test\ndoc_to_text: \"Q: {{question}}\\nA:\"\ndoc_to_choice: \"{{options}}\"\n"
                 "doc_to_target: label\nmetric_list:\n  - metric: acc\n")
    task = read_task_yaml(y)
    assert task.name == "sums" and len(task.items) == 2
    a, b = task.items
    assert a.context == "Q: 2 + 2\nA:" and a.continuations == [" 3", " 4", " 5"] and a.gold == 1
    assert b.gold == 1 and b.choices == ["red", "blue"] and b.where == f"{data}:2"
    y.write_text(y.read_text().replace("doc_to_choice: \"{{options}}\"", "doc_to_choice: options")
                 + "target_delimiter: \"\"\n")
    assert read_task_yaml(y).items[0].continuations == ["3", "4", "5"]
    for bad, msg in [("output_type: generate_until\n", "output_type"), ("num_fewshot: 5\n", "num_fewshot"),
                     ("process_docs: !function utils.process\n", "!function"),
                     ("doc_to_target: \"{{nope}}\"\n", "doc_to_target"), ("doc_to_target: 7\n", "out of range")]:
        z = tmp_path / "bad.yaml"
        z.write_text(y.read_text() + bad)
        with pytest.raises(UserError, match=msg):
            read_task_yaml(z)


def test_next_line_sets_are_balanced_and_chance_is_exact():
    docs = []
    for f in range(8):  # 8 "files", each with lines that reuse a name from the line before
        lines = []
        for i in range(40):
            lines += [f"    value_{f}_{i} = compute_{f}({i})", f"    print(value_{f}_{i}, {'x' * (i % 7)})"]
        docs.append("def main():\n" + "\n".join(lines) + "\n")
    items = next_line_items(docs, n_items=80, seed=3)
    assert len(items) == 80 and items == next_line_items(docs, n_items=80, seed=3)  # deterministic
    for s in range(0, 80, N_CHOICES):  # a set: same 4 lines, each the answer once
        group = items[s:s + N_CHOICES]
        lines = {frozenset(it.continuations) for it in group}
        assert len(lines) == 1
        golds = [it.continuations[it.gold] for it in group]
        assert len(set(golds)) == N_CHOICES
        indents = {c[: len(c) - len(c.lstrip())] for c in group[0].continuations}
        sizes = [len(c.strip()) for c in group[0].continuations]
        assert len(indents) == 1 and max(sizes) <= 1.15 * min(sizes)
    # a context-blind scorer with any fixed preference over lines is right exactly 1 time in 4
    pref = {c: hash(c) for it in items for c in it.continuations}
    right = sum(max(range(len(it.continuations)), key=lambda k: pref[it.continuations[k]]) == it.gold for it in items)
    assert right == len(items) // N_CHOICES


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("evalrun")
    with pytest.MonkeyPatch.context() as mp:  # isolated_cache, for a module-scoped fixture
        mp.setenv("NANOCHAT_CACHE", str(tmp_path_factory.getbasetemp() / "nanochat-cache"))
        train_small(tmp, "run", "--total-steps", "2", "--set", "max_seq_len=40")
    return tmp / "run"


def test_eval_command_table_json_and_errors(run_dir, tmp_path, capsys):
    text = tmp_path / "a.txt"
    text.write_text("counting: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20\n" * 3)
    tasks = _write(tmp_path / "t.jsonl", [json.dumps({"query": f"{i} + 1 =", "choices": [f" {i + 1}", f" {i}"],
                                                      "gold": 0}) for i in range(5)])
    out = tmp_path / "r.json"
    rc = main(["eval", "--checkpoint", str(run_dir), "--text", str(text), "--tasks", str(tasks), "--json", str(out),
               "--batch-size", "3", "--device", "cpu", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "bpb" in printed and "acc_norm" in printed and "stride 20" in printed
    assert f"scored_bytes {len(text.read_text())}" in printed
    res = json.loads(out.read_text())
    assert set(res["provenance"]) >= {"version", "commit"} and res["model"]["step"] == 2
    assert [(r["task"], r["metric"], r["n"]) for r in res["results"]] == [
        (f"bpb:{text}", "bpb", 1), ("t", "acc", 5), ("t", "acc_norm", 5)]
    too_long = _write(tmp_path / "long.jsonl", [json.dumps({"query": "x" * 60, "choices": ["a", "b"], "gold": 0})])
    for args, msg in [(["--tasks", str(too_long)], f"{too_long}:1: field 'query'"),
                      (["--tasks", "nope"], "not a .jsonl"), ([], "nothing to score"),
                      (["--tasks", str(tasks), "--batch-size", "0"], "--batch-size"),
                      (["--tasks", str(tasks), "--json", str(tmp_path / "no" / "r.json")], "does not exist")]:
        assert main(["eval", "--checkpoint", str(run_dir), "--device", "cpu", "--no-progress", *args]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and msg in err and "\n" not in err


def test_ctrl_c_prints_what_was_scored_and_exits_130(run_dir, tmp_path, capsys, monkeypatch):
    from nanochat_ternary.eval import choice

    tasks = _write(tmp_path / "t.jsonl", [json.dumps({"query": f"{i} =", "choices": [" a", " b"], "gold": 0})
                                          for i in range(8)])
    real = choice.score_requests

    def interrupted(*args, **kwargs):
        for k, item in enumerate(real(*args, **kwargs)):
            if k == 6:  # three whole items scored, then the user presses Ctrl-C
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(choice, "score_requests", interrupted)
    out = tmp_path / "r.json"
    rc = main(["eval", "--checkpoint", str(run_dir), "--tasks", str(tasks), "--batch-size", "2", "--json", str(out),
               "--device", "cpu", "--no-progress"])
    assert rc == 130
    assert "3 (partial)" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["interrupted"] and all(r["partial"] and r["n"] == 3 for r in res["results"])
