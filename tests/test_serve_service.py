"""serve without HTTP: the Service (usage counts, coalesced pieces, truncation) over a live Engine,
and TextStream (pieces, stop strings, incremental decoding). The live-server tests with the openai
client and the decode numerics are in tests/test_serve.py (its tiny random models are used here).
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from nanochat_ternary.data.chat_template import add_chat_tokens
from nanochat_ternary.data.tokenizer import byte_tokenizer
from nanochat_ternary.generate import generate
from nanochat_ternary.serve.engine import Engine
from nanochat_ternary.serve.text import TextStream

pytest.importorskip("fastapi", reason="fastapi not installed (pip install 'nanochat-ternary[serve]')")

from test_serve import tiny_model  # noqa: E402  (the same tiny random models as the live-server tests)


def _service(context: int = 64, max_batch: int = 4, **kw):
    from nanochat_ternary.serve.service import Service

    tok = add_chat_tokens(byte_tokenizer())
    model = tiny_model(tok.vocab_size, context, seed=3)  # fp32: the fused decode path the server runs
    with torch.no_grad():  # printable ASCII only (as make_checkpoint): stop strings cut whole characters
        model.lm_head.weight[torch.arange(tok.vocab_size).lt(32) | torch.arange(tok.vocab_size).ge(127)] = 0.0
    return Service("m", tok, Engine(model, max_batch=max_batch, max_queue=8), context, **kw), model


def _complete(service, prompt: list[int], stop_ids=frozenset(), chat=False, **fields):
    from nanochat_ternary.serve.protocol import CompletionRequest

    req = CompletionRequest(prompt=prompt, **fields)
    return asyncio.run(service.whole(req, prompt, frozenset(stop_ids), chat))


def _streamed_usage(service, prompt: list[int], stop_ids, **fields) -> tuple[str, int]:
    from nanochat_ternary.serve.protocol import CompletionRequest

    req = CompletionRequest(prompt=prompt, stream=True, stream_options={"include_usage": True}, **fields)

    async def run():
        return [line async for line in service.streamed(req, prompt, frozenset(stop_ids), False)]

    events = [json.loads(e[6:]) for line in asyncio.run(run()) for e in line.split("\n\n") if e and e != "data: [DONE]"]
    return "".join(c["text"] for e in events for c in e["choices"]), events[-1]["usage"]["completion_tokens"]


def test_usage_counts_every_generated_token_the_stop_token_included(one_thread):
    """OpenAI's completion_tokens is what the model generated: a reply that ends on its end-of-turn
    token counts that token (its API reference's "Hello! How can I assist you today?" is 9 text
    tokens and completion_tokens 10), a reply cut by max_tokens counts max_tokens."""
    service, model = _service()
    try:
        prompt = [256, 10, 20, 30]
        greedy = list(generate(model, prompt, 8, temperature=0.0))
        r = _complete(service, prompt, max_tokens=8, temperature=0)
        assert r["usage"]["completion_tokens"] == 8 and r["choices"][0]["finish_reason"] == "length"
        assert r["choices"][0]["text"] == service.tok.decode(greedy)
        stop = greedy[3]
        k = greedy.index(stop)  # the first time it comes: tokens 0..k-1 are text, token k ends the reply
        r = _complete(service, prompt, stop_ids={stop}, max_tokens=8, temperature=0)
        assert r["choices"][0]["finish_reason"] == "stop"
        assert r["choices"][0]["text"] == service.tok.decode(greedy[:k])
        assert r["usage"]["completion_tokens"] == k + 1  # the stop token was generated too
        assert r["usage"]["total_tokens"] == len(prompt) + k + 1
        assert _streamed_usage(service, prompt, {stop}, max_tokens=8, temperature=0) == (
            service.tok.decode(greedy[:k]), k + 1)  # the stream's usage chunk agrees
        # a stop string: the tokens up to the one that completed it
        text = service.tok.decode(greedy)
        s = text[2:4]
        upto = next(i for i in range(1, 9) if s in service.tok.decode(greedy[:i]))
        r = _complete(service, prompt, max_tokens=8, temperature=0, stop=[s])
        assert r["choices"][0]["text"] == text[:text.index(s)] and r["usage"]["completion_tokens"] == upto
    finally:
        service.engine.close()


def test_coalesced_stream_pieces_are_the_per_token_text(one_thread):
    """A stream that gathers tokens (--stream-interval) sends the same text as one chunk per token."""
    service, model = _service()
    try:
        prompt = [256, 65, 66]
        texts = []
        for interval in (0.0, 0.05):
            service.stream_interval = interval
            texts.append(_streamed_usage(service, prompt, set(), max_tokens=30, temperature=0.8, seed=4))
        whole = _complete(service, prompt, max_tokens=30, temperature=0.8, seed=4)
        assert texts[0] == texts[1] == (whole["choices"][0]["text"], 30)
    finally:
        service.engine.close()


def test_text_stream_feed_many_equals_feeding_one_by_one():
    tok = byte_tokenizer()
    ids = tok.encode("añb € xSTOPy çz")
    for stop in ([], ["STOP"], ["€ x"]):
        one = TextStream(tok.decode, stop)
        ref = "".join(one.feed(i) for i in ids) + one.flush()
        for cut in (1, 2, 3, 5):
            many = TextStream(tok.decode, stop)
            got, taken = "", 0
            for j in range(0, len(ids), cut):
                piece, n = many.feed_many(ids[j:j + cut])
                got, taken = got + piece, taken + n
                if many.stopped:
                    break
            assert got + many.flush() == ref and many.stopped == one.stopped
            if stop:  # stops at the very token that completed the stop string
                assert taken == len(one.ids)


def test_truncation_auto_drops_the_oldest_turns_disabled_is_a_400():
    from nanochat_ternary.data.chat_fit import fit_history
    from nanochat_ternary.serve.protocol import ApiError, ChatRequest

    service, _ = _service(context=64)
    service.engine.close()  # prompts only: nothing is decoded
    t = service.template
    msgs = [{"role": "system", "content": "be brief"}]
    for i in range(4):
        msgs += [{"role": "user", "content": f"question {i} " * 2}, {"role": "assistant", "content": f"answer {i}"}]
    msgs.append({"role": "user", "content": "last one?"})
    assert len(t.encode(msgs)) > 64 - 8

    def prompt(messages=msgs, **fields):
        req = ChatRequest(messages=messages, max_tokens=8, **fields)
        ids, _, dropped = service.chat_prompt(req)
        service.budget(len(ids), req)  # raises the 400 when it does not fit
        return ids, dropped

    with pytest.raises(ApiError) as e:  # the default, as OpenAI: no silent truncation
        prompt()
    assert e.value.status == 400 and e.value.code == "context_length_exceeded" and "truncation" in e.value.message
    ids, dropped = prompt(truncation="auto")
    kept, n = fit_history(t, msgs, 64 - 8)  # the terminal chat's rule
    assert dropped == n > 0 and ids == t.encode(kept) and len(ids) + 8 <= 64
    assert kept[0]["role"] == "system" and kept[1]["role"] == "user" and kept[-1] == msgs[-1]
    service.truncation = "auto"  # the server's --truncation auto; a request can still say disabled
    assert prompt() == (ids, dropped)
    with pytest.raises(ApiError):
        prompt(truncation="disabled")
    # at the edge: a prompt of exactly 64 - 8 tokens is kept whole, one more token drops a turn
    short = msgs[:3] + [{"role": "user", "content": ""}]
    short[-1]["content"] = "y" * (56 - len(t.encode(short)))  # byte tokenizer: a character is a token
    assert prompt(short, truncation="auto") == (t.encode(short), 0)
    short[-1]["content"] += "y"
    assert prompt(short, truncation="auto")[1] == 2  # the first question and its answer
    with pytest.raises(ApiError) as e:  # the system and newest messages alone do not fit: still a 400
        prompt(msgs[:3] + [{"role": "user", "content": "x" * 80}])
    assert e.value.code == "context_length_exceeded"


def test_text_stream_decodes_incrementally_to_the_full_decode():
    """Random byte tokens (broken and whole UTF-8 sequences, chat markers): the released text equals
    decoding all ids at once, while each decode call sees only the ids after the committed prefix."""
    tok = add_chat_tokens(byte_tokenizer())
    g = torch.Generator().manual_seed(0)
    pool = tok.encode("aé€😀 z") + [0xC3, 0xE2, 0x82, 0xFF] + list(range(256, 261))  # + partial bytes, markers
    ids = [pool[i] for i in torch.randint(0, len(pool), (400,), generator=g).tolist()]
    seen = []

    def decode(xs):
        seen.append(len(xs))
        return tok.decode(xs)

    s = TextStream(decode)
    out = "".join(s.feed(i) for i in ids) + s.flush()
    assert out == tok.decode(ids)
    assert max(seen) < 100  # never the whole 400 again
