"""Aggregate benchmark runs over seeds, read them honestly, write results.json, REPORT.md and plots.

Noise is read from the data, not assumed: for each metric and configuration the seed-to-seed
*spread* is ``max - min`` over its seeds. A difference between a configuration and the baseline is
called real only when it is larger than the bigger of the two spreads; with one seed there is no
spread and no difference is called real. Optimizer state bytes are exact (the same every seed),
so their differences are always real. This is a deliberately conservative rule for 2–3 seeds: it
says "within noise" more often than a t-test would, never less.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------
# results.json: the documented fields (docs/bench-suite.md lists them; validate_results checks them)

NUM = (int, float)
OPT_NUM = (int, float, type(None))

RUN_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "seed": ((int,), "the run's seed (init and batch order)"),
    "steps": ((int,), "optimizer steps trained"),
    "tokens_per_step": ((int,), "tokens per optimizer step (batch x seq x accum x world)"),
    "params": ((int,), "model parameters (tied counted once)"),
    "final_train_loss": (NUM, "mean train CE over the last 10% of steps"),
    "val_loss": (NUM, "validation CE at the last step"),
    "val_bpb": (OPT_NUM, "validation bits per byte (null without a tokenizer, e.g. synthetic data)"),
    "tokens_per_s": (NUM, "tokens / training-step time, step 1 (warm-up) excluded; eval not counted"),
    "median_step_s": (NUM, "median seconds per optimizer step, step 1 excluded"),
    "optimizer_state_bytes": ((int,), "bytes of every tensor in the optimizers' state at the end"),
    "peak_memory_bytes": ((int,), "peak RSS of the run's process (CPU) or max CUDA memory allocated"),
    "peak_memory_kind": ((str,), "'rss' or 'cuda_max_allocated'"),
    "data_wait_share": (NUM, "share of step time spent waiting for the next batch"),
    "gpu_util": (OPT_NUM, "mean NVML GPU utilization in percent after step 1 (null off CUDA or without "
                          "nvidia-ml-py; absent in results from before it was measured)"),
    "kept_frac": (OPT_NUM, "Collider: mean fraction of tokens backpropagated (null when off)"),
    "wall_s": (NUM, "seconds the run took, start-up and evaluation included"),
    "train_curve": ((list,), "[[step, tokens, train loss], ...] every step"),
    "val_curve": ((list,), "[[step, tokens, val loss], ...] at each evaluation"),
    # what the run observed its features doing (so a feature that silently stayed off shows)
    "activation_bytes": ((int,), "bytes one micro-batch's forward saves for backward, parameters excluded "
                                 "(measured after training; gradient checkpointing cuts it)"),
    "loader_processes": ((int,), "most data-loader worker processes seen alive during training (0: sync)"),
    "int8_momenta": ((int,), "Muon momenta stored as int8 blocks at the end (8-bit Muon)"),
    "galore_projected": ((int,), "Muon matrices with a GaLore projector at the end"),
    "mtp_heads": ((int,), "multi-token-prediction heads in the model (0: MTP off)"),
    "tasks": ((dict,), "task scores of the final model, {task_<name>_<metric>: value} (bench --tasks; {}: none; "
                       "absent before it existed)"),
    "task_eval_s": (NUM, "seconds the final task scoring took (after training, not in tokens/s)"),
}

OPTIONAL_RUN_FIELDS = frozenset({"gpu_util", "float_twin", "tasks", "task_eval_s"})  # may be absent (older results)

OBSERVED_FIELDS = ("activation_bytes", "loader_processes", "int8_momenta", "galore_projected", "mtp_heads")

SUMMARY_METRICS = ("final_train_loss", "val_loss", "val_bpb", "tokens_per_s", "median_step_s",
                   "optimizer_state_bytes", "peak_memory_bytes", "data_wait_share", "gpu_util", "kept_frac",
                   "wall_s")

CONFIG_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "name": ((str,), "configuration name (the TOML's stem, or peer:NAME)"),
    "kind": ((str,), "'config', 'twin' (the baseline with quantization=none) or 'peer'"),
    "source": ((str,), "the TOML file, or the peer optimizer's description"),
    "status": ((str,), "'ok' (every seed ran), 'partial', 'failed' or 'unavailable'"),
    "error": (((str, type(None))), "why it failed or is unavailable (first failing seed)"),
    "runs": ((list,), "one object per seed: the run fields below (or status/error if it failed)"),
    "summary": ((dict,), "per metric: {mean, std, min, max, spread, n} over the seeds that ran"),
}

PROVENANCE_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "version": ((str,), "the nanochat-ternary package version"),
    "commit": ((str, type(None)), "git commit of the code that ran (null: not run from a git checkout)"),
    "dirty": ((bool, type(None)), "true: the code (files under src/ or benchmarks/, or pyproject.toml) "
                                  "differed from that commit; null: unknown"),
}

TOP_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "schema_version": ((int,), "2 (1: before provenance and the per-run feature observations)"),
    "provenance": ((dict,), "the code that produced it: version, commit, dirty (fields below)"),
    "date": ((str,), "UTC time the suite started (ISO 8601)"),
    "command": ((str,), "the command line that produced it"),
    "machine": ((dict,), "platform, cpu, cores, memory_bytes, torch, cuda device"),
    "settings": ((dict,), "model, steps, seeds, dataset, data_path, batch shape, tokens_per_step, overrides"),
    "data": ((dict,), "the data every run used: name, train_tokens, val_tokens"),
    "baseline": (((str, type(None))), "the configuration differences are measured against"),
    "float_twin": (((str, type(None))), "the baseline's full-precision twin (null: --no-float-twin, or the "
                                        "baseline is not quantized; absent before it existed)"),
    "configs": ((list,), "one object per configuration"),
    "wall_s": (NUM, "seconds the whole suite took"),
}


def validate_results(obj: dict[str, Any]) -> list[str]:
    """Problems with a results.json object against the documented fields ([] if none)."""
    errs: list[str] = []

    def check(d: dict, spec: dict, where: str) -> None:
        for key, (types, _doc) in spec.items():
            if key not in d:
                if key in OPTIONAL_RUN_FIELDS:
                    continue
                errs.append(f"{where}: missing '{key}'")
            elif not isinstance(d[key], types) or (isinstance(d[key], bool) and bool not in types):
                errs.append(f"{where}: '{key}' has type {type(d[key]).__name__}")
            elif isinstance(d[key], float) and not math.isfinite(d[key]):
                errs.append(f"{where}: '{key}' is not finite ({d[key]})")

    check(obj, TOP_FIELDS, "results")
    # schema 1 (before the per-run feature observations) is still read, e.g. docs/bench's older reports
    run_fields = RUN_FIELDS if obj.get("schema_version", 2) >= 2 else \
        {k: v for k, v in RUN_FIELDS.items() if k not in OBSERVED_FIELDS}
    if isinstance(obj.get("provenance"), dict):
        check(obj["provenance"], PROVENANCE_FIELDS, "results.provenance")
    for i, c in enumerate(obj.get("configs", [])):
        where = f"configs[{i}]"
        check(c, CONFIG_FIELDS, where)
        for j, r in enumerate(c.get("runs", [])):
            if r.get("status") == "ok":
                check(r, run_fields, f"{where}.runs[{j}]")
        for m, s in c.get("summary", {}).items():
            check(s, {k: (NUM, "") for k in ("mean", "std", "min", "max", "spread")} | {"n": ((int,), "")},
                  f"{where}.summary.{m}")
    return errs


# ---------------------------------------------------------------------------------------------
# aggregation


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, sample std (0 for one seed), min, max, spread (max - min) and n per metric, over the
    runs that succeeded and have the metric."""
    out: dict[str, dict[str, float]] = {}
    ok = [r for r in runs if r.get("status") == "ok"]
    flat = [{**r, **(r.get("tasks") or {})} for r in ok]  # task scores summarized like any metric
    task_keys = sorted({k for r in ok for k in (r.get("tasks") or {})})
    for m in (*SUMMARY_METRICS, *task_keys):
        vals = [float(r[m]) for r in flat if r.get(m) is not None]
        if not vals:
            continue
        out[m] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                  "min": min(vals), "max": max(vals), "spread": max(vals) - min(vals), "n": len(vals)}
    return out


