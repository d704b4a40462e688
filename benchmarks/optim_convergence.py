"""Matched convergence runs: same model, data, seed and steps; only the named config options differ
(Muon variants, low-memory options, activation formats, AdamW state).

Each (variant, seed) trains ``d20`` (its vocab becomes the default corpus tokenizer's) on the
default corpus (the Python stdlib) in its own process, as ``nanochat-train bench`` runs a
configuration (``nanochat_ternary.bench.runner.run_one``: the same Trainer as ``train``; the
variant's keys are ``--set`` overrides after the shared settings), and the final validation loss
is read from its JSONL log (``OUT/runs/VARIANT-seedS/metrics.jsonl``). Reported: final val loss
per seed, the mean, and each variant's gap to fp32 Muon per seed, so the seed-to-seed spread is
visible next to the gaps.

Targets (issue #3): 8-bit within 1% of fp32 Muon, GaLore within 3%, both within 3.5%.
Low-memory options (issue #10, docs/low_memory.md), each against its own reference: bf16 latents +
stochastic rounding within 1% of fp32 latents; the in-backward step with 2 micro-batches equal to
the normal step with the same accumulation (fp32 momentum: float tolerance; 8-bit: within 1%). The
accumulation variants train batch 4 x 2 micro-batches (the same tokens per step as batch 8),
without Nesterov and without clipping, so that the in-backward step and the normal one run the
same algorithm; "ib-clip" is the in-backward step with the default (previous-step) clipping.

    python benchmarks/optim_convergence.py --variants muon,bf16-sr,accum2,ib-accum2  # issue #10's

    python benchmarks/optim_convergence.py                      # 300 steps, seeds 1 2, 2 runs at a time
    python benchmarks/optim_convergence.py --steps 600 --seeds 1 2 3 --parallel 1 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import kit  # benchmarks/kit.py: provenance, JSONL logs

from nanochat_ternary.bench import runner

VARIANTS: dict[str, list[str]] = {
    "muon (fp32)": [],
    "muon-8bit": ["use_8bit_optim=true"],
    "galore-muon": ["use_galore=true"],
    "galore-muon-8bit": ["use_galore=true", "use_8bit_optim=true"],
}
_ACC = ["batch_size=4", "grad_accum_steps=2", "muon_nesterov=false", "grad_clip=0"]
VARIANTS.update({
    "bf16-sr": ["latent_dtype=bfloat16"],
    "bf16-nearest": ["latent_dtype=bfloat16", "latent_rounding=nearest"],
    "accum2": _ACC,
    "ib-accum2": _ACC + ["optimizer_in_backward=true"],
    "accum2-8bit": _ACC + ["use_8bit_optim=true"],
    "ib-accum2-8bit": _ACC + ["use_8bit_optim=true", "optimizer_in_backward=true"],
    # the same pair with stochastic rounding of the int8 momentum: the in-backward step requantises it
    # at every micro-batch, and round-to-nearest drops increments below half a quantisation step
    "accum2-8bit-sr": _ACC + ["use_8bit_optim=true", "stochastic_rounding=true"],
    "ib-accum2-8bit-sr": _ACC + ["use_8bit_optim=true", "stochastic_rounding=true", "optimizer_in_backward=true"],
    "ib-clip": ["optimizer_in_backward=true"],
    # BitLinear's activation formats (docs/roadmap.md), each against int8 = "muon (fp32)"; "a4.8-switch"
    # is a4.8's two-stage recipe: int8 for the first 95% of the steps ({switch} = 0.95 * steps)
    "act-int4": ["act_quant=int4"],
    "act-fp4": ["act_quant=fp4"],
    "act-a4.8": ["act_quant=a4.8"],
    "act-a4.8-switch": ["act_quant=a4.8", "act_quant_switch_step={switch}"],
    # AdamW's state (embedding, head, norms), against fp32 AdamW = "muon (fp32)"; no target yet
    "adamw-8bit": ["adamw_state=8bit"],
    "adamw-foam": ["adamw_state=foam"],
})
TARGETS = {"muon-8bit": 0.01, "galore-muon": 0.03, "galore-muon-8bit": 0.035, "bf16-sr": 0.01,
           "ib-accum2": 1e-3, "ib-accum2-8bit": 0.01, "ib-accum2-8bit-sr": 0.01}
# what each variant is compared with (default: fp32 Muon)
REFERENCE = {"ib-accum2": "accum2", "ib-accum2-8bit": "accum2-8bit", "ib-accum2-8bit-sr": "accum2-8bit-sr"}


def settings(args: argparse.Namespace) -> runner.BenchSettings:
    """What every run shares: the model, steps, batch shape, threads; one evaluation, at the end; a
    log record every 10 steps; the final checkpoint kept (a later stage may read it)."""
    return runner.BenchSettings(model=args.model, steps=args.steps, seeds=len(args.seeds), batch_size=args.batch_size,
                                seq_len=args.seq_len, eval_points=1, threads=args.threads, keep_checkpoints=True,
                                overrides=["log_interval=10"])


def run_dir(out: Path, variant: str, seed: int) -> Path:
    """Where (variant, seed) runs: its log ``metrics.jsonl``, its ``checkpoints/``, its output."""
    return out / "runs" / f"{variant.split()[0]}-seed{seed}"


def result_from_log(variant: str, seed: int, recs: list[dict], steps: int, wall: float) -> dict:
    """A run's row, from its JSONL records (the last evaluation is the final one)."""
    val = [r for r in recs if r.get("val_loss") is not None]
    return {"variant": variant, "seed": seed, "val_loss": val[-1]["val_loss"], "val_bpb": val[-1].get("val_bpb"),
            "train_loss": recs[-1]["loss"], "wall_s": wall, "s_per_step": recs[-1]["elapsed_s"] / steps,
            "curve": [(r["step"], r["loss"]) for r in recs]}


