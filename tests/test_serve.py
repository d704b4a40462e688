"""serve: batched decode against the model's own forward, the engine against generate(), and a live
server on 127.0.0.1 driven by the official ``openai`` client and raw HTTP (errors, key, SIGTERM, load).

The models are random-init and tiny (dim 64, 2 layers): their text is gibberish, which is all the
protocol needs. Each live server is a real ``nanochat-train serve`` subprocess on a free port.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from helpers.net import free_port

from nanochat_ternary.checkpoint.files import save_checkpoint
from nanochat_ternary.config import build_config
from nanochat_ternary.data.chat_template import ChatTemplate, add_chat_tokens
from nanochat_ternary.data.tokenizer import byte_tokenizer
from nanochat_ternary.generate import generate
from nanochat_ternary.model.decode import Decoder
from nanochat_ternary.model.gpt import GPT
from nanochat_ternary.serve.batched import (
    SlotCache,
    decode_step,
    decode_step_fused,
    fused_decoder,
    prefill,
    prefill_fused,
    step_with_prefill,
)
from nanochat_ternary.serve.engine import Engine, Job
from nanochat_ternary.serve.text import TextStream

openai = pytest.importorskip("openai", reason="openai not installed (pip install 'nanochat-ternary[serve]')")
pytest.importorskip("uvicorn", reason="uvicorn not installed (pip install 'nanochat-ternary[serve]')")

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["dim=64", "n_layers=2", "n_heads=4", "n_kv_heads=2", "group_size=64"]


def tiny_config(vocab: int, context: int):
    return build_config("tiny-cpu", overrides=[*SMALL, f"vocab_size={vocab}", f"max_seq_len={context}",
                                               f"seq_len={min(context, 32)}", "weight_tied=false"])


def tiny_model(vocab: int, context: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(tiny_config(vocab, context).model)
    with torch.no_grad():
        for block in model.blocks:  # attention position-dependent, so a wrong position or mask shows
            block.attn.wq.weight.mul_(8.0)
            block.attn.wk.weight.mul_(8.0)
        # peaked logits, so a wrong context changes sampled tokens, not just their probabilities
        model.lm_head.weight.mul_(20.0)
    return model.eval()


def make_checkpoint(root: Path, chat: bool, context: int) -> Path:
    """A step dir of a random-init tiny model whose vocab is its tokenizer's (bytes + eot (+ chat tokens))."""
    tok = byte_tokenizer()
    if chat:
        add_chat_tokens(tok)
    root.mkdir(parents=True, exist_ok=True)
    tok.save(root / "tokenizer.json")
    model = tiny_model(tok.vocab_size, context)
    with torch.no_grad():  # readable gibberish: only printable ASCII gets a non-zero (peaked) logit
        printable = torch.zeros(tok.vocab_size, dtype=torch.bool)
        printable[32:127] = True
        model.lm_head.weight.masked_fill_(~printable[:, None], 0.0)
    meta = {"config": tiny_config(tok.vocab_size, context).to_dict()}
    return save_checkpoint(root / ("chat" if chat else "base"), 1, model, {}, meta,
                           tokenizer_path=root / "tokenizer.json")


# ---------------------------------------------------------------------------------------------
# numerics: batched decode == the model's own full forward, row by row


