"""Chat fine-tuning: the mask token by token, the vocab resize, the conversation files, and that a
fine-tuned tiny model follows the format on held-out conversations far more often than its base."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_corpus

from nanochat_ternary.chat.format_eval import format_following
from nanochat_ternary.chat.sft_data import default_conversations, read_conversations
from nanochat_ternary.checkpoint import open_checkpoint
from nanochat_ternary.cli import main
from nanochat_ternary.config import ModelConfig
from nanochat_ternary.data.chat_template import ChatTemplate, add_chat_tokens
from nanochat_ternary.data.tokenizer import byte_tokenizer
from nanochat_ternary.errors import DataError
from nanochat_ternary.model.gpt import GPT
from nanochat_ternary.train.sft import PackedSFTBatches, PaddedSFTBatches, encode_conversations
from nanochat_ternary.train.warm_start import WarmStart

CONVS = [[{"role": "system", "content": "s"}, {"role": "user", "content": "hi there"},
          {"role": "assistant", "content": "hello!"}],
         [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
          {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "six, which is 6"}]] * 5


def _template() -> ChatTemplate:
    return ChatTemplate(add_chat_tokens(byte_tokenizer()))


def _reference_targets(t: ChatTemplate, convs) -> tuple[list[int], list[int]]:
    """The stream and its targets written out from the template's definition (not encode_with_mask):
    a target is kept only inside an assistant turn (its content and its closing <|end|>)."""
    ids, tgt_keep = [], []
    for conv in convs:
        ids.append(t.bos_id)
        tgt_keep.append(0)
        for m in conv:
            body = list(m["content"].encode()) + [t.end_id]  # the byte tokenizer: id = byte
            ids += [t.role_ids[m["role"]]] + body
            tgt_keep += [0] + [int(m["role"] == "assistant")] * len(body)
    return ids, tgt_keep


@pytest.mark.parametrize("seq_len", [7, 16])
def test_packed_batches_mask_every_target_outside_the_assistant_turns(seq_len):
    t = _template()
    enc = encode_conversations(t, CONVS)
    ids, keep = _reference_targets(t, CONVS)
    assert enc.tokens.tolist() == ids and enc.mask.tolist() == keep
    b = PackedSFTBatches(enc, batch_size=3, seq_len=seq_len, seed=1, grad_accum_steps=2)
    seen = 0
    for step in range(4):
        for micro in range(2):
            x, y = b.get(step, micro)
            for row, s in enumerate(b.window_starts(step, micro)):
                assert x[row].tolist() == ids[s:s + seq_len]
                want = [ids[s + j + 1] if keep[s + j + 1] else -1 for j in range(seq_len)]
                assert y[row].tolist() == want
                seen += sum(v >= 0 for v in want)
    assert seen > 0


def test_padded_batches_one_conversation_per_row():
    t = _template()
    enc = encode_conversations(t, CONVS)
    b = PaddedSFTBatches(enc, batch_size=4, seq_len=40, seed=0, pad_id=t.end_id)
    x, y = b.get(0)
    for row, i in enumerate(b.row_ids(0)):
        ids, keep = _reference_targets(t, [CONVS[i]])
        ids, keep = ids[:41], keep[:41]
        n = len(ids) - 1
        assert x[row, :n].tolist() == ids[:-1] and (x[row, n:] == t.end_id).all()
        assert y[row, :n].tolist() == [v if k else -1 for v, k in zip(ids[1:], keep[1:])]
        assert (y[row, n:] == -1).all()
    # every conversation once per epoch
    rows = [i for s in range(3) for i in b.row_ids(s)]  # 12 rows: the first 10 are epoch 0
    assert sorted(rows[:len(CONVS)]) == list(range(len(CONVS)))


@pytest.mark.parametrize("tied", [True, False])
def test_resize_vocab_keeps_old_rows_and_starts_new_ones_at_the_mean(tied):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=50, max_seq_len=16, weight_tied=tied)
    m = GPT(cfg).eval()
    old_emb = m.tok_emb.weight.detach().clone().double()
    old_head = m.lm_head.weight.detach().clone().double()
    blocks = {k: v.clone() for k, v in m.blocks.state_dict().items()}
    ids = torch.randint(0, 40, (2, 8))
    before = m(ids)
    m.resize_vocab(64, new_rows_from=40)
    assert m.tok_emb.weight.shape == (64, 32) and m.lm_head.weight.shape == (64, 32) and m.cfg.vocab_size == 64
    assert (m.lm_head.weight is m.tok_emb.weight) == tied
    for new, old in ((m.tok_emb.weight, old_emb), (m.lm_head.weight, old_head)):
        new = new.detach().double()
        assert torch.equal(new[:40], old[:40])
        # float64 reference: the mean of the used rows; the noise is 1e-3 of their std (x5: a 5-sigma bound)
        dev = (new[40:] - old[:40].mean(0)).abs().max()
        assert 0 < dev < 5e-3 * old[:40].std()
    assert all(torch.equal(v, m.blocks.state_dict()[k]) for k, v in blocks.items())
    after = m(ids)
    assert torch.equal(after[..., :40], before[..., :40])  # the trunk is untouched, the old rows too


def _write(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_reads_openai_and_sharegpt_lines(tmp_path):
    share = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                               {"from": "gpt", "value": "a"}]}
    p = _write(tmp_path, [json.dumps({"messages": CONVS[0]}), "", json.dumps(share)])
    assert read_conversations(p) == [CONVS[0], [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                                {"role": "assistant", "content": "a"}]]


@pytest.mark.parametrize("line,match", [
    ("{not json", "not valid JSON"),
    ('{"messages": [{"role": "tool", "content": "x"}]}', "unknown role 'tool'"),
    ('{"messages": []}', "empty conversation"),
    ('{"conversations": [{"from": "human", "value": "q"}]}', "no assistant turn"),
    ('{"text": "x"}', "expected"),
    ('{"messages": [{"role": "user", "content": null}]}', "must be a string"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, match):
    p = _write(tmp_path, [json.dumps({"messages": CONVS[0]}), line])
    with pytest.raises(DataError, match=match) as e:
        read_conversations(p)
    assert str(e.value).startswith(f"{p}:2: ")


def test_default_set_is_seeded_with_held_out_functions():
    train, val = default_conversations(seed=0)
    assert (train, val) == default_conversations(seed=0)
    asked = {m["content"] for c in train for m in c if m["role"] == "user"}
    held = [c for c in val if "." in c[-2]["content"] and not c[-2]["content"][0].isdigit()]
    assert held and len(train) > 5 * len(val)
    names = lambda cs: {w.rstrip("?.") for c in cs for m in c if m["role"] == "user" for w in m["content"].split()
                        if "." in w.rstrip("?.")}  # noqa: E731
    assert not names(held) & names(train)  # no held-out function is asked about in training
    assert any("json.dumps" in q for q in asked | {c[-2]["content"] for c in val})


SMALL = ["--set", "dim=64", "--set", "n_layers=2", "--set", "n_heads=2", "--set", "n_kv_heads=1",
         "--batch-size", "8", "--seq-len", "64", "--device", "cpu", "--threads", "1", "--log-interval", "1"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny base model trained on a small text corpus (its own BPE tokenizer), 20 steps."""
    d = tmp_path_factory.mktemp("base")
    mp = pytest.MonkeyPatch()
    mp.setenv("NANOCHAT_CACHE", str(d / "cache"))
    corpus = write_corpus(d / "corpus")
    rc = main(["train", *SMALL, "--dataset", "text", "--data-path", str(corpus), "--set", "tokenizer_vocab_size=400",
               "--total-steps", "20", "--sample-tokens", "0", "--eval-interval", "0",
               "--checkpoint-dir", str(d / "base")])
    assert rc == 0
    yield d
    mp.undo()


