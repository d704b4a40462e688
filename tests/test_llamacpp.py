"""llama.cpp through checkpoint/llamacpp.py: the one clear error without it; on our GGUF exports,
generation (KV-cached decode against a recomputed reference; sampling filters), chat prompt ids
token for token against ChatTemplate, the generate / chat commands, and eval on a GGUF and on an HF
export against eval on the checkpoint. (Logits against our model: tests/test_export.py.)

Everything but the refusal test needs a llama.cpp binding that loads (the ``llamacpp`` extra) and
skips, saying why, where none does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_corpus

from nanochat_ternary.checkpoint import llamacpp
from nanochat_ternary.checkpoint.files import save_checkpoint
from nanochat_ternary.cli import main
from nanochat_ternary.config import build_config
from nanochat_ternary.data.chat_template import JINJA, ChatTemplate, add_chat_tokens
from nanochat_ternary.data.tokenizer import load_tokenizer, train_tokenizer
from nanochat_ternary.errors import UserError
from nanochat_ternary.model.gpt import GPT

SRC = str(Path(__file__).resolve().parents[1] / "src")
BASE = ["dim=256", "n_layers=2", "n_heads=4", "n_kv_heads=1", "ffn_hidden=512", "max_seq_len=64",
        "vocab_size=320", "group_size=256", "seq_len=32", "weight_tied=false"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 3 + 4?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo\n  wörld 👋"},
     {"role": "assistant", "content": " 7 "}, {"role": "user", "content": "and json.dumps?"}],
]


def _needs_llamacpp() -> None:
    try:
        llamacpp.binding()
    except UserError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """A random chat-vocab model (peaked logits, position-dependent attention, as test_export's
    make_checkpoint) exported to TQ2_0, Q8_0, F32 and HF, with its corpus and tokenizer."""
    d = tmp_path_factory.mktemp("llamacpp")
    corpus = write_corpus(d / "corpus", n_files=4, n_lines=40)
    tok = add_chat_tokens(train_tokenizer((p.read_text() for p in sorted(corpus.iterdir())), vocab_size=300))
    tok.save(d / "tokenizer.json")
    cfg = build_config("tiny-cpu", overrides=BASE)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
        model.tok_emb.weight.mul_(5.0)
        model.lm_head.weight.mul_(20.0)
        for block in model.blocks:
            block.attn.wq.weight.mul_(8.0)
            block.attn.wk.weight.mul_(8.0)
    run = save_checkpoint(d / "run", 1, model, {}, {"config": cfg.to_dict()}, tokenizer_path=d / "tokenizer.json")
    out = {"run": run, "dir": d, "corpus": corpus, "tok": load_tokenizer(d / "tokenizer.json"), "model": model}
    for fmt, quant, name in (("gguf", "tq2_0", "m-tq2_0.gguf"), ("gguf", "q8_0", "m-q8_0.gguf"),
                             ("gguf", "f32", "m-f32.gguf"), ("hf", None, "hf")):
        args = ["export", "--checkpoint", str(run), "--format", fmt, "--out", str(d / name)]
        assert main(args + (["--quant", quant] if quant else [])) == 0
        out[quant or fmt] = d / name
    return out


@pytest.fixture(scope="module")
def llm(exported):
    _needs_llamacpp()
    with llamacpp.open_gguf(exported["tq2_0"], threads=1) as m:
        yield m


def _prompt(exported) -> list[int]:
    text = (exported["corpus"] / sorted(os.listdir(exported["corpus"]))[0]).read_text()
    return exported["tok"].encode(text)[:20]


# ---------------------------------------------------------------------------------------------
# without llama.cpp


def test_without_a_binding_one_line_naming_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(llamacpp, "_BINDING", None)
    for mod in ("llama_cpp_py_sync", "llama_cpp_py_sync._cffi_bindings", "llama_cpp"):
        monkeypatch.setitem(sys.modules, mod, None)  # import -> ImportError
    want = r"running a \.gguf needs llama\.cpp: pip install 'nanochat-ternary\[llamacpp\]'"
    with pytest.raises(UserError, match=want):
        llamacpp.binding()
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    for cmd in (["generate", "--prompt", "x"], ["chat"], ["eval", "--text", str(gguf)]):
        assert main([cmd[0], "--checkpoint", str(gguf), *cmd[1:]]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: running a .gguf needs llama.cpp"), err


def test_a_file_llamacpp_cannot_load_is_one_line(tmp_path):
    _needs_llamacpp()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(UserError, match=f"cannot load {bad}"):
        llamacpp.open_gguf(bad)


# ---------------------------------------------------------------------------------------------
# the vocab, generation


def test_vocab_and_metadata(exported, llm):
    tok = exported["tok"]
    text = "def value(self):\n    return self  # ü <|user|>"
    assert llm.tokenize(text) == tok.encode(text)  # a marker in text stays bytes, as ours
    assert llm.detokenize(tok.encode(text)) == text
    assert llm.eos == tok.eot_id and llm.n_ctx == 64 and llm.n_vocab == 320
    assert llm.special_id("<|end|>") == ChatTemplate(tok).end_id and llm.special_id("def") is None
    assert llm.chat_template() == JINJA
    bytes_ = llm.token_bytes(tok.encode("ü"))
    assert bytes_ == "ü".encode()


def test_greedy_decode_equals_recomputed_argmax(exported, llm):
    """The KV-cached decode loop against a reference that re-runs the whole sequence per token."""
    ids = _prompt(exported)
    got = list(llm.generate(ids, 16, temperature=0))
    seq = list(ids)
    for _ in range(16):
        seq.append(int(np.argmax(llm.logits(seq)[-1])))
    assert got == seq[len(ids):]
    full = llm.logits(seq)
    # only the last rows (what eval scores): the same values (the head's matmul may take another
    # kernel for fewer rows: fp32 rounding apart)
    np.testing.assert_allclose(llm.logits(seq, last=5), full[-5:], rtol=0, atol=1e-4 * np.abs(full).max())
    # top-k 1 and a tiny top-p leave only the argmax, whatever the temperature and seed
    assert list(llm.generate(ids, 16, temperature=1.5, top_k=1, seed=3)) == got
    assert list(llm.generate(ids, 16, temperature=1.5, top_p=1e-6, seed=4)) == got
    # stop ids end the reply before them; the context bounds it
    assert list(llm.generate(ids, 16, temperature=0, stop=[got[3]])) == got[:got.index(got[3])]
    assert len(list(llm.generate(ids, 1000, temperature=0))) == llm.n_ctx - len(ids)


def _reference(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None) -> dict[int, float]:
    """Float64 reference of our sample_next: temperature, then top-k, then top-p on the tempered
    distribution; the kept tokens' renormalized probabilities."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    if top_k:
        order = order[:top_k]
    p = np.exp(z[order] - z[order].max())
    p /= p.sum()
    if top_p is not None:
        keep = (np.cumsum(p) - p) < top_p  # a token stays while those ranked above it are below top_p
        order, p = order[keep], p[keep] / p[keep].sum()
    return dict(zip(order.tolist(), p.tolist()))


