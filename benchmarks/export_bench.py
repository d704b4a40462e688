"""Export figures for docs/export.md: sizes, llama.cpp agreement / KL / decode speed, HF perplexity.

    python benchmarks/export_bench.py --checkpoint RUN [--windows 16] [--ctx 128] [--threads 1]

For one checkpoint it writes every export into a temp dir and measures, on held-out text (the
validation split of the checkpoint's own dataset, ``--windows`` windows of ``--ctx`` tokens spread
evenly over it):

* file sizes of GGUF TQ2_0 / TQ1_0 / Q8_0 / F16 / F32, the HF dir and the packed file;
* packed: max |logit difference| vs the checkpoint (0 means bit-identical);
* HF ``LlamaForCausalLM`` (full-precision activations) vs ours (int8 activations): perplexity of
  each, top-1 agreement, mean KL(ours || HF);
* llama.cpp (if llama-cpp-python is installed), each GGUF type: top-1 agreement with our next
  token, mean KL(ours || llama.cpp), perplexity, and decode tokens/s on ``--threads`` threads
  (greedy, ``--decode-tokens`` tokens after a short prompt, prefill excluded), next to our own
  PyTorch fp32 decode with a KV cache on the same threads.

A TQ type the checkpoint cannot hold exactly (groups of 128) is reported as refused, not measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import kit  # benchmarks/kit.py: provenance
import numpy as np
import torch

from nanochat_ternary.checkpoint import open_checkpoint
from nanochat_ternary.data.datasets import default_cache_dir, load_dataset
from nanochat_ternary.export import ExportError, export_checkpoint
from nanochat_ternary.export.common import load_checkpoint
from nanochat_ternary.model.gpt import KVCache

QUANTS = ("tq2_0", "tq1_0", "q8_0", "f16", "f32")


def held_out_windows(ck, n: int, ctx: int) -> list[list[int]]:
    t = ck.config.training
    pd = load_dataset(t.dataset or None, t.data_path or None, cache_dir=default_cache_dir(),
                      vocab_size=t.tokenizer_vocab_size, n_samples=t.n_samples, seq_len=t.seq_len, seed=t.seed,
                      show_progress=False)
    val = np.asarray(pd.val)
    starts = np.linspace(0, len(val) - ctx - 1, n).astype(int)
    return [val[s:s + ctx].astype(np.int64).tolist() for s in starts]


def compare(ours: list[torch.Tensor], theirs: list[torch.Tensor], windows: list[list[int]]) -> dict:
    """Top-1 agreement, mean KL(ours || theirs) per position, and both perplexities.

    ``top1_agreement_clear``: the agreement over positions where our top-1 token beats the runner-up
    by more than 0.05 in log-probability (5%), i.e. leaving out near-ties, which any difference in
    activation rounding may flip; ``clear_fraction`` says how many positions that keeps.
    """
    agree = kl = nll_o = nll_t = n = clear = agree_clear = 0.0
    for lo, lt, ids in zip(ours, theirs, windows):
        lo, lt = torch.log_softmax(lo.float(), -1), torch.log_softmax(lt.float(), -1)
        same = lo.argmax(-1) == lt.argmax(-1)
        agree += same.float().sum().item()
        top2 = lo.topk(2, dim=-1).values
        is_clear = (top2[:, 0] - top2[:, 1]) > 0.05
        clear += is_clear.float().sum().item()
        agree_clear += (same & is_clear).float().sum().item()
        kl += (lo.exp() * (lo - lt)).sum(-1).sum().item()
        tgt = torch.tensor(ids[1:])
        nll_o += -lo[:-1].gather(-1, tgt[:, None]).sum().item()
        nll_t += -lt[:-1].gather(-1, tgt[:, None]).sum().item()
        n += len(ids)
    m = n - len(windows)
    return {"top1_agreement": agree / n, "top1_agreement_clear": agree_clear / max(clear, 1),
            "clear_fraction": clear / n, "mean_kl": kl / n, "ppl_ours": math.exp(nll_o / m),
            "ppl_theirs": math.exp(nll_t / m)}


def speed_only(ck, preset: str, threads: int, n_tokens: int, overrides: list[str]) -> dict:
    """Decode tok/s of a randomly initialised ``preset`` model (group_size 256, ``ck``'s tokenizer
    and vocab) in every GGUF type, next to our PyTorch decode: speed does not depend on training,
    and a bigger model than ``ck`` shows the matmul cost rather than per-token overheads."""
    from nanochat_ternary.checkpoint.files import save_checkpoint
    from nanochat_ternary.config import build_config
    from nanochat_ternary.model.gpt import GPT

    cfg = build_config(preset, overrides=["group_size=256", f"vocab_size={ck.config.model.vocab_size}", *overrides])
    torch.manual_seed(0)
    model = GPT(cfg.model).eval()
    out: dict = {"preset": preset, "overrides": overrides, "vocab_size": cfg.model.vocab_size, "gguf": {},
                 "block_params": sum(p.numel() for p in model.blocks.parameters() if p.ndim == 2)}
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        run = save_checkpoint(d / "run", 0, model, {}, {"config": cfg.to_dict()}, tokenizer_path=ck.tokenizer_path)
        del model
        # ours: the packed model (weights quantized once; a checkpoint's BitLinear re-quantizes its
        # shadow weights in every forward, which is training's cost, not inference's)
        export_checkpoint(run, "packed", d / "m.safetensors", log=lambda *_: None)
        packed = open_checkpoint(d / "m.safetensors").model
        out["ours_packed_decode_tok_s"] = our_decode_tok_s(packed, n_tokens)
        del packed
        print(f"{preset}: ours (packed, PyTorch fp32) decode {out['ours_packed_decode_tok_s']:.1f} tok/s", flush=True)
        for q in QUANTS:
            g = d / f"m-{q}.gguf"
            export_checkpoint(run, "gguf", g, quant=q, log=lambda *_: None)
            out["gguf"][q] = {"bytes": g.stat().st_size,
                              "decode_tok_s": llamacpp_decode_tok_s(g, n_tokens, threads)}
            g.unlink()
            print(f"{preset} gguf {q}: {json.dumps(out['gguf'][q])}", flush=True)
    return out


@torch.inference_mode()
def our_decode_tok_s(model, n_tokens: int) -> float:
    cache = KVCache.for_model(model, 1, n_tokens + 8)
    logits = model.logits(model.hidden_states(torch.zeros(1, 8, dtype=torch.long), kv_cache=cache)[:, -1])
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        tok = logits.argmax(-1, keepdim=True)
        logits = model.logits(model.hidden_states(tok, kv_cache=cache)[:, -1])
    return n_tokens / (time.perf_counter() - t0)


def llamacpp_loads() -> bool:
    from nanochat_ternary.checkpoint.llamacpp import binding
    from nanochat_ternary.errors import UserError

    try:
        binding()
    except UserError:
        return False
    return True


def llamacpp_decode_tok_s(path: Path, n_tokens: int, threads: int) -> float:
    from nanochat_ternary.checkpoint.llamacpp import open_gguf

    llm = open_gguf(path, n_ctx=n_tokens + 16, threads=threads)
    prompt = [llm.eos] * 8
    it = llm.generate(prompt, n_tokens + 1, temperature=0)
    next(it)  # prefill + first token: excluded
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        next(it)
    return n_tokens / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--speed-preset", help="only decode speed, of a random-init model of this preset "
                                           "(group_size 256, the checkpoint's tokenizer and vocab)")
    ap.add_argument("--speed-set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for --speed-preset (e.g. ffn_hidden=2048: TQ needs rows %% 256 == 0)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    head = kit.header("export_bench", checkpoint=args.checkpoint, windows=args.windows, ctx=args.ctx,
                      decode_tokens=args.decode_tokens, speed_preset=args.speed_preset or "-")
    quiet = lambda *_: None
    ck = load_checkpoint(args.checkpoint)
    if args.speed_preset:
        res = {**speed_only(ck, args.speed_preset, args.threads, args.decode_tokens, args.speed_set), "header": head}
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2))
        return 0
    windows = held_out_windows(ck, args.windows, args.ctx)
    with torch.inference_mode():
        ours = [ck.model(torch.tensor([w]))[0] for w in windows]
    res: dict = {"checkpoint": str(ck.path), "step": ck.step, "group_size": ck.config.model.group_size,
                 "windows": args.windows, "ctx": args.ctx, "threads": args.threads, "sizes": {}, "gguf": {},
                 "header": head}
    res["block_params"] = sum(p.numel() for p in ck.model.blocks.parameters() if p.ndim == 2)
    res["ours_decode_tok_s"] = our_decode_tok_s(ck.model, args.decode_tokens)
    print(f"ours (PyTorch fp32, KV cache, {args.threads} thread): decode {res['ours_decode_tok_s']:.0f} tok/s",
          flush=True)
    have_llama = llamacpp_loads()
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        p = d / "m.safetensors"
        export_checkpoint(ck.path, "packed", p, log=quiet)
        res["sizes"]["packed"] = p.stat().st_size
        pm = open_checkpoint(p)
        with torch.inference_mode():
            diff = max((pm.model(torch.tensor([w]))[0] - o).abs().max().item() for w, o in zip(windows, ours))
        res["packed_max_logit_diff"] = diff
        print(f"packed: {p.stat().st_size:,} B, max |logit diff| vs checkpoint {diff:g}", flush=True)
        export_checkpoint(ck.path, "hf", d / "hf", log=quiet)
        res["sizes"]["hf"] = sum(f.stat().st_size for f in (d / "hf").iterdir())
        if importlib.util.find_spec("transformers") is not None:
            from transformers import LlamaForCausalLM

            hf = LlamaForCausalLM.from_pretrained(d / "hf", dtype=torch.float32).eval()
            with torch.inference_mode():
                theirs = [hf(torch.tensor([w])).logits[0] for w in windows]
            res["hf"] = compare(ours, theirs, windows)
            print(f"hf: {json.dumps(res['hf'])}", flush=True)
        for q in QUANTS:
            g = d / f"m-{q}.gguf"
            try:
                export_checkpoint(ck.path, "gguf", g, quant=q, log=quiet)
            except ExportError as e:
                res["gguf"][q] = {"refused": str(e)}
                print(f"gguf {q}: refused: {e}", flush=True)
                continue
            res["sizes"][f"gguf_{q}"] = g.stat().st_size
            entry: dict = {"bytes": g.stat().st_size}
            if have_llama:
                from nanochat_ternary.checkpoint.llamacpp import open_gguf

                with open_gguf(g, n_ctx=args.ctx, threads=args.threads) as llm:
                    theirs = [torch.from_numpy(llm.logits(w)) for w in windows]
                entry.update(compare(ours, theirs, windows))
                entry["decode_tok_s"] = llamacpp_decode_tok_s(g, args.decode_tokens, args.threads)
            res["gguf"][q] = entry
            print(f"gguf {q}: {json.dumps(entry)}", flush=True)
    if not have_llama:
        print("no llama.cpp binding loads here (the llamacpp extra): no llama.cpp figures", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