def test_sft_cli_bad_data_is_one_line_exit_1(base_run, tmp_path, capsys):
    bad = _write(tmp_path, ['{"messages": [{"role": "user", "content": "q"}]}'])
    rc = main(["sft", "--init-from", str(base_run / "base"), "--data", str(bad), *SMALL, "--total-steps", "1",
               "--checkpoint-dir", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err == [f"error: {bad}:1: no assistant turn (nothing to train on)"]
    assert main(["sft", *SMALL, "--total-steps", "1"]) == 1  # neither --init-from nor --resume


@pytest.mark.parametrize("batching", ["pack", "pad"])
def test_sft_resume_reproduces_a_straight_run(base_run, tmp_path, batching):
    data = _write(tmp_path, [json.dumps({"messages": c}) for c in CONVS])
    common = ["--data", str(data), *SMALL, "--set", f"sft_batching={batching}", "--eval-interval", "0",
              "--total-steps", "4"]
    logs = {}
    for name, extra in (("straight", []), ("first", ["--set", "checkpoint_interval=2"])):
        logs[name] = tmp_path / f"{name}.jsonl"
        assert main(["sft", "--init-from", str(base_run / "base"), *common, "--checkpoint-dir", str(tmp_path / name),
                     "--log-file", str(logs[name]), *extra]) == 0
    # continue the interval checkpoint of step 2 in a copy of the run
    import shutil

    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "first" / "step_000002", tmp_path / "resumed" / "step_000002")
    assert main(["sft", "--resume", str(tmp_path / "resumed"), "--checkpoint-dir", str(tmp_path / "resumed"),
                 "--log-file", str(tmp_path / "r.jsonl")]) == 0
    straight = {r["step"]: r["loss"] for r in map(json.loads, logs["straight"].read_text().splitlines())}
    resumed = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "r.jsonl").read_text().splitlines())}
    assert resumed[3] == straight[3] and resumed[4] == straight[4]  # CPU fp32: bit-identical batches and steps
    opened = open_checkpoint(tmp_path / "resumed")
    assert ChatTemplate(opened.require_tokenizer()).end_id < opened.config.model.vocab_size
    assert opened.config.model.vocab_size % 64 == 0
    # the wrong command for a run is one line, not a data-fingerprint puzzle
    assert main(["train", "--resume", str(tmp_path / "resumed")]) == 1
    assert main(["sft", "--resume", str(base_run / "base")]) == 1


