"""Ternary vs float, matched, and the recipes that close the gap (issue #25; docs/recipes.md).

Every run trains the same model on the same tokens (``--model``, ``--steps`` x ``--batch-size`` x
``--seq-len``, the default corpus, the same seeds) in its own process: the runs are
:func:`optim_convergence.run_one`'s (``nanochat-train bench``'s matched run, ``bench.runner.run_one``),
with this file's variants registered in its table.
Three stages, each cached per run in ``--out`` (a rerun with the same ``--out`` skips finished runs):

    sweep    ternary and float (quantization=none) at each --lr-mults multiple of the default
             learning rates (Muon lr and AdamW adam_lr scaled together), on the first seed
    best     each side at its best multiple on every seed: neither side is handicapped by the LR
    recipes  ternary at its best multiple with a recipe: the BitNet two-stage schedule, continual
             QAT (float first, then ternary, with or without a ramp), distillation from the best
             float run of the first seed (its final checkpoint as the teacher)

Reported: final val loss per seed, the mean, each row's gap to float at its best LR per seed, s/step
(what a recipe costs; distillation's teacher forward included) and the seed spread.

    python benchmarks/ternary_vs_float.py --out /tmp/tvf                      # make train's budget
    python benchmarks/ternary_vs_float.py --out /tmp/tvf --stages sweep       # one stage at a time
    python benchmarks/ternary_vs_float.py --steps 20 --seq-len 64 --seeds 1 --lr-mults 1 --out /tmp/s  # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kit  # noqa: E402  (benchmarks/kit.py: provenance, JSONL logs)
import optim_convergence as oc  # noqa: E402  (the matched runs: bench's runner, one process per run)

BASE_LR, BASE_ADAM_LR = 0.02, 0.003  # TrainConfig's lr and adam_lr
SIDES = {"ternary": [], "float": ["quantization=none"]}
# recipe -> its --set lines, on top of ternary at its best LR ({teacher}: the float checkpoint)
RECIPES: dict[str, list[str]] = {
    "bitnet": ["lr_schedule=bitnet"],
    "qat50": ["qat_start=0.5"],
    "qat50-ramp": ["qat_start=0.5", "qat_ramp_steps=30"],
    "qat75-ramp": ["qat_start=0.75", "qat_ramp_steps=30"],
    "distill": ["teacher={teacher}", "distill_weight=0.5", "distill_temperature=1.0"],
    "distill-qat50": ["teacher={teacher}", "distill_weight=0.5", "qat_start=0.5", "qat_ramp_steps=30"],
}


def lr_sets(mult: float) -> list[str]:
    return [f"lr={BASE_LR * mult:g}", f"adam_lr={BASE_ADAM_LR * mult:g}"]


def register(name: str, sets: list[str]) -> str:
    oc.VARIANTS[name] = [s.replace("{", "{{").replace("}", "}}") for s in sets]  # run_one formats them
    return name


def cached_run(name: str, seed: int, args: argparse.Namespace, out: Path) -> dict:
    """optim_convergence.run_one, remembered in ``out/results`` so a later stage or rerun reuses it."""
    path = out / "results" / f"{name}-seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    r = from_log(name, seed, args, out) or oc.run_one(name, seed, args, out)
    if "val_loss" in r:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    msg = r.get("error") or f"val_loss {r['val_loss']:.4f}  ({r['wall_s']:.0f} s)"
    print(f"  done: {name:<28} seed {seed}: {msg}", flush=True)
    return r


def from_log(name: str, seed: int, args: argparse.Namespace, out: Path) -> dict | None:
    """A run that finished but was not recorded (its benchmark process was stopped): run_one's result
    read back from its log, when the log ends with the final evaluation."""
    where = oc.run_dir(out, name, seed)
    recs = kit.read_jsonl(where / "metrics.jsonl")
    if not recs or recs[-1]["step"] != args.steps or recs[-1].get("val_loss") is None:
        return None
    if not (where / "result.json").is_file():  # the worker stopped before it finished (its final checkpoint)
        return None
    return oc.result_from_log(name, seed, recs, args.steps, recs[-1]["elapsed_s"])


def load_cached(jobs: list[tuple[str, int]], out: Path) -> dict[tuple[str, int], dict]:
    """The results earlier invocations recorded in ``out`` for these jobs."""
    paths = {(n, s): out / "results" / f"{n}-seed{s}.json" for n, s in jobs}
    return {job: json.loads(p.read_text()) for job, p in paths.items() if p.exists()}


def run_all(jobs: list[tuple[str, int]], args: argparse.Namespace, out: Path) -> dict[tuple[str, int], dict]:
    with ThreadPoolExecutor(args.parallel) as pool:
        rs = list(pool.map(lambda j: cached_run(j[0], j[1], args, out), jobs))
    return {(r["variant"], r["seed"]): r for r in rs if "val_loss" in r}


def teacher_dir(name: str, seed: int, out: Path) -> Path:
    """The checkpoint dir run_one made for (name, seed) (or, in an ``--out`` of an earlier version of
    this script, the newest ``ckpt-NAME-seedS-*``)."""
    dirs = [d for d in [oc.run_dir(out, name, seed) / "checkpoints"] if d.is_dir()]
    dirs = dirs or sorted(out.glob(f"ckpt-{name}-seed{seed}-*"))[-1:]
    if not dirs:
        raise SystemExit(f"no checkpoint of {name} seed {seed} in {out}: run the best stage first")
    return dirs[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-cpu")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parallel", type=int, default=2, help="runs at once (each with --threads threads)")
    ap.add_argument("--lr-mults", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="the float side's sweep")
    ap.add_argument("--ternary-lr-mults", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    ap.add_argument("--stages", default="sweep,best,recipes", help="sweep,best,recipes, or report (the table only)")
    ap.add_argument("--sides", default="ternary,float", help="the sides the sweep runs")
    ap.add_argument("--best", default="", help="skip the choice: e.g. ternary=2,float=1 (LR multiples)")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--out", required=True, help="runs, checkpoints and cached results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",")
    kit.header("ternary_vs_float", out=str(out), stages=args.stages)
    print(f"# {args.model}, {args.steps} steps x {args.batch_size}x{args.seq_len} tokens, seeds {args.seeds}, "
          f"default corpus; {args.parallel} runs at a time x {args.threads} thread(s)", flush=True)

    mults = {"ternary": args.ternary_lr_mults, "float": args.lr_mults}
    names = {(side, m): register(f"{side}-lr{m:g}", sets + lr_sets(m))
             for side, sets in SIDES.items() for m in mults[side]}
    sweep = [(names[(side, m)], args.seeds[0]) for (side, m) in names if side in args.sides.split(",")]
    by = run_all(sweep, args, out) if "sweep" in stages else load_cached(sweep, out)
    best: dict[str, float] = {}
    fixed = dict(kv.split("=") for kv in args.best.split(",") if kv)
    for side in SIDES:
        done = [(by[(names[(side, m)], args.seeds[0])]["val_loss"], m) for m in mults[side]
                if (names[(side, m)], args.seeds[0]) in by]
        best[side] = float(fixed[side]) if side in fixed else (min(done)[1] if done else 1.0)
        names.setdefault((side, best[side]), register(f"{side}-lr{best[side]:g}", SIDES[side] + lr_sets(best[side])))
        tried = ", ".join(f"x{m:g} {v:.4f}" for v, m in sorted(done, key=lambda t: t[1]))
        print(f"# sweep, seed {args.seeds[0]}, {side}: " + tried
              + f"; best x{best[side]:g}", flush=True)
    rows = [names[(side, best[side])] for side in SIDES]
    if "best" in stages:
        by.update(run_all([(n, s) for n in rows for s in args.seeds], args, out))
    if "recipes" in stages:
        for r in args.recipes.split(","):
            needs = any("{teacher}" in s for s in RECIPES[r])
            teacher = teacher_dir(names[("float", best["float"])], args.seeds[0], out) if needs else ""
            sets = [s.format(teacher=teacher) for s in RECIPES[r]]
            rows.append(register(f"{r}-lr{best['ternary']:g}", sets + lr_sets(best["ternary"])))
        by.update(run_all([(n, s) for n in rows[2:] for s in args.seeds], args, out))
    elif "report" in stages:  # only the table, from what earlier invocations recorded
        rows += [f"{r}-lr{best['ternary']:g}" for r in args.recipes.split(",")]
    shown = [*dict.fromkeys([*names.values(), *rows])]
    by = {**load_cached([(n, s) for n in shown for s in args.seeds], out), **by}  # earlier invocations' too
    report(shown, by, args, names[("float", best["float"])])


def report(rows: list[str], by: dict[tuple[str, int], dict], args: argparse.Namespace, ref: str) -> None:
    print(f"\n| run | {' | '.join(f'seed {s}' for s in args.seeds)} | mean | gap to float per seed | s/step |")
    print("|---|" + "---|" * (len(args.seeds) + 3))
    for v in rows:
        vals = [by[(v, s)]["val_loss"] if (v, s) in by else float("nan") for s in args.seeds]
        base = [by[(ref, s)]["val_loss"] if (ref, s) in by else float("nan") for s in args.seeds]
        sps = [by[(v, s)]["s_per_step"] for s in args.seeds if (v, s) in by]
        gaps = " ".join(f"{a / b - 1:+.2%}" for a, b in zip(vals, base))
        print(f"| {v} | " + " | ".join(f"{x:.4f}" for x in vals) + f" | {statistics.mean(vals):.4f} | {gaps} | "
              f"{statistics.mean(sps) if sps else float('nan'):.2f} |")
    base = [by[(ref, s)]["val_loss"] for s in args.seeds if (ref, s) in by]
    if len(base) > 1:
        print(f"seed-to-seed spread of float: {(max(base) - min(base)) / statistics.mean(base):.2%}")


if __name__ == "__main__":
    main()