def config_status(runs: list[dict[str, Any]]) -> tuple[str, str | None]:
    ok = [r for r in runs if r.get("status") == "ok"]
    bad = [r for r in runs if r.get("status") != "ok"]
    if not bad:
        return "ok", None
    status = "partial" if ok else bad[0].get("status", "failed")
    return status, bad[0].get("error")


def mean_val_curve(runs: list[dict[str, Any]]) -> list[tuple[int, float, float, float]]:
    """(tokens, mean, min, max) of the val loss at each evaluation step all ok runs share."""
    curves = [{int(s): (tok, v) for s, tok, v in r["val_curve"]} for r in runs if r.get("status") == "ok"]
    if not curves:
        return []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    out = []
    for s in steps:
        vals = [c[s][1] for c in curves]
        out.append((curves[0][s][0], statistics.fmean(vals), min(vals), max(vals)))
    return out


def tokens_to_reach(curve: list[tuple[int, float, float, float]], target: float) -> int | None:
    """Tokens at the first evaluation whose mean val loss is <= ``target`` (None: never)."""
    for tokens, mean, _lo, _hi in curve:
        if mean <= target:
            return tokens
    return None


# ---------------------------------------------------------------------------------------------
# the honest reading


def compare(base: dict[str, Any], other: dict[str, Any], metric: str) -> dict[str, Any] | None:
    """``other`` vs ``base`` on one metric: difference of means, ratio, the noise it is judged
    against (the larger seed-to-seed spread of the two), and whether it exceeds it."""
    b, o = base["summary"].get(metric), other["summary"].get(metric)
    if b is None or o is None:
        return None
    diff = o["mean"] - b["mean"]
    exact = metric == "optimizer_state_bytes"  # deterministic: no noise
    noise = 0.0 if exact else max(b["spread"], o["spread"])
    seeds = min(b["n"], o["n"])
    beyond = abs(diff) > noise if (exact or seeds >= 2) else None  # None: one seed, unknown
    return {"diff": diff, "ratio": o["mean"] / b["mean"] if b["mean"] else None, "noise": noise,
            "beyond_noise": beyond, "seeds": seeds}


