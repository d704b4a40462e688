"""Tests of the KV cache and sampling/generation."""

from __future__ import annotations

import pytest
import torch
from helpers.models import tiny_model

from nanochat_ternary.generate import generate, sample_next
from nanochat_ternary.model import GPT, KVCache


def make_model(n_kv_heads: int, quant: str = "ternary", max_seq_len: int = 32) -> GPT:
    return tiny_model(n_heads=4, n_kv_heads=n_kv_heads, ffn_hidden=128, vocab_size=61, max_seq_len=max_seq_len,
                      group_size=32, quantization=quant)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
@pytest.mark.parametrize("quant", ["ternary", "none"])
def test_kv_cache_matches_full_forward(n_kv_heads, quant):
    model = make_model(n_kv_heads, quant)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(idx)  # [2, 20, V]

        # token by token
        cache = KVCache.for_model(model, batch_size=2)
        steps = [model(idx[:, t:t + 1], kv_cache=cache) for t in range(idx.shape[1])]
        assert cache.pos == 20
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-4)

        # prefill a prompt, then a multi-token chunk (causal within the chunk), then single steps
        cache = KVCache.for_model(model, batch_size=2, max_len=20)
        parts = [model(idx[:, :7], kv_cache=cache), model(idx[:, 7:12], kv_cache=cache)]
        parts += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(12, 20)]
        torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-4)
        with pytest.raises(ValueError):
            model(idx[:, :1], kv_cache=cache)  # full


def naive_greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            tok = int(logits.argmax())
            out.append(tok)
            ids.append(tok)
    return out


@pytest.mark.parametrize("n_kv_heads", [4, 1])
def test_greedy_generate_matches_naive_loop(n_kv_heads):
    model = make_model(n_kv_heads)
    prompt = [3, 14, 15, 9, 26]
    got = list(generate(model, prompt, max_tokens=12, temperature=0.0))
    assert got == naive_greedy(model, prompt, 12)


def test_generate_stops_at_max_seq_len_and_truncates_prompt():
    model = make_model(4, max_seq_len=16)
    out = list(generate(model, [1, 2, 3, 4, 5, 6], max_tokens=100, temperature=0.0))
    assert len(out) == 10
    long_prompt = list(range(40))
    out = list(generate(model, long_prompt, max_tokens=5, temperature=0.0))
    assert len(out) == 1
    assert out == naive_greedy(model, long_prompt[-15:], 1)


def test_generate_stop_ids_and_restores_mode():
    model = make_model(4)
    model.train()
    full = list(generate(model, [1, 2, 3], max_tokens=8, temperature=0.0))
    assert model.training
    stop = full[3]
    first = full.index(stop)
    out = list(generate(model, [1, 2, 3], max_tokens=8, temperature=0.0, stop_ids=[stop]))
    assert out == full[:first]


def test_generate_deterministic_with_seed():
    model = make_model(2)
    a = list(generate(model, [5, 6], max_tokens=15, temperature=1.0, seed=123))
    b = list(generate(model, [5, 6], max_tokens=15, temperature=1.0, seed=123))
    c = list(generate(model, [5, 6], max_tokens=15, temperature=1.0, seed=124))
    assert a == b
    assert a != c  # with overwhelming probability for an untrained model
    assert torch.is_grad_enabled()  # generation does not leak inference mode to the caller


def test_sample_next_greedy():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 1.0]])
    assert sample_next(logits, temperature=0.0).tolist() == [1, 0]


def test_sample_next_top_k_support():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 0.0, 2.0]]).repeat(500, 1)
    s = sample_next(logits, temperature=5.0, top_k=3, generator=g)
    assert set(s.tolist()) == {1, 2, 3}  # the three largest logits, all reachable


def test_sample_next_top_p_support():
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.05, 0.5, 0.3, 0.1, 0.05])
    logits = probs.log().repeat(1000, 1)
    # sorted: 0.5, 0.3, 0.1, ... ; top_p=0.75 -> {0.5, 0.3} reach 0.8 >= 0.75
    s = sample_next(logits, temperature=1.0, top_p=0.75, generator=g)
    assert set(s.tolist()) == {1, 2}
    # the first two (0.8) already reach 0.79 -> the third is not needed
    s = sample_next(logits, temperature=1.0, top_p=0.79, generator=g)
    assert set(s.tolist()) == {1, 2}
    s = sample_next(logits, temperature=1.0, top_p=0.85, generator=g)
    assert set(s.tolist()) == {1, 2, 3}
    # tiny top_p keeps the most likely token only
    s = sample_next(logits, temperature=1.0, top_p=1e-6, generator=g)
    assert set(s.tolist()) == {1}
    # frequencies follow the renormalised distribution (0.5 / 0.8 = 0.625)
    s = sample_next(probs.log().repeat(20000, 1), temperature=1.0, top_p=0.75, generator=g)
    assert abs((s == 1).float().mean().item() - 0.625) < 0.02


def test_sample_next_draws_from_the_generator_over_the_filtered_distribution():
    """Not only "same seed, same sample" (any function of the seed passes that): the draw equals
    torch.multinomial over a reference distribution built here (temperature, top-k, top-p written
    out independently) with the same generator, and another seed gives other samples."""
    torch.manual_seed(0)
    logits = torch.randn(64, 50)
    temp, k, p = 0.8, 10, 0.9
    z = logits / temp
    kth = z.sort(dim=-1, descending=True).values[:, k - 1:k]
    z = z.masked_fill(z < kth, float("-inf"))
    probs = torch.softmax(z, dim=-1)
    ps, order = probs.sort(dim=-1, descending=True)
    keep_sorted = (ps.cumsum(-1) - ps) < p  # a token stays while the ones above it are short of p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    ref_probs = torch.where(keep, probs, 0.0)
    ref = torch.multinomial(ref_probs / ref_probs.sum(-1, keepdim=True), 1,
                            generator=torch.Generator().manual_seed(1)).squeeze(-1)
    a = sample_next(logits, temp, k, p, torch.Generator().manual_seed(1))
    assert torch.equal(a, ref)
    assert torch.equal(a, sample_next(logits, temp, k, p, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, sample_next(logits, temp, k, p, torch.Generator().manual_seed(2)))