def run_one(variant: str, seed: int, args: argparse.Namespace, out: Path) -> dict:
    """One matched run of ``variant`` (its keys after the shared settings) with ``seed``."""
    sets = [s.format(switch=round(0.95 * args.steps)) for s in VARIANTS[variant]]
    where = run_dir(out, variant, seed)
    t0 = time.perf_counter()
    r = runner.run_one(runner.Entry(variant, "config", "", overrides=sets), seed, settings(args), where,
                       f"{variant} seed {seed}", progress=False)
    wall = time.perf_counter() - t0
    recs = kit.read_jsonl(where / "metrics.jsonl")
    if r.get("status") != "ok" or not any(x.get("val_loss") is not None for x in recs):
        return {"variant": variant, "seed": seed, "error": [str(r.get("error"))]}
    return result_from_log(variant, seed, recs, args.steps, wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="d20")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parallel", type=int, default=2, help="runs at once (each with --threads threads)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default="")
    ap.add_argument("--json", default="", help="write all results to this file")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="optim-conv-"))
    out.mkdir(parents=True, exist_ok=True)
    variants = [v for v in VARIANTS if v.split()[0] in args.variants.split(",") or v in args.variants.split(",")]
    jobs = [(v, s) for v in variants for s in args.seeds]  # a variant's seeds together: pairs finish early
    prov = kit.header("optim_convergence", out=str(out))["provenance"]
    print(f"# {args.model}, {args.steps} steps x {args.batch_size}x{args.seq_len} tokens, seeds {args.seeds}, "
          f"default corpus; {len(jobs)} runs, {args.parallel} at a time x {args.threads} thread(s)", flush=True)
    results: list[dict] = []
    with ThreadPoolExecutor(args.parallel) as pool:
        for r in pool.map(lambda job: run_one(job[0], job[1], args, out), jobs):
            results.append(r)
            msg = r.get("error") or f"val_loss {r['val_loss']:.4f}  ({r['wall_s']:.0f} s)"
            print(f"  done: {r['variant']:<18} seed {r['seed']}: {msg}", flush=True)

    by = {(r["variant"], r["seed"]): r for r in results if "val_loss" in r}
    print(f"\n{'variant':<18} " + " ".join(f"{'seed ' + str(s):>12}" for s in args.seeds)
          + f" {'mean':>8} {'s/step':>7} {'reference':>12} {'gap per seed':>18}  target")
    for v in variants:
        ref = REFERENCE.get(v, "muon (fp32)")
        vals = [by[(v, s)]["val_loss"] if (v, s) in by else float("nan") for s in args.seeds]
        base = [by[(ref, s)]["val_loss"] if (ref, s) in by else float("nan") for s in args.seeds]
        gaps = [(a / b - 1) for a, b in zip(vals, base)]
        sps = [by[(v, s)]["s_per_step"] for s in args.seeds if (v, s) in by]
        tgt = TARGETS.get(v)
        verdict = "" if tgt is None else (f"|gap| <= {tgt:.1%} " + ("PASS" if max(map(abs, gaps)) <= tgt else "MISS"))
        print(f"{v:<18} " + " ".join(f"{x:>12.4f}" for x in vals) + f" {statistics.mean(vals):>8.4f} "
              + f"{statistics.mean(sps) if sps else float('nan'):>7.2f} {ref.split()[0]:>12} "
              + f"{' '.join(f'{g:+.3%}' for g in gaps):>18}  {verdict}")
    base_vals = [by[("muon (fp32)", s)]["val_loss"] for s in args.seeds if ("muon (fp32)", s) in by]
    if len(base_vals) > 1:
        spread = (max(base_vals) - min(base_vals)) / statistics.mean(base_vals)
        print(f"seed-to-seed spread of fp32 Muon: {spread:.2%} (gaps smaller than this are noise)")
    if args.json:
        Path(args.json).write_text(json.dumps({"provenance": prov, "results": results}, indent=2))


if __name__ == "__main__":
    main()