READING_METRICS = (("val_loss", "val loss", "lower is better"),
                   ("tokens_per_s", "tokens/s", "higher is better"),
                   ("peak_memory_bytes", "peak memory", "lower is better"),
                   ("optimizer_state_bytes", "optimizer state", "lower is better"))


def reading(results: dict[str, Any]) -> list[str]:
    """Plain sentences: per configuration, which differences from the baseline exceed the
    seed-to-seed spread and which do not."""
    configs = {c["name"]: c for c in results["configs"]}
    base = configs.get(results.get("baseline") or "")
    lines: list[str] = []
    failed = [c["name"] for c in results["configs"] if c["status"] in ("failed", "partial")]
    unavailable = [c["name"] for c in results["configs"] if c["status"] == "unavailable"]
    if failed:
        lines.append(f"Failed (see the table and each run's train.log): {', '.join(failed)}.")
    if unavailable:
        lines.append(f"Not run (package missing): {', '.join(unavailable)}.")
    if base is None or base["status"] != "ok":
        lines.append("No baseline result, so no configuration is compared.")
        return lines
    n_seeds = base["summary"]["val_loss"]["n"]
    if n_seeds < 2:
        lines.append("One seed only: the seed-to-seed spread is unknown, so no difference in loss, speed or "
                     "peak memory below is called real (run with --seeds 2 or more). Optimizer state is exact.")
    else:
        lines.append(f"{n_seeds} seeds. A difference is called real only when it is larger than the seed-to-seed "
                     f"spread (max - min over seeds) of both configurations; baseline val-loss spread "
                     f"{base['summary']['val_loss']['spread']:.4f}, tokens/s spread "
                     f"{base['summary']['tokens_per_s']['spread']:.0f}.")
    base_final = base["summary"]["val_loss"]["mean"]
    shape = {(r["tokens_per_step"], r["steps"]) for r in base["runs"] if r.get("status") == "ok"}
    unmatched = [f"{c['name']} ({r['steps']} steps x {r['tokens_per_step']:,} tokens)"
                 for c in results["configs"] for r in c["runs"]
                 if r.get("status") == "ok" and (r["tokens_per_step"], r["steps"]) not in shape]
    if unmatched:  # a config's TOML changed the batch shape or length: say so before any comparison
        lines.append(f"NOT MATCHED: {', '.join(sorted(set(unmatched)))} differ from the baseline's "
                     f"{', '.join(f'{s} steps x {t:,} tokens' for t, s in sorted(shape))}; compare those with care.")
    for c in results["configs"]:
        if c is base or c["kind"] == "twin" or c["status"] not in ("ok", "partial") or "val_loss" not in c["summary"]:
            continue
        real, noise, unjudged = [], [], []
        for metric, label, _better in READING_METRICS:
            cmp = compare(base, c, metric)
            if cmp is None:
                continue
            if metric == "val_loss":
                txt = f"{label} {cmp['diff']:+.4f} ({100 * cmp['diff'] / base_final:+.1f}%)"
            elif cmp["ratio"] is not None:
                txt = f"{label} {cmp['ratio']:.2f}x"
            else:
                continue
            {True: real, False: noise, None: unjudged}[cmp["beyond_noise"]].append(txt)
        reach = tokens_to_reach(mean_val_curve(c["runs"]), base_final)
        reach_txt = (f"reaches the baseline's final val loss after {reach:,} tokens" if reach is not None
                     else "does not reach the baseline's final val loss")
        parts = [f"**{c['name']}** vs {base['name']}:"]
        parts.append(f"beyond the spread: {', '.join(real)};" if real else "nothing beyond the spread;")
        parts.append(f"within the spread: {', '.join(noise)};" if noise else "")
        parts.append(f"not judged (one seed): {', '.join(unjudged)};" if unjudged else "")
        parts.append(f"{reach_txt}.")
        lines.append(" ".join(p for p in parts if p))
    return lines