@pytest.mark.numerics  # make test reruns it with ATEN_CPU_CAPABILITY=avx2 and =default
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_decode_step_matches_full_forward_per_row(one_thread, kv_heads):
    cfg = build_config("tiny-cpu", overrides=[*SMALL[:3], f"n_kv_heads={kv_heads}", "group_size=64",
                                              "vocab_size=261", "max_seq_len=32", "seq_len=32"])
    torch.manual_seed(1)
    model = GPT(cfg.model).double().eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.wq.weight.mul_(8.0)
            block.attn.wk.weight.mul_(8.0)
    lengths = [7, 1, 12, 3]  # rows at different positions, one with a one-token prompt
    seqs = [torch.randint(0, 261, (n + 3,)).tolist() for n in lengths]
    cache = SlotCache(model, slots=6)  # more slots than rows: only the first len(tokens) are live
    for row, (n, s) in enumerate(zip(lengths, seqs)):
        cache.load(row, prefill(model, s[:n])[0])
    for t in range(3):  # three decode steps, every row one token further each time
        logits = decode_step(model, cache, [s[n + t] for n, s in zip(lengths, seqs)])  # [4, V]
        for row, (n, s) in enumerate(zip(lengths, seqs)):
            ref = model(torch.tensor([s[:n + t + 1]]))[0, -1]  # the model's uncached forward, float64
            # float64 throughout; the logits are cast to fp32 at the end, so they agree to fp32 rounding
            torch.testing.assert_close(logits[row], ref, rtol=1e-6, atol=1e-6)
    assert cache.lengths[:4] == [n + 3 for n in lengths]


@pytest.mark.numerics
def test_fused_decode_step_matches_the_decoder_per_row(one_thread):
    """The fused path (model/decode.py's packed weights) batched == the Decoder's own batch-1 forward."""
    model = tiny_model(261, 48, seed=2)  # fp32: the Decoder's weights are fp32
    dec = fused_decoder(model)
    assert dec is not None and dec.mode == "fp32"
    lengths = [5, 1, 17]
    seqs = [torch.randint(0, 261, (n + 2,)).tolist() for n in lengths]
    cache = SlotCache(model, slots=4)
    for row, (n, s) in enumerate(zip(lengths, seqs)):
        cache.load(row, prefill_fused(dec, s[:n])[0])
    for t in range(2):
        logits = decode_step_fused(dec, cache, [s[n + t] for n, s in zip(lengths, seqs)])  # [3, V]
        for row, (n, s) in enumerate(zip(lengths, seqs)):
            ref = Decoder(model, mode="fp32").forward(s[:n + t + 1])  # the Decoder alone, batch 1
            # fp32, the same weights and ops; only the GEMM's row count differs (its blocking can
            # reorder sums): ~1e-6 of logits of size ~10
            torch.testing.assert_close(logits[row], ref, rtol=1e-4, atol=1e-4)
            full = model(torch.tensor([s[:n + t + 1]]))[0, -1]  # and the model's own forward
            torch.testing.assert_close(logits[row], full, rtol=1e-4, atol=1e-4)