def test_fine_tuned_model_ends_its_turn_far_more_often_than_its_base(base_run, tmp_path):
    """The default set, 120 steps: the base (its vocab resized, the chat rows at the mean: step 0 of
    the fine-tune) almost never emits <|end|>; the fine-tuned model answers and ends its turn on
    most held-out conversations (measured 100% vs 0% at 200 steps; benchmarks/sft_format.py)."""
    assert main(["sft", "--init-from", str(base_run / "base"), *SMALL, "--total-steps", "120", "--eval-interval", "0",
                 "--checkpoint-dir", str(tmp_path / "sft")]) == 0
    ft = open_checkpoint(tmp_path / "sft")
    t = ChatTemplate(ft.require_tokenizer())
    base = GPT(copy.deepcopy(ft.config.model))
    WarmStart.open(str(base_run / "base")).load_weights(base, new_rows_from=t.tok.vocab_size - 4)
    _, val = default_conversations(seed=0)
    held = [val[i] for i in np.random.default_rng(0).choice(len(val), 30, replace=False)]
    torch.manual_seed(0)
    r_base = format_following(base.eval(), t, held, max_tokens=24)
    r_ft = format_following(ft.model, t, held, max_tokens=24)
    assert r_base.end_rate <= 0.1 and r_ft.end_rate >= 0.7, (r_base.line(), r_ft.line())


def test_train_refuses_the_sft_fields(tmp_path, capsys):
    """An accepted field takes effect: plain ``train`` has no conversations to read, so sft_data is an error."""
    from conftest import SMALL_CPU_RUN

    from nanochat_ternary.cli import main

    rc = main(["train", *SMALL_CPU_RUN, "--total-steps", "1", "--checkpoint-dir", str(tmp_path / "r"),
               "--set", "sft_data=x.jsonl"])
    assert rc == 1 and "nanochat-train sft" in capsys.readouterr().err
