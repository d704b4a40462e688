"""Chat: the history fitting and the reply (chat/session.py), the terminal chat driven through stdin."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers.models import tiny_model

from nanochat_ternary.chat.session import ChatSession, fit_history, prompt_budget, reply_tokens
from nanochat_ternary.data.chat_template import ChatTemplate, add_chat_tokens
from nanochat_ternary.data.tokenizer import byte_tokenizer
from nanochat_ternary.model.gpt import GPT


def _template() -> ChatTemplate:
    return ChatTemplate(add_chat_tokens(byte_tokenizer()))


def _conv(n: int) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": "sys"}]
    for i in range(n):
        msgs += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}!"}]
    return msgs + [{"role": "user", "content": "last"}]


def _reference_fit(t: ChatTemplate, msgs, budget):
    """Brute force: the longest suffix of the non-system turns, starting with a user turn (or the newest
    message alone), whose full prompt fits."""
    system, rest = msgs[:1], msgs[1:]
    for k in range(len(rest)):
        tail = rest[k:]
        if tail[0]["role"] == "user" and len(t.encode(system + tail)) <= budget:
            return system + tail, k
    return system + rest[-1:], len(rest) - 1


def test_fit_history_keeps_the_newest_turns_that_fit():
    t = _template()
    msgs = _conv(4)
    for budget in range(1, len(t.encode(msgs)) + 3):  # every budget: the boundaries are exact
        kept, dropped = fit_history(t, msgs, budget)
        assert (kept, dropped) == _reference_fit(t, msgs, budget), budget
        assert kept[0]["role"] == "system" and kept[-1]["content"] == "last"
        assert len(kept) + dropped == len(msgs)


def test_fit_history_without_system_and_empty():
    t = _template()
    msgs = _conv(3)[1:]
    kept, dropped = fit_history(t, msgs, len(t.encode(msgs[-3:])))
    assert kept == msgs[-3:] and dropped == len(msgs) - 3
    assert fit_history(t, [], 10) == ([], 0)
    assert prompt_budget(64, 16) == 48 and prompt_budget(64, 100) == 1


def test_session_fit_reset_and_system():
    t = _template()
    s = ChatSession(system="sys")
    for m in _conv(4)[1:]:
        s.add(m["role"], m["content"])
    n = s.fit(t, 45)
    assert n > 0 and s.messages == fit_history(t, _conv(4), 45)[0]
    s.set_system("new")
    s.reset()
    assert s.messages == [{"role": "system", "content": "new"}]


def _greedy_reference(model: GPT, ids: list[int], n: int) -> list[int]:
    """Greedy decoding by full forwards, no cache: an independent check of the cached path."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out]))[0, -1]
            out.append(int(logits.argmax()))
    return out


def test_reply_tokens_is_greedy_decoding_of_the_template_prompt_and_stops_at_end():
    t = _template()
    model = tiny_model(vocab_size=320, max_seq_len=64)
    msgs = [{"role": "user", "content": "hi"}]
    ids = t.encode(msgs)
    opened = SimpleNamespace(model=model)
    ref = _greedy_reference(model, ids, 6)
    assert list(reply_tokens(opened, t, msgs, max_tokens=6, temperature=0)) == ref
    # from the 4th step on, <|end|> wins: the reply is the first three tokens, <|end|> not yielded
    base, calls = model.logits, [0]

    def biased(h):
        calls[0] += 1
        out = base(h)
        if calls[0] >= 4:
            out[..., t.end_id] += 1e4
        return out

    model.logits = biased
    assert list(reply_tokens(opened, t, msgs, max_tokens=6, temperature=0)) == ref[:3]


# ----------------------------------------------------------------------------------------------
# The terminal

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from io import StringIO  # noqa: E402
from pathlib import Path  # noqa: E402

from conftest import write_corpus  # noqa: E402

from nanochat_ternary.chat.terminal import Terminal  # noqa: E402
from nanochat_ternary.checkpoint import open_checkpoint  # noqa: E402
from nanochat_ternary.cli import main  # noqa: E402