@pytest.mark.numerics
def test_prefill_inside_a_decode_step_matches_the_decoder(one_thread):
    """step_with_prefill (a prompt prefilled in the same products as the live rows' decode step) ==
    the Decoder's own batch-1 forward, for the live rows, the joining prompt, and the steps after."""
    model = tiny_model(261, 48, seed=4)
    dec = fused_decoder(model)
    lengths = [5, 1, 17]
    seqs = [torch.randint(0, 261, (n + 3,)).tolist() for n in lengths]
    joiner = torch.randint(0, 261, (11,)).tolist()  # a 9-token prompt, then 2 decode steps
    cache = SlotCache(model, slots=5)
    for row, (n, s) in enumerate(zip(lengths, seqs)):
        cache.load(row, prefill_fused(dec, s[:n])[0])

    def ref(ids):  # the Decoder alone, batch 1; the same tolerance as the fused test above (GEMM row counts)
        return Decoder(model, mode="fp32").forward(ids)

    logits, first = step_with_prefill(dec, cache, [s[n] for n, s in zip(lengths, seqs)], joiner[:9])
    for row, (n, s) in enumerate(zip(lengths, seqs)):
        torch.testing.assert_close(logits[row], ref(s[:n + 1]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(first[0], ref(joiner[:9]), rtol=1e-4, atol=1e-4)
    assert cache.lengths[:4] == [6, 2, 18, 9]
    for t in (1, 2):  # the joined row decodes with the others
        logits = decode_step_fused(dec, cache, [s[n + t] for n, s in zip(lengths, seqs)] + [joiner[8 + t]])
        for row, (n, s) in enumerate(zip(lengths, seqs)):
            torch.testing.assert_close(logits[row], ref(s[:n + t + 1]), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits[3], ref(joiner[:9 + t]), rtol=1e-4, atol=1e-4)
    empty = SlotCache(model, slots=2)  # no live rows: a prefill alone
    none, first = step_with_prefill(dec, empty, [], joiner[:1])
    assert none.shape[0] == 0 and empty.lengths[0] == 1
    torch.testing.assert_close(first[0], ref(joiner[:1]), rtol=1e-4, atol=1e-4)


@pytest.mark.numerics
def test_engine_batched_equals_generate_token_for_token(one_thread):
    """Several requests decoded together give each exactly what generate() gives it alone: the same
    greedy tokens, and with a seed the same sampled tokens (each request has its own generator)."""
    model = tiny_model(261, 64).double()
    prompts = [[256, 1, 2, 3], [256], [256, 7, 7], list(range(40, 60))]
    settings = [dict(temperature=0.0), dict(temperature=1.0, seed=5), dict(temperature=0.0),
                dict(temperature=0.9, top_k=20, top_p=0.8, seed=7)]
    # the first request ends first, so the last row (a greedy one: a wrong context would show) moves
    # into its row mid-decode; the 4th and 5th wait for a free row and join later
    budgets = [4, 20, 16, 9]
    stop = list(generate(model, prompts[0], 12, temperature=0.0))[2]  # a 5th request ends on a stop id
    prompts.append(prompts[0])
    settings.append(dict(temperature=0.0, stop_ids=frozenset([stop])))
    budgets.append(12)
    engine = Engine(model, max_batch=3, max_queue=4)  # 5 requests, 3 rows: two wait, then join mid-decode
    assert engine.path == "modules"  # float64: the model's own modules
    outs: list[list] = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]

    def emitter(i):
        def emit(ev):
            outs[i].append(ev)
            if ev[0] != "token":
                done[i].set()
        return emit

    for i, (p, s, b) in enumerate(zip(prompts, settings, budgets)):
        engine.submit(Job(p, b, emitter(i), **s))
    for d in done:
        assert d.wait(60)
    engine.close()
    for i, (p, s, b) in enumerate(zip(prompts, settings, budgets)):
        ref = list(generate(model, p, b, temperature=s["temperature"], top_k=s.get("top_k"), top_p=s.get("top_p"),
                            seed=s.get("seed", 0), stop_ids=s.get("stop_ids")))
        assert [v for k, v in outs[i] if k == "token"] == ref
        assert outs[i][-1] == ("done", "stop" if "stop_ids" in s else "length")
    assert len([v for k, v in outs[4] if k == "token"]) < 3  # the stop id came by the 3rd token
    assert engine.rows_decoded > engine.steps  # more than one row per step: it did batch


def test_text_stream_holds_split_characters_and_stop_strings():
    tok = byte_tokenizer()
    ids = tok.encode("ab é STOP zz")
    s = TextStream(tok.decode, stop=["STOP"])
    pieces = [s.feed(i) for i in ids]
    assert "".join(pieces) == "ab é " and s.stopped
    assert all("\ufffd" not in p for p in pieces)  # é is two bytes: released whole
    assert "S" not in "".join(pieces[:ids.index(ord("S")) + 3])  # "S", "ST", "STO" held back
    s2 = TextStream(tok.decode, stop=["STOP"])
    assert "".join(s2.feed(i) for i in tok.encode("a ST")) + s2.flush() == "a ST"  # held text released at the end


# ---------------------------------------------------------------------------------------------
# live servers


@contextmanager
def live_server(checkpoint: Path, *flags: str):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("NANOCHAT_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "nanochat_ternary.cli", "serve", "--checkpoint", str(checkpoint),
                             "--port", str(port), "--threads", "1", "--device", "cpu", "--log-level", "warning",
                             *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, f"server exited {proc.returncode}: {proc.stdout.read()}"
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "server did not answer /health within 60 s"
            time.sleep(0.1)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("chatmodel"), chat=True, context=128)


@pytest.fixture(scope="module")
def chat_server(chat_ckpt):
    with live_server(chat_ckpt) as (base, proc):
        yield base


@pytest.fixture(scope="module")
def base_server(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("basemodel"), chat=False, context=128)
    with live_server(ckpt, "--api-key", "sekrit") as (base, proc):
        yield base


def client(base: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=30)


MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]