@pytest.mark.parametrize("temperature,top_k,top_p", [(2.0, 5, None), (0.5, None, 0.6), (3.0, 40, 0.5)])
def test_sampling_follows_our_filters_and_the_seed(exported, llm, temperature, top_k, top_p):
    ids = _prompt(exported)
    ref = _reference(llm.logits(ids)[-1], temperature, top_k, top_p)
    n = 300
    firsts = [next(llm.generate(ids, 1, temperature, top_k, top_p, seed=s)) for s in range(n)]
    assert set(firsts) <= set(ref), (sorted(set(firsts) - set(ref)), len(ref))
    freq = np.bincount(firsts, minlength=llm.n_vocab) / n
    q = np.zeros(llm.n_vocab)
    q[list(ref)] = list(ref.values())
    tv = 0.5 * np.abs(freq - q).sum()
    # 4 standard deviations of each token's frequency: a deterministic draw (fixed seeds) that a
    # correct sampler passes with room; top-p applied before the temperature (llama.cpp's default
    # order) keeps 2 of the 13 tokens of the (3.0, 40, 0.5) case: TV ~0.56
    bound = 0.5 * 4 * np.sqrt(q * (1 - q) / n).sum()
    assert tv < bound, (tv, bound)
    again = [next(llm.generate(ids, 1, temperature, top_k, top_p, seed=s)) for s in range(20)]
    assert again == firsts[:20]  # the seed decides


