"""Chat: the history fitting and the reply (chat/session.py), the terminal chat driven through stdin."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nanochat_ternary.chat.session import ChatSession, fit_history, prompt_budget, reply_tokens
from nanochat_ternary.config import ModelConfig
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


def _tiny_model(vocab: int = 320, max_seq_len: int = 64) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=vocab, max_seq_len=max_seq_len)
    return GPT(cfg).eval()


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
    model = _tiny_model()
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