def test_chat_with_the_openai_client_whole_and_streamed(chat_server, chat_ckpt):
    c = client(chat_server)
    model = c.models.list().data[0].id
    assert model == "chat/step_000001"
    r = c.chat.completions.create(model=model, messages=MSGS, max_tokens=12, temperature=0, seed=1)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    prompt = ChatTemplate(add_chat_tokens(byte_tokenizer())).encode(MSGS)
    assert r.usage.prompt_tokens == len(prompt)
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = c.chat.completions.create(model=model, messages=MSGS, max_tokens=12, temperature=0.9, seed=3)
    same = c.chat.completions.create(model=model, messages=MSGS, max_tokens=12, temperature=0.9, seed=3)
    assert again.choices[0].message.content == same.choices[0].message.content  # seeded sampling repeats

    chunks = list(c.chat.completions.create(model=model, messages=MSGS, max_tokens=12, temperature=0, seed=1,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == choice.message.content  # greedy: the stream carries exactly the whole reply
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completions_whole_streamed_and_stop_strings(chat_server):
    c = client(chat_server)
    r = c.completions.create(model="chat/step_000001", prompt="def ", max_tokens=20, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens == 4
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="chat/step_000001", prompt="def ", max_tokens=20, temperature=0, stream=True))
    assert streamed == r.choices[0].text
    full = r.choices[0].text
    if len(full) > 3 and "\ufffd" not in full[:4]:  # stop on a piece of the greedy output: cut before it
        stop = full[2:4]
        cut = c.completions.create(model="chat/step_000001", prompt="def ", max_tokens=20, temperature=0, stop=[stop])
        assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_error_bodies_through_the_openai_client(chat_server):
    c = client(chat_server)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4", messages=MSGS)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="chat/step_000001", messages=MSGS, max_tokens=10_000)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="chat/step_000001", messages=MSGS, n=2)
    assert e.value.param == "n"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="chat/step_000001", messages=[{"role": "user", "content": "x" * 200}])
    assert e.value.code == "context_length_exceeded"  # the prompt alone fills the 128-token context
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="chat/step_000001", messages=[{"role": "tool", "content": "x"}])
    assert "messages.0" in e.value.param


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_raw_http_errors_and_the_server_survives(chat_server):
    url = chat_server + "/v1/chat/completions"
    assert _error(httpx.post(url, content=b'{"messages": [', headers={"content-type": "application/json"}),
                  400)["code"] == "invalid_json"
    assert _error(httpx.post(url, content=b"[1, 2]"), 400)["code"] == "invalid_json"
    assert _error(httpx.post(url, content="\xff\xfe".encode("latin-1")), 400)["code"] == "invalid_json"
    assert _error(httpx.post(url, json={"model": "chat/step_000001"}), 400)["param"] == "messages"
    assert _error(httpx.post(url, json={"messages": MSGS, "bogus": 1}), 400)["param"] == "bogus"
    assert _error(httpx.post(url, json={"messages": MSGS, "temperature": "hot"}), 400)["param"] == "temperature"
    big = {"messages": [{"role": "user", "content": "x" * (1 << 20)}]}
    assert _error(httpx.post(url, json=big, timeout=30), 413)["code"] == "request_too_large"
    assert _error(httpx.get(chat_server + "/v1/nothing"), 404)["code"] == "not_found"
    assert _error(httpx.get(url), 405)["code"] == "method_not_allowed"
    # nulls mean "not set"; any integer seed is taken
    odd = httpx.post(url, json={"messages": MSGS, "max_tokens": 2, "temperature": None, "n": None, "seed": -(10 ** 30)},
                     timeout=30)
    assert odd.status_code == 200, odd.text
    # still serving after all that
    ok = httpx.post(url, json={"messages": MSGS, "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2


def test_sse_wire_format(chat_server):
    with httpx.stream("POST", chat_server + "/v1/completions", json={"prompt": "x", "max_tokens": 5, "stream": True},
                      timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["object"] == "text_completion" and last["choices"][0]["finish_reason"] == "length"


def test_base_model_with_api_key(base_server):
    with pytest.raises(openai.AuthenticationError):
        client(base_server, "wrong").models.list()
    r = httpx.get(base_server + "/v1/models")
    assert _error(r, 401)["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(base_server + "/health").json()["auth"] is True  # health and the page stay open
    assert httpx.get(base_server + "/").status_code == 200
    c = client(base_server, "sekrit")
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="base/step_000001", messages=MSGS)
    assert e.value.code == "model_not_chat" and "/v1/completions" in e.value.message
    r = c.completions.create(model="base/step_000001", prompt="", max_tokens=5)
    assert r.usage.prompt_tokens == 1 and r.usage.completion_tokens <= 5  # empty prompt: a new document


def test_concurrent_streams_short_load(chat_server):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from serve_load import run_phase
    finally:
        sys.path.pop(0)
    before = httpx.get(chat_server + "/health").json()["decode_steps"]
    summary = asyncio.run(run_phase(chat_server, clients=8, requests_per_client=2, max_tokens=24)).summary()
    assert summary["requests"] == 16 and summary["failed"] == 0, summary["errors"]
    assert summary["completion_tokens"] > 0
    health = httpx.get(chat_server + "/health").json()
    assert health["decode_steps"] > before and health["decoding"] == 0 and health["waiting"] == 0


@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory) -> Path:
    # a long context so one reply lasts a while (seconds) and is surely still in flight when poked
    return make_checkpoint(tmp_path_factory.mktemp("longmodel"), chat=True, context=1024)


def _stream_lines(base: str, max_tokens: int):
    # greedy: the test model gives <|endoftext|> a zero logit, below the best printable byte's, so a
    # reply never ends early
    body = {"prompt": "a", "max_tokens": max_tokens, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    return httpx.stream("POST", base + "/v1/completions", json=body, timeout=60)


def test_full_queue_is_503_a_gone_client_frees_its_row_and_sigterm_drains_then_exits_0(long_ckpt):
    with live_server(long_ckpt, "--max-batch", "1", "--max-queue", "0") as (base, proc):
        c = client(base)
        with _stream_lines(base, 1000) as r:
            first = r.iter_lines()  # held: dropping a line iterator closes httpx's response
            assert next(first).startswith("data: ")  # the one decode row is taken now
            with pytest.raises(openai.InternalServerError) as e:
                c.completions.create(model="chat/step_000001", prompt="b", max_tokens=2)
            assert e.value.status_code == 503 and e.value.code == "server_busy"
            first.close()
        # the client hung up: the server stops that reply and frees the row well before its 1000 tokens
        deadline = time.time() + 10
        while (h := httpx.get(base + "/health").json())["decoding"] and time.time() < deadline:
            time.sleep(0.02)
        assert h["decoding"] == 0 and h["decode_steps"] < 999, h
        with _stream_lines(base, 1000) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert httpx.get(base + "/health").json()["decoding"] == 1  # still in flight as SIGTERM comes
            proc.send_signal(signal.SIGTERM)
            rest = [x for x in lines if x]
        assert rest[-1] == "data: [DONE]"
        usage = json.loads([x for x in rest if '"usage"' in x][-1][6:])["usage"]
        assert usage["completion_tokens"] == 1000  # the reply in flight finished whole
        assert proc.wait(30) == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(base + "/health", timeout=2)  # and it is gone


def test_serve_bad_flags_are_one_line_errors(tmp_path, chat_ckpt, capsys):
    from nanochat_ternary.cli import main

    for args, needle in [(["--checkpoint", str(tmp_path / "nope")], "nope"),
                         (["--checkpoint", str(chat_ckpt), "--max-batch", "0"], "--max-batch"),
                         (["--checkpoint", str(chat_ckpt), "--max-queue", "-1"], "--max-queue"),
                         (["--checkpoint", str(chat_ckpt), "--port", "70000"], "--port")]:
        assert main(["serve", *args]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------------------------------------
# batched == one at a time on the served path; truncation through the client


@pytest.mark.numerics
def test_fused_engine_batched_equals_one_at_a_time(one_thread):
    """The served path (fp32 fused decode): requests decoded together, joining and leaving mid-way,
    give each exactly the tokens it gets decoded alone (max_batch 1), greedy and seeded."""
    model = tiny_model(261, 64, seed=5)
    # rows finish at different steps, so live rows move into the holes (the cache rows are copied)
    # and waiting requests join mid-decode; sampled rows at temperature >= 1 flip on small changes
    prompts = [[256, 1, 2, 3], [256], list(range(40, 70)), [256, 9], [256, 7, 7, 7, 7], [256, 3] * 5,
               [256, 100], list(range(90, 100))]
    settings = [dict(temperature=0.0), dict(temperature=1.0, seed=5), dict(temperature=1.5, seed=1),
                dict(temperature=0.9, top_k=20, top_p=0.8, seed=7), dict(temperature=1.2, seed=11),
                dict(temperature=1.5, seed=2), dict(temperature=0.0), dict(temperature=1.5, seed=3)]
    budgets = [5, 40, 30, 9, 36, 20, 25, 30]

    def run(max_batch: int) -> list[list[int]]:
        engine = Engine(model, max_batch=max_batch, max_queue=8)
        assert engine.path == "fused fp32"
        outs: list[list[int]] = [[] for _ in prompts]
        done = [threading.Event() for _ in prompts]
        def emitter(out: list[int], finished: threading.Event):
            return lambda ev: out.append(ev[1]) if ev[0] == "token" else finished.set()

        for i, (p, s, b) in enumerate(zip(prompts, settings, budgets)):
            engine.submit(Job(p, b, emitter(outs[i], done[i]), **s))
        assert all(d.wait(60) for d in done)
        engine.close()
        assert max_batch == 1 or engine.rows_decoded > engine.steps  # it did batch
        return outs

    assert run(3) == run(1)


def test_truncation_through_the_openai_client(chat_server):
    c = client(chat_server)
    long = [{"role": "system", "content": "be brief"}]
    for i in range(6):
        long += [{"role": "user", "content": f"tell me about item {i}"}, {"role": "assistant", "content": "ok " * 4}]
    long.append({"role": "user", "content": "and now?"})
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="chat/step_000001", messages=long, max_tokens=16)
    assert e.value.code == "context_length_exceeded"
    raw = c.chat.completions.with_raw_response.create(model="chat/step_000001", messages=long, max_tokens=16,
                                                      temperature=0, extra_body={"truncation": "auto"})
    r = raw.parse()
    kept = long[:1] + long[-(len(long) - 1 - int(raw.headers["x-truncated-messages"])):]
    assert int(raw.headers["x-truncated-messages"]) > 0
    assert r.usage.prompt_tokens == len(ChatTemplate(add_chat_tokens(byte_tokenizer())).encode(kept))
    assert r.usage.prompt_tokens + 16 <= 128