COST_METRICS = (("val_loss", "val loss", ".4f"), ("val_bpb", "val bits per byte", ".3f"),
                ("final_train_loss", "final train loss", ".4f"))


def ternary_cost(results: dict[str, Any]) -> list[str]:
    """Markdown rows: the baseline (ternary) against its full-precision twin, same everything else:
    each metric's means, the gap (absolute and relative to the twin) and whether it exceeds the
    seed-to-seed spread. [] when there is no twin result."""
    configs = {c["name"]: c for c in results["configs"]}
    base, twin = configs.get(results.get("baseline") or ""), configs.get(results.get("float_twin") or "")
    if base is None or twin is None or "val_loss" not in base["summary"] or "val_loss" not in twin["summary"]:
        return []
    judged = {True: "beyond the spread", False: "within the spread", None: "one seed: not judged"}
    rows = [f"| metric | {base['name']} (ternary) | {twin['name']} (full precision) | ternary − float | judged |",
            "|---|---:|---:|---:|---|"]
    tasks = [(k, k.removeprefix("task_").replace("_", " "), ".3f") for k in base["summary"] if k.startswith("task_")]
    for metric, label, fmt in (*COST_METRICS, *tasks):
        cmp = compare(twin, base, metric)  # base vs twin: the diff is what ternary costs
        if cmp is None:
            continue
        rel = f" ({100 * cmp['diff'] / twin['summary'][metric]['mean']:+.1f}%)" \
            if twin["summary"][metric]["mean"] and not metric.startswith("task_") else ""
        verdict = judged[cmp["beyond_noise"]]
        items = (results.get("settings") or {}).get("task_items")
        if metric.startswith("task_") and metric.endswith(("_acc", "_acc_norm")) and items:
            # a score over n items varies by its binomial error whatever the seeds: a gap within two
            # standard errors of a difference of two such scores is not called real
            p = twin["summary"][metric]["mean"]
            err = 2 * math.sqrt(2 * p * (1 - p) / (items * cmp["seeds"]))
            if cmp["beyond_noise"] and abs(cmp["diff"]) <= err:
                verdict = f"within sampling error (±{err:.3f})"
        rows.append(f"| {label} | {_fmt(base['summary'][metric], fmt)} | {_fmt(twin['summary'][metric], fmt)} | "
                    f"{format(cmp['diff'], '+' + fmt)}{rel} | {verdict} |")
    speed = compare(twin, base, "tokens_per_s")
    if speed is not None and speed["ratio"] is not None:
        rows.append(f"| tokens/s | {_fmt(base['summary']['tokens_per_s'], ',.0f')} | "
                    f"{_fmt(twin['summary']['tokens_per_s'], ',.0f')} | {speed['ratio']:.2f}x | "
                    f"{judged[speed['beyond_noise']]} |")
    return rows