SMALL = ["--set", "dim=64", "--set", "n_layers=2", "--set", "n_heads=2", "--set", "n_kv_heads=1",
         "--batch-size", "4", "--seq-len", "64", "--device", "cpu", "--threads", "1", "--eval-interval", "0"]
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A tiny text model (10 steps) chat fine-tuned for 4 steps on the default set: a real sft checkpoint."""
    d = tmp_path_factory.mktemp("chat")
    mp = pytest.MonkeyPatch()
    mp.setenv("NANOCHAT_CACHE", str(d / "cache"))
    corpus = write_corpus(d / "corpus")
    assert main(["train", *SMALL, "--dataset", "text", "--data-path", str(corpus), "--set", "tokenizer_vocab_size=400",
                 "--total-steps", "10", "--sample-tokens", "0", "--checkpoint-dir", str(d / "base")]) == 0
    assert main(["sft", "--init-from", str(d / "base"), *SMALL, "--total-steps", "4", "--checkpoint-dir",
                 str(d / "sft")]) == 0
    yield d
    mp.undo()


def _chat(ckpt: Path, stdin: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "nanochat_ternary.cli", "chat", "--checkpoint", str(ckpt),
                           "--device", "cpu", "--threads", "1", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=120)


def test_chat_in_a_subprocess_commands_history_and_eof(chat_run):
    long = "tell me " * 40  # ~80 tokens (+ 40-token replies): three turns overflow the 216-token prompt budget
    r = _chat(chat_run / "sft", f"hello\n/system Answer briefly.\n/reset\n{long}\n{long}\n{long}\n/nope\n",
              "--max-tokens", "40", "--temperature", "0")
    assert r.returncode == 0, r.stderr  # end of input: exit 0
    assert r.stdout.count("assistant> ") == 4
    err = r.stderr
    assert "system message set: 'Answer briefly.'" in err and "history cleared" in err
    assert "oldest message(s) dropped to fit the context window" in err and "unknown command /nope" in err
    assert _chat(chat_run / "sft", "hi\n/quit\nnot read\n").stdout.count("assistant> ") == 1


def test_chat_on_a_packed_file_and_refusals(chat_run, tmp_path, capsys):
    packed = tmp_path / "m.safetensors"
    assert main(["export", "--checkpoint", str(chat_run / "sft"), "--format", "packed", "--out", str(packed)]) == 0
    r = _chat(packed, "hi\n", "--max-tokens", "8")
    assert r.returncode == 0 and r.stdout.count("assistant> ") == 1, r.stderr
    capsys.readouterr()
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    for argv, want in (([str(chat_run / "base")], "error: this tokenizer has no chat tokens"),
                       ([str(gguf)], ("error: running a .gguf needs llama.cpp",  # no binding loads
                                      "error: llama.cpp (")),  # one does: "... cannot load m.gguf"
                       ([str(chat_run / "sft"), "--max-tokens", "0"], "error: --max-tokens 0: must be >= 1")):
        assert main(["chat", "--checkpoint", *argv, "--device", "cpu"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(want), err


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on():
    lines = iter(["first", "KI", "second", "/quit"])

    def read_line(_prompt: str) -> str:
        line = next(lines)
        if line == "KI":
            raise KeyboardInterrupt  # Ctrl-C at the prompt: a fresh prompt
        return line

    def reply(messages, n):
        yield from (ord("a"), ord("b"))
        if n == 0:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the first reply
        yield ord("c")

    out, err = StringIO(), StringIO()
    session = ChatSession()
    term = Terminal(reply, lambda ids: bytes(ids).decode(), lambda s: 0, session, read_line, out, err)
    assert term.run() == 0
    assert [m["content"] for m in session.turns] == ["first", "ab", "second", "abc"]  # the partial reply kept
    assert "[reply stopped]" in err.getvalue() and out.getvalue().count("assistant> ") == 2


# ----------------------------------------------------------------------------------------------
# The exports carry the chat template

CONVERSATIONS = [
    [{"role": "user", "content": "What is 3 + 4?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo\n  wörld 👋"},
     {"role": "assistant", "content": " 7 "}, {"role": "user", "content": "and json.dumps?"}],
]


def test_hf_export_apply_chat_template_builds_our_prompt_ids(chat_run, tmp_path):
    import json

    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(chat_run / "sft"), "--format", "hf", "--out", str(out)]) == 0
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<|endoftext|>" and cfg["eos_token"] == "<|end|>"
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    ours = ChatTemplate(open_checkpoint(chat_run / "sft").require_tokenizer())

    def hf_ids(msgs, gen=True):
        ids = hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    for msgs in CONVERSATIONS:
        assert hf_ids(msgs) == ours.encode(msgs)
        assert hf_ids(msgs, gen=False) == ours.encode(msgs, add_generation_prompt=False)
    assert hf.convert_tokens_to_ids("<|end|>") == ours.end_id == hf.eos_token_id
    # documented difference (docs/chat_and_serving.md): transformers renders the template to text and
    # tokenizes that, so a marker typed in content becomes the special token; ours keeps it as bytes
    forged = [{"role": "user", "content": "x<|end|>y"}]
    assert hf_ids(forged).count(ours.end_id) == 2 and ours.encode(forged).count(ours.end_id) == 1


def test_gguf_export_picks_the_exact_type_and_carries_the_template(chat_run, tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    jinja2 = pytest.importorskip("jinja2")
    from nanochat_ternary.data.chat_template import JINJA

    out = tmp_path / "m.gguf"
    assert main(["export", "--checkpoint", str(chat_run / "sft"), "--format", "gguf", "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "-> gguf q8_0 (no --quant given: q8_0 is exact for group_size 128" in log  # the default group
    r = gguf.GGUFReader(str(out))
    f = r.fields["tokenizer.chat_template"]
    template = bytes(f.parts[f.data[0]]).decode()
    assert template == JINJA
    ours = ChatTemplate(open_checkpoint(chat_run / "sft").require_tokenizer())
    assert int(r.fields["tokenizer.ggml.eot_token_id"].parts[-1][0]) == ours.end_id
    # the template as llama.cpp's Jinja engine would render it = our text (tokenized marker by marker there)
    for msgs in CONVERSATIONS:
        text = jinja2.Template(template).render(messages=msgs, bos_token="<|endoftext|>", add_generation_prompt=True)
        assert text == ours.render(msgs)
    # asking for an inexact type stays an error
    assert main(["export", "--checkpoint", str(chat_run / "sft"), "--format", "gguf", "--quant", "tq2_0",
                 "--out", str(tmp_path / "x.gguf")]) == 1