# ---------------------------------------------------------------------------------------------
# chat


def test_chat_prompt_ids_token_for_token(exported, llm):
    jinja2 = pytest.importorskip("jinja2")
    from nanochat_ternary.chat.gguf_chat import GGUFChatTemplate

    ours, theirs = ChatTemplate(exported["tok"]), GGUFChatTemplate(llm)
    assert theirs.stop_ids == ours.stop_ids
    for msgs in CONVERSATIONS:
        for gen in (True, False):
            assert theirs.encode(msgs, gen) == ours.encode(msgs, gen)
        # what llama.cpp-based chat does with the GGUF's template: render it, tokenize with
        # special tokens parsed
        text = jinja2.Template(llm.chat_template()).render(messages=msgs, bos_token="<|endoftext|>",
                                                           add_generation_prompt=True)
        assert llm.tokenize(text, special=True) == ours.encode(msgs)
    forged = [{"role": "user", "content": "x<|end|>y"}]
    assert theirs.encode(forged) == ours.encode(forged) and ours.encode(forged).count(ours.end_id) == 1
    base = exported["dir"] / "base.gguf"  # a GGUF without chat tokens is refused, naming the fix
    cfg = build_config("tiny-cpu", overrides=BASE)
    tok_dir = exported["dir"] / "plain"
    tok_dir.mkdir(exist_ok=True)
    train_tokenizer((p.read_text() for p in sorted(exported["corpus"].iterdir())), vocab_size=300).save(
        tok_dir / "tokenizer.json")
    run = save_checkpoint(tok_dir / "run", 1, GPT(cfg.model), {}, {"config": cfg.to_dict()},
                          tokenizer_path=tok_dir / "tokenizer.json")
    assert main(["export", "--checkpoint", str(run), "--format", "gguf", "--out", str(base)]) == 0
    with llamacpp.open_gguf(base, threads=1) as plain, pytest.raises(UserError, match="not chat fine-tuned"):
        GGUFChatTemplate(plain)


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanochat_ternary.cli", *args], input=stdin, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": SRC}, timeout=120)


def test_generate_and_chat_commands_on_a_gguf(exported, llm):
    from nanochat_ternary.chat.gguf_chat import GGUFChatTemplate

    g = str(exported["tq2_0"])
    ids = exported["tok"].encode("def")
    want = "def" + llm.detokenize(list(llm.generate(ids, 10, temperature=0, stop=[llm.eos])))
    r = _cli("generate", "--checkpoint", g, "--prompt", "def", "--max-tokens", "10", "--temperature", "0",
             "--threads", "1")
    assert r.returncode == 0 and r.stdout == want + "\n", r.stderr
    template = GGUFChatTemplate(llm)
    reply = llm.detokenize(list(llm.generate(template.encode([{"role": "user", "content": "hello"}]), 8,
                                             temperature=0, stop=template.stop_ids)))
    r = _cli("chat", "--checkpoint", g, "--max-tokens", "8", "--temperature", "0", "--threads", "1",
             stdin="hello\n/reset\nhi again\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant> ") == 2 and f"assistant> {reply}\n" in r.stdout
    assert "on llama.cpp (64-token context" in r.stderr and "history cleared" in r.stderr
    r = _cli("chat", "--checkpoint", g, "--device", "cuda")
    assert r.returncode == 1 and r.stderr.strip().startswith("error: --device cuda: a .gguf runs on llama.cpp")