# ---------------------------------------------------------------------------------------------
# writing


def _fmt(s: dict[str, float] | None, fmt: str, scale: float = 1.0) -> str:
    if s is None:
        return "–"
    txt = format(s["mean"] / scale, fmt)
    if s["n"] > 1:
        txt += " ± " + format(s["std"] / scale, fmt)
    return txt


def summary_table(results: dict[str, Any]) -> list[str]:
    mib = 2**20
    rows = ["| config | status | final train loss | val loss | val bpb | tokens/s | median step (s) | "
            "optimizer state (MiB) | peak memory (MiB) | data wait | kept frac |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in results["configs"]:
        s = c["summary"]
        n = s["val_loss"]["n"] if "val_loss" in s else 0
        status = c["status"] if c["status"] != "ok" else f"ok ({n} seed{'s' if n != 1 else ''})"
        if c["status"] != "ok" and c.get("error"):
            status += f": {c['error'][:80]}"
        rows.append(" | ".join([
            f"| {c['name']}", status.replace("|", "/"), _fmt(s.get("final_train_loss"), ".4f"),
            _fmt(s.get("val_loss"), ".4f"), _fmt(s.get("val_bpb"), ".3f"), _fmt(s.get("tokens_per_s"), ",.0f"),
            _fmt(s.get("median_step_s"), ".3f"), _fmt(s.get("optimizer_state_bytes"), ",.2f", mib),
            _fmt(s.get("peak_memory_bytes"), ",.0f", mib),
            _fmt(s.get("data_wait_share"), ".1%") if s.get("data_wait_share") else "–",
            _fmt(s.get("kept_frac"), ".3f"),
        ]) + " |")
    return rows


def task_table(results: dict[str, Any]) -> list[str]:
    """Markdown rows of every configuration's final task scores (mean ± std over seeds); [] if none."""
    keys = sorted({k for c in results["configs"] for k in c["summary"] if k.startswith("task_")})
    if not keys:
        return []
    rows = ["| config | " + " | ".join(k.removeprefix("task_") for k in keys) + " |",
            "|---|" + "---:|" * len(keys)]
    for c in results["configs"]:
        rows.append(f"| {c['name']} | " + " | ".join(_fmt(c["summary"].get(k), ".3f") for k in keys) + " |")
    return rows


def provenance_line(p: dict[str, Any] | None) -> str:
    """The report's code line; says so when the results predate provenance."""
    from ..provenance import describe

    if not p:
        return "unknown (these results record no commit)"
    line = describe(p)
    return line + (f"; {p['note']}" if p.get("note") else "")


def write_report(results: dict[str, Any], out: Path, plots: list[str]) -> Path:
    st, m, d = results["settings"], results["machine"], results["data"]
    lines = [
        "# nanochat-ternary benchmark report",
        "",
        f"- date: {results['date']}",
        f"- command: `{results['command']}`",
        f"- code: {provenance_line(results.get('provenance'))}",
        f"- machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
        f"{m.get('memory_bytes', 0) / 2**30:.0f} GiB, {m.get('platform', '')}; torch {m.get('torch', '?')}"
        + (f"; GPU {m['cuda_device']}" if m.get("cuda_device") else "; no GPU"),
        f"- model: `{st['model']}`, {st['steps']} steps × {st['tokens_per_step']:,} tokens "
        f"(batch {st['batch_size']} × seq {st['seq_len']} × accum {st['grad_accum_steps']}), "
        f"seeds {st['seeds']}, every configuration in its own process, one at a time",
        f"- data: {d.get('name', '?')} ({d.get('train_tokens', 0):,} train / {d.get('val_tokens', 0):,} val tokens)",
        f"- suite wall time: {results['wall_s'] / 60:.1f} min",
        "",
        "## Summary (mean ± std over seeds)",
        "",
        *summary_table(results),
        "",
        "Peak memory is the process's peak RSS on CPU (it includes the Python/torch runtime and the data) "
        "or `torch.cuda.max_memory_allocated` on GPU. Optimizer state is measured from the state tensors. "
        "tokens/s excludes step 1 and evaluation.",
        "",
    ]
    tasks = task_table(results)
    if tasks:
        items = results["settings"].get("task_items")
        lines += [f"## Task scores of the final models ({results['settings'].get('tasks')}, {items} items each; "
                  "chance for stdlib-next-line: 0.25)", "", *tasks, ""]
    lines += [
        "## Reading",
        "",
        *[f"- {line}" for line in reading(results)],
        "",
    ]
    cost = ternary_cost(results)
    if cost:
        lines += ["## What ternary costs (the baseline against its full-precision twin)", "",
                  "The same configuration, seeds, data and steps with `quantization=none`: the twin's learning "
                  "rate is the baseline's, so the gap is at one LR, not each side's best "
                  "(benchmarks/ternary_vs_float.py sweeps the LR per side).", "", *cost, ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    path = out / "REPORT.md"
    path.write_text("\n".join(lines))
    return path


def write_results(results: dict[str, Any], out: Path) -> Path:
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=1))
    return path


