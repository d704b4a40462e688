"""Batch-1 CPU decode: tokens/s and memory-bandwidth utilisation, side by side in one run.

Sides, interleaved round by round (A, B, C, A, B, C, ...) on the same randomly initialised model:

* ``model``  the model's own forward with a KV cache, as ``generate`` runs it (fake-quant fp32:
             every token re-quantizes every weight);
* ``fp32``   model/decode.py's Decoder over cached fake-quantized fp32 weights (4 bytes/weight);
* ``int8``   the same Decoder with the exact int8 forward (1 byte/weight + group scales);
* llama.cpp  with ``--llamacpp f32,tq2_0``: the same model exported to those GGUF types and decoded
             on llama.cpp (checkpoint/llamacpp.py, the ``llamacpp`` extra), greedy, same prompt;
             without a llama.cpp binding the script says it was not measured. TQ2_0 holds the
             model exactly with 256-groups and rows of whole 256-blocks: ``--set group_size=256``
             (``--set ffn_hidden=2048`` for nano-125m); all sides use the overrides.

Greedy decoding of ``--tokens`` tokens after a ``--prompt``-token prefill; the prefill is not timed.
Bandwidth utilisation = (weight bytes + KV bytes read per token) x tok/s / the machine's memcpy
bandwidth (read + write bytes of a 256 MiB ``copy_``, best of 5, measured in the same run).

    python benchmarks/decode_bench.py --threads 1                          # tiny-cpu and nano-125m
    python benchmarks/decode_bench.py --models nano-125m --tokens 32 --rounds 3 --json
    python benchmarks/decode_bench.py --threads 1 --llamacpp f32,q8_0          # the #26 targets (exact Q8_0)
    python benchmarks/decode_bench.py --threads 1 --llamacpp f32,tq2_0 --set group_size=256 --set ffn_hidden=2048
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import kit  # benchmarks/kit.py: provenance, interleaved timing
import torch

from nanochat_ternary.config import build_config
from nanochat_ternary.export import ExportError
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


def export_gguf(model: GPT, cfg, quant: str, d: Path) -> Path:
    """The bench's own model as a GGUF (the same weights: ``quant`` must be exact for its groups).

    GGUF needs a tokenizer with merges: a tiny BPE one, padded by the exporter to the model's vocab
    (decoding by ids, the padding tokens are as good as any)."""
    from nanochat_ternary.checkpoint.files import save_checkpoint
    from nanochat_ternary.data.tokenizer import train_tokenizer
    from nanochat_ternary.export import export_checkpoint

    tok = d / "tokenizer.json"
    if not tok.exists():
        train_tokenizer(["def f(x):\n    return x + 1\n" * 50], vocab_size=300).save(tok)
    run = d / f"run-{cfg.model.dim}"
    if not run.exists():
        save_checkpoint(run, 1, model, {}, {"config": cfg.to_dict()}, tokenizer_path=tok)
    out = d / f"m-{cfg.model.dim}-{quant}.gguf"
    export_checkpoint(run, "gguf", out, quant=quant, log=lambda *_: None)
    return out


def llama_cpp_side(path: Path, prompt: list[int], n: int, threads: int):
    """A timing function for a GGUF on llama.cpp (checkpoint/llamacpp.py: greedy, llama.cpp's own
    sampler), or None with the reason. The prefill and the first sample are not timed."""
    from nanochat_ternary.checkpoint.llamacpp import open_gguf
    from nanochat_ternary.errors import UserError

    try:
        llm = open_gguf(path, n_ctx=len(prompt) + n + 8, threads=threads)
    except UserError as e:
        return None, f"llama.cpp not measured: {e}"

    def run() -> float:
        gen = llm.generate(prompt, n + 1, temperature=0)
        next(gen)  # prefill + the first token
        t0 = time.perf_counter()
        for _ in gen:  # n decode steps
            pass
        return time.perf_counter() - t0

    return run, f"llama.cpp: {llm.backend}, {threads} thread(s)"


def llamacpp_sides(model: GPT, cfg, quants: list[str], prompt: list[int], tokens: int, d: Path):
    """``(sides, weight bytes read per token, notes)`` for the model exported to each GGUF type."""
    sides, wbytes, notes = {}, {}, []
    m = cfg.model
    for quant in quants:
        try:
            path = export_gguf(model, cfg, quant, d)
        except ExportError as e:  # an inexact type for this grouping: say so, measure the rest
            notes.append(f"llama.cpp {quant} not measured: {str(e).splitlines()[0]}")
            continue
        run, why = llama_cpp_side(path, prompt, tokens, torch.get_num_threads())
        if run is None:
            return sides, wbytes, [*notes, why]
        if why not in notes:
            notes.append(why)
        sides[f"llama.cpp {quant.upper()}"] = run
        # the whole file is read per token, but for the f16 embedding table of an untied head (one row)
        wbytes[f"llama.cpp {quant.upper()}"] = path.stat().st_size - (0 if m.weight_tied else 2 * m.vocab_size * m.dim)
    return sides, wbytes, notes


def bench(preset: str, tokens: int, prompt_len: int, rounds: int, llamacpp: list[str], bw: float,
          overrides: list[str]) -> dict:
    cfg = build_config(preset, overrides=overrides)
    torch.manual_seed(0)
    model = GPT(cfg.model).eval()
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.model.vocab_size, (prompt_len,), generator=gen).tolist()
    max_len = prompt_len + tokens
    decs = {m: Decoder(model, mode=m, max_len=max_len) for m in ("fp32", "int8")}
    sides = {"model": lambda: model_side(model, prompt, tokens)}
    sides.update({m: (lambda d=d: decoder_side(d, prompt, tokens)) for m, d in decs.items()})
    tmp = tempfile.TemporaryDirectory()  # the GGUFs live (mmapped by llama.cpp) until the timing is done
    llama_sides, gguf_bytes, notes = llamacpp_sides(model, cfg, llamacpp, prompt, tokens, Path(tmp.name))
    sides.update(llama_sides)
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
    tmp.cleanup()
    for k, b in gguf_bytes.items():  # llama.cpp's KV cache is f16
        s = out["sides"][k]
        s["bytes_per_token"] = b + kv_mean / 2
        s["bw_util"] = s["bytes_per_token"] * s["tok_s"] / (bw * 1e9)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny-cpu,nano-125m")
    ap.add_argument("--tokens", type=int, default=32, help="decoded tokens per round")
    ap.add_argument("--prompt", type=int, default=16, help="prefill tokens (untimed)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--llamacpp", default="", help="comma-separated GGUF types (f32,tq2_0,q8_0): the same model "
                    "exported and decoded on llama.cpp beside ours (needs the llamacpp extra)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for "
                    "every preset, e.g. group_size=256 ffn_hidden=2048 (TQ2_0 holds a model exactly only then)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bw = memcpy_bandwidth()
    head = kit.header("decode_bench", models=args.models, tokens=args.tokens, prompt=args.prompt,
                      rounds=args.rounds)
    print(f"# memcpy {bw:.1f} GB/s (read+write)")
    results = []
    for preset in args.models.split(","):
        quants = [q.strip().lower() for q in args.llamacpp.split(",") if q.strip()]
        r = bench(preset.strip(), args.tokens, args.prompt, args.rounds, quants, bw, args.set)
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