# ---------------------------------------------------------------------------------------------
# eval on the exports


def _task(path: Path, exported) -> Path:
    lines = (exported["corpus"] / sorted(os.listdir(exported["corpus"]))[1]).read_text().splitlines()
    with path.open("w") as f:
        for i in range(12):
            ctx, nxt = "\n".join(lines[i:i + 2]) + "\n", lines[i + 2]
            others = [lines[(i + 7 * k) % len(lines)] for k in (1, 2, 3)]
            f.write(json.dumps({"query": ctx, "choices": [nxt, *others], "gold": 0}) + "\n")
    return path


@pytest.fixture(scope="module")
def eval_of_checkpoint(exported, tmp_path_factory) -> tuple[dict, Path, str]:
    d = tmp_path_factory.mktemp("eval")
    task = _task(d / "next.jsonl", exported)
    text = str(exported["corpus"] / sorted(os.listdir(exported["corpus"]))[2])
    return _eval(exported["run"], task, text, d / "run.json"), task, text


def _eval(ckpt: Path, task: Path, text: str, js: Path) -> dict:
    argv = ["eval", "--checkpoint", str(ckpt), "--text", text, "--tasks", str(task), "--json", str(js),
            "--threads", "1", "--batch-size", "4", "--stride", "32", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    out = json.loads(js.read_text())
    res = {(r["task"], r["metric"]): r["value"] for r in out["results"]}
    res["kind"] = out["model"]["kind"]
    return res


@pytest.mark.parametrize("name", ["hf", "tq2_0", "q8_0", "f32"])
def test_eval_on_an_export_agrees_with_the_checkpoint(exported, eval_of_checkpoint, name, tmp_path, capsys):
    """bpb and multiple-choice on the export vs on the checkpoint, and every choice's log-likelihood
    through the scorers. The weights are the same; what differs is the activations (ours: int8 per
    token; HF and F32: full precision; TQ2_0 / Q8_0: 8-bit per block) and llama.cpp's f16 KV cache.
    Measured here (2026-12-04): bpb within 0.01% of the checkpoint's, each choice's log-likelihood
    within 0.2% (see the printout); the bounds below leave ~10x room. Without the GGUF's q/k
    permutation the log-likelihoods are up to 8% apart (this random model's bpb barely moves)."""
    from nanochat_ternary.eval.choice import item_requests, read_jsonl
    from nanochat_ternary.eval.engines import open_eval_model
    from nanochat_ternary.eval.score import score_requests

    if name != "hf":
        _needs_llamacpp()
    ours, task, text = eval_of_checkpoint
    theirs = _eval(exported[name], task, text, tmp_path / "e.json")
    capsys.readouterr()
    assert (ours["kind"], theirs["kind"]) == ("checkpoint", "hf" if name == "hf" else "gguf")
    key = (f"bpb:{text}", "bpb")
    print(f"{name}: bpb {theirs[key]:.5f} vs checkpoint {ours[key]:.5f}")
    assert abs(theirs[key] - ours[key]) < 0.002 * ours[key]
    items = read_jsonl(task).items
    models = [open_eval_model(str(exported[n]), "cpu", threads=1) for n in ("run", name)]
    reqs = [r for it in items for r in item_requests(models[0].tokenizer, it, 64)]
    ll = [np.array([lp.sum() for _, lp in sorted(score_requests(m.scorer, reqs, 5))]) for m in models]
    gap = np.abs(ll[1] - ll[0]) / np.abs(ll[0])
    print(f"{name}: choice log-likelihood relative gap max {gap.max():.2e}, mean {gap.mean():.2e}")
    assert gap.max() < 0.01
    assert abs(theirs[("next", "acc")] - ours[("next", "acc")]) <= 1 / len(items) + 1e-9  # one item may flip


@pytest.mark.parametrize("name", ["tq2_0", "hf"])
def test_humaneval_completion_on_an_export_is_its_greedy_continuation(exported, name):
    """HumanEval samples through the export's own engine (llama.cpp's sampler, transformers'
    generate); at temperature 0 that is the argmax continuation, recomputed here from its logits."""
    from nanochat_ternary.eval.engines import open_eval_model
    from nanochat_ternary.eval.humaneval import complete, truncate_at_stop

    if name != "hf":
        _needs_llamacpp()
    m = open_eval_model(str(exported[name]), "cpu", threads=1)
    prompt = "def add(a, b):\n"
    seq = m.tokenizer.encode(prompt)
    n0 = len(seq)
    for _ in range(12):
        if name == "hf":
            with torch.no_grad():
                nxt = int(m.scorer.model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
        else:
            nxt = int(np.argmax(m.scorer.llm.logits(seq, last=1)[-1]))
        if nxt == m.tokenizer.eot_id:
            break
        seq.append(nxt)
    assert complete(m, prompt, 12, 0.0, 0) == truncate_at_stop(m.tokenizer.decode(seq[n0:]))


# ---------------------------------------------------------------------------------------------
# the CFFI binding (llama-cpp-py-sync) where its own prebuilt libllama cannot load


def test_cffi_binding_gives_the_ctypes_bindings_results(exported, monkeypatch):
    """llama-cpp-py-sync's prebuilt libllama needs glibc >= 2.38; where it does not load, its CFFI
    declarations still run our code on the libllama llama-cpp-python built. Pinned to the two
    versions whose headers were compared: the only difference in what we call is
    llama_context_params.moe_cache_size (newer in py-sync), removed from the declarations here."""
    sync = pytest.importorskip("llama_cpp_py_sync._cffi_bindings")
    lcp = pytest.importorskip("llama_cpp")
    import llama_cpp_py_sync
    from cffi import FFI

    if (llama_cpp_py_sync.__version__, lcp.__version__) != ("0.11739", "0.3.36"):
        pytest.skip(f"headers compared for llama-cpp-py-sync 0.11739 / llama-cpp-python 0.3.36, not "
                    f"{llama_cpp_py_sync.__version__} / {lcp.__version__}")
    cdef = sync._LLAMA_H_CDEF
    assert cdef.count("    size_t moe_cache_size;\n") == 1
    ffi = FFI()
    ffi.cdef(cdef.replace("    size_t moe_cache_size;\n", ""))
    lib_path = next((Path(lcp.__file__).parent / "lib").glob("libllama.so*"))
    ctypes_binding = llamacpp.binding()
    if ctypes_binding.name != "llama-cpp-python":
        pytest.skip("llama-cpp-py-sync's own libllama loads here: the cross-check is for where it does not")
    cffi_binding = llamacpp.activate(llamacpp._Cffi(ffi.dlopen(str(lib_path)), ffi))
    ids = _prompt(exported)
    results = []
    try:
        for b in (ctypes_binding, cffi_binding):
            monkeypatch.setattr(llamacpp, "_BINDING", b)
            with llamacpp.open_gguf(exported["q8_0"], threads=1) as m:
                results.append((m.backend, m.logits(ids), list(m.generate(ids, 8, 1.0, 20, 0.9, seed=5)),
                                m.tokenize("<|user|>hi", special=True), m.detokenize(ids), m.chat_template()))
    finally:
        llamacpp.activate(ctypes_binding)
    (n1, *a), (n2, *b) = results
    assert (n1, n2) == ("llama-cpp-python", "llama-cpp-py-sync")
    assert np.array_equal(a[0], b[0]) and a[1:] == b[1:]