def write_plots(results: dict[str, Any], out: Path) -> list[str]:
    """loss.png (val loss vs tokens, mean with the seeds' min–max band) and memory.png (optimizer
    state and peak memory per configuration). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [c for c in results["configs"] if c["status"] in ("ok", "partial")]
    fig, ax = plt.subplots(figsize=(8, 5))
    for c in ok:
        curve = mean_val_curve(c["runs"])
        if not curve:
            continue
        tok = [p[0] for p in curve]
        line, = ax.plot(tok, [p[1] for p in curve], marker="o", ms=3, label=c["name"])
        ax.fill_between(tok, [p[2] for p in curve], [p[3] for p in curve], color=line.get_color(), alpha=0.15)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (CE, nats)")
    ax.set_title(f"{results['settings']['model']}: val loss vs tokens (band: min–max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)

    names = [c["name"] for c in ok]
    state = [c["summary"].get("optimizer_state_bytes", {}).get("mean", 0) / 2**20 for c in ok]
    peak = [c["summary"].get("peak_memory_bytes", {}).get("mean", 0) / 2**20 for c in ok]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    kinds = {r.get("peak_memory_kind") for c in ok for r in c["runs"] if r.get("status") == "ok"}
    peak_title = "peak memory (MiB, " + ("peak RSS" if kinds == {"rss"} else "CUDA max allocated") + ")"
    for ax, vals, title in ((axes[0], state, "optimizer state (MiB, measured)"), (axes[1], peak, peak_title)):
        bars = ax.barh(names, vals, color="tab:blue")
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_title(title)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=120)
    plt.close(fig)
    return ["loss.png", "memory.png"]
