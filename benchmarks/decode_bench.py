"""Batch-1 CPU decode: tokens/s and memory-bandwidth utilisation, side by side in one run.

Sides, interleaved round by round (A, B, C, A, B, C, ...) on the same randomly initialised model:

* ``model``  the model's own forward with a KV cache, as ``generate`` runs it (fake-quant fp32:
             every token re-quantizes every weight);
* ``fp32``   model/decode.py's Decoder over cached fake-quantized fp32 weights (4 bytes/weight);
* ``int8``   the same Decoder with the exact int8 forward (1 byte/weight + group scales);
* llama.cpp  when the ``llama_cpp`` package is importable and ``--gguf`` files are given (TQ2_0 / F32
             exports of the same shape); otherwise the script says it was not measured.

Greedy decoding of ``--tokens`` tokens after a ``--prompt``-token prefill; the prefill is not timed.
Bandwidth utilisation = (weight bytes + KV bytes read per token) x tok/s / the machine's memcpy
bandwidth (read + write bytes of a 256 MiB ``copy_``, best of 5, measured in the same run).

    python benchmarks/decode_bench.py --threads 1                          # tiny-cpu and nano-125m
    python benchmarks/decode_bench.py --models nano-125m --tokens 32 --rounds 3 --json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import kit  # benchmarks/kit.py: provenance, interleaved timing
import torch

from nanochat_ternary.config import build_config
from nanochat_ternary.model.decode import Decoder
from nanochat_ternary.model.gpt import GPT, KVCache


def memcpy_bandwidth(mib: int = 256, reps: int = 5) -> float:
    """GB/s of a large ``copy_`` (bytes read + bytes written), best of ``reps``."""
    a = torch.ones(mib * 2**20 // 4)
    b = torch.empty_like(a)
    best = kit.interleaved({"copy": lambda: b.copy_(a)}, reps=reps, warmup=1)["copy"].best
    return 2 * a.nbytes / best / 1e9


def model_side(model: GPT, prompt: list[int], n: int) -> float:
    """Seconds for ``n`` greedy tokens through ``GPT.hidden_states`` with a KV cache (prefill untimed)."""
    with torch.inference_mode():
        cache = KVCache.for_model(model, 1, len(prompt) + n)
        logits = model.logits(model.hidden_states(torch.tensor([prompt]), cache)[:, -1])
        t0 = time.perf_counter()
        for _ in range(n):
            tok = logits.argmax(-1).view(1, 1)
            logits = model.logits(model.hidden_states(tok, cache)[:, -1])
        return time.perf_counter() - t0


def decoder_side(dec: Decoder, prompt: list[int], n: int) -> float:
    dec.reset()
    logits = dec.forward(prompt)
    t0 = time.perf_counter()
    for _ in range(n):
        logits = dec.forward([int(logits.argmax())])
    return time.perf_counter() - t0


def llama_cpp_side(path: str, prompt: list[int], n: int):
    """A timing function for a GGUF file through llama_cpp, or None with the reason."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None, "llama_cpp is not importable here (pip package llama-cpp-python): not measured"
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=len(prompt) + n + 8, n_threads=torch.get_num_threads(), verbose=False)

    def run() -> float:
        llm.reset()
        llm.eval(prompt)
        t0 = time.perf_counter()
        for _ in range(n):
            llm.eval([llm.sample(temp=0.0)])
        return time.perf_counter() - t0

    return run, ""


def bench(preset: str, tokens: int, prompt_len: int, rounds: int, gguf: list[str], bw: float) -> dict:
    cfg = build_config(preset)
    torch.manual_seed(0)
    model = GPT(cfg.model).eval()
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.model.vocab_size, (prompt_len,), generator=gen).tolist()
    max_len = prompt_len + tokens
    decs = {m: Decoder(model, mode=m, max_len=max_len) for m in ("fp32", "int8")}
    sides = {"model": lambda: model_side(model, prompt, tokens)}
    sides.update({m: (lambda d=d: decoder_side(d, prompt, tokens)) for m, d in decs.items()})
    notes = []
    for path in gguf:
        run, why = llama_cpp_side(path, prompt, tokens)
        if run is None:
            notes.append(why)
            break
        sides[f"llama.cpp {os.path.basename(path)}"] = run
    if not gguf:
        try:
            import llama_cpp  # noqa: F401
            notes.append("llama_cpp importable, but no --gguf files given: not measured")
        except ImportError:
            notes.append("llama_cpp is not importable here (pip package llama-cpp-python): not measured")
    # each side times its own decode (the prefill before it is left out): self-timed
    timings = kit.interleaved(sides, reps=rounds, warmup=1, self_timed=True)
    # bytes per token: weights as each side stores them, KV at the mean decode position
    n_block = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim == 2)
    kv_mean = 2 * cfg.model.n_layers * cfg.model.n_kv_heads * cfg.model.head_dim * (prompt_len + tokens / 2) * 4
    head = model.lm_head.weight.nbytes
    wbytes = {"model": 4 * n_block + head, "fp32": decs["fp32"].weight_bytes(), "int8": decs["int8"].weight_bytes()}
    out = {"preset": preset, "tokens": tokens, "prompt": prompt_len, "notes": notes, "sides": {}}
    for k, t in timings.items():
        tok_s = tokens / t.median
        b = wbytes.get(k)
        out["sides"][k] = {"tok_s": tok_s, "all_s": t.samples, "bytes_per_token": (b + kv_mean) if b else None,
                           "bw_util": ((b + kv_mean) * tok_s / (bw * 1e9)) if b else None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny-cpu,nano-125m")
    ap.add_argument("--tokens", type=int, default=32, help="decoded tokens per round")
    ap.add_argument("--prompt", type=int, default=16, help="prefill tokens (untimed)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gguf", action="append", default=[], help="a GGUF file for llama.cpp (repeatable)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bw = memcpy_bandwidth()
    head = kit.header("decode_bench", models=args.models, tokens=args.tokens, prompt=args.prompt,
                      rounds=args.rounds)
    print(f"# memcpy {bw:.1f} GB/s (read+write)")
    results = []
    for preset in args.models.split(","):
        r = bench(preset.strip(), args.tokens, args.prompt, args.rounds, args.gguf, bw)
        results.append(r)
        base = r["sides"]["model"]["tok_s"]
        print(f"\n{preset}: {args.tokens} greedy tokens after a {args.prompt}-token prompt, median of {args.rounds}")
        print(f"  {'side':<28} {'tok/s':>8} {'vs model':>9} {'vs fp32':>8} {'MB/token':>9} {'BW util':>8}")
        for k, s in r["sides"].items():
            mb = f"{s['bytes_per_token'] / 1e6:9.1f}" if s["bytes_per_token"] else f"{'-':>9}"
            util = f"{s['bw_util']:8.1%}" if s["bw_util"] else f"{'-':>8}"
            print(f"  {k:<28} {s['tok_s']:>8.1f} {s['tok_s'] / base:>9.2f} "
                  f"{s['tok_s'] / r['sides']['fp32']['tok_s']:>8.2f} {mb} {util}")
        for n in r["notes"]:
            print(f"  note: {n}")
    if args.json:
        print(json.dumps({"provenance": head["provenance"], "header": head, "memcpy_gb_s": bw, "results": results},
                         indent=2))


if __name__ == "__main__":
    main()
