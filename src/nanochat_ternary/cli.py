"""``nanochat-train``: train, prepare data, generate, inspect.

Every user mistake (bad config, missing data, corrupt checkpoint...) surfaces as a ``UserError``:
one line on stderr, exit status 1, no traceback. Exit statuses: 0 done, 1 an error in the input or
environment, 2 bad command line, 3 training diverged (train/guard.py), 75 stopped by a signal with a
checkpoint saved (train/signals.py), 130 interrupted without a checkpoint. Run under ``torchrun``
for data parallel training.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .errors import UserError

# CLI flag -> config field, for the flags that are plain config fields
TRAIN_FLAGS: dict[str, tuple[type, str]] = {
    "dataset": (str, "synthetic | tokens | text | stdlib | pkgdocs (default: stdlib, the Python standard "
                     "library; pkgdocs: the installed packages' docs, English prose)"),
    "data_path": (str, "prepared data dir, .bin file, or text file/dir (for --dataset tokens/text)"),
    "epochs": (float, "passes over the training tokens; wins over an earlier source's step count "
                      "(a preset's), not over --total-steps given with it"),
    "total_steps": (int, "optimizer steps to train for"),
    "batch_size": (int, "sequences per micro-batch (per process)"),
    "seq_len": (int, "tokens per sequence (<= the model's max_seq_len)"),
    "grad_accum_steps": (int, "micro-batches per optimizer step"),
    "checkpoint_dir": (str, "run dir for step_NNNNNN/ checkpoints (default: runs/<preset>-<dataset>-<time>)"),
    "checkpoint_interval": (int, "save every N steps (0: only the final checkpoint)"),
    "keep_last_checkpoints": (int, "keep only the newest N checkpoints (0: keep all)"),
    "resume": (str, "checkpoint dir, or a run dir (its latest checkpoint), to continue from"),
    "init_from": (str, "warm start: the weights and tokenizer of this checkpoint (dir or run dir), fresh optimizer "
                       "and schedule from step 0, any --dataset; --set fire=true orthogonalises the block "
                       "matrices first (FIRE)"),
    "log_interval": (int, "log every N steps"),
    "eval_interval": (int, "validate every N steps (0: only at the end)"),
    "device": (str, "auto | cpu | cuda | cuda:N"),
    "threads": (int, "CPU threads for torch (0: torch's default)"),
    "n_samples": (int, "--dataset synthetic: number of sequences"),
    "seed": (int, "seed for init and batch order"),
    "log_file": (str, "append JSONL metrics (one object per logged step)"),
    "tensorboard": (str, "write TensorBoard scalars to this dir"),
    "sample_tokens": (int, "tokens of generated text to print at the end (0: none)"),
    "sample_prompt": (str, "prompt for that sample"),
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="preset name (tiny-cpu, d20, nano-125m, ...) or a TOML file")
    p.add_argument("--config-file", help="TOML file applied on top of --config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field (repeatable); applied last")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanochat-train",
        description="Train small GPT models with ternary (1.58-bit) weights.",
    )
    parser.add_argument("--version", action="version", version=f"nanochat-ternary {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (default: tiny-cpu on the Python stdlib, ~5-7 min on 2 cores)")
    _add_config_args(p)
    for name, (typ, help_text) in TRAIN_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=help_text)

    p = sub.add_parser("prepare-data", help="train a BPE tokenizer and write tokenizer.json, train.bin, val.bin")
    p.add_argument("inputs", nargs="+", help="text files, directories, or .parquet files")
    p.add_argument("--out", "-o", required=True, help="output dir (must not exist or be empty)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--glob", default="**/*", help="files to take from directories (default: all text files)")
    p.add_argument("--parquet-column", default="text")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("generate", help="sample text from a checkpoint (KV cache)")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint dir, run dir (latest checkpoint), packed .safetensors or .gguf (llama.cpp)")
    p.add_argument("--prompt", default="", help="text to continue (default: empty, a new document)")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (a .gguf runs on the CPU)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: the default)")

    p = sub.add_parser("export", help="write a checkpoint as GGUF (llama.cpp), a Hugging Face dir, or packed",
                       description="Export a checkpoint. gguf: llama.cpp's llama architecture, ternary blocks as "
                                   "TQ2_0 (default), TQ1_0 or Q8_0 (or f16/f32), tokenizer embedded. hf: a dir "
                                   "LlamaForCausalLM.from_pretrained loads (dequantized weights). packed: 2-bit "
                                   "codes + scales in one .safetensors that generate --checkpoint runs.")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir or run dir (latest checkpoint)")
    p.add_argument("--format", required=True, help="gguf | hf | packed")
    p.add_argument("--quant", help="gguf weight type: tq2_0 (default) | tq1_0 | q8_0 | f16 | f32")
    p.add_argument("--out", "-o", required=True, help="output file (gguf, packed) or dir (hf); must not exist")
    p.add_argument("--force", action="store_true", help="replace --out if it exists (once the new one is whole)")

    p = sub.add_parser("info", help="parameter counts and memory of a config (no big allocations)")
    _add_config_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("memory", help="measured peak memory of real training steps of a config on this device "
                                      "(weights, grads, optimizer state, activations), and its optimizer state "
                                      "vs fp32 Muon")
    _add_config_args(p)
    p.add_argument("--steps", type=int, default=2, help="training steps to measure (default 2: the second runs "
                                                         "with the optimizer state in place)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bench", help="matched benchmark of configurations (default: the E3 suite) -> REPORT.md",
                       description="Train every configuration of a suite on the same model, data, seeds, steps "
                                   "and batch shape, each in its own process, and write REPORT.md, results.json, "
                                   "loss.png and memory.png. Default: the five E3 configs on tiny-cpu, 150 steps of "
                                   "8 x 128 tokens, 2 seeds, the default corpus (~20 min on 2 cores); "
                                   "--quick: 1-2 min.")
    p.add_argument("--suite", default="e3", help="e3 (default) | nano-125m (its optimizer configs)")
    p.add_argument("--configs", help="comma-separated TOML configs to compare instead of a suite (shipped "
                                     "names like e3/full.toml, or paths); the one named baseline, else the first, "
                                     "is what the others are compared with")
    p.add_argument("--model", help="model preset every configuration trains (default: tiny-cpu)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 150; --quick 30)")
    p.add_argument("--seeds", type=int, help="seeds per configuration, 1..N (default 2; --quick 1)")
    p.add_argument("--dataset", help="synthetic | tokens | text | stdlib (default: the embedded corpus)")
    p.add_argument("--data-path", help="data for --dataset tokens/text")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch (default 8)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's)")
    p.add_argument("--grad-accum-steps", type=int)
    p.add_argument("--threads", type=int, default=0, help="CPU threads per run (0: torch's default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field in every configuration (repeatable)")
    p.add_argument("--out", help="output dir, must be new or empty (default: bench-results/<date-time>)")
    p.add_argument("--quick", action="store_true", help="smoke-test size: 30 steps, 1 seed, batch 8 x 64")
    p.add_argument("--peers", action="store_true",
                   help="add torch AdamW/Muon, bitsandbytes and torchao AdamW8bit, galore-torch GaLoreAdamW")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's final checkpoint")
    p = sub.add_parser("eval", help="score a model: bits per byte on text, multiple-choice tasks, HumanEval pass@k",
                       description="Judge a checkpoint (run dir, step dir or packed .safetensors): bits per byte on "
                                   "any text (tokenizer-independent), multiple-choice accuracy from a local JSONL "
                                   "or an lm-eval-harness task YAML, the built-in stdlib-next-line task, HumanEval "
                                   "pass@k in a sandbox. A table on stdout, --json with provenance. "
                                   "See docs/evaluation.md.")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint dir, run dir (latest checkpoint) or packed .safetensors")
    p.add_argument("--text", action="append", default=[], metavar="PATH",
                   help="bits per byte on a file, dir, glob or prepared data dir (its val split); repeatable")
    p.add_argument("--tasks", action="append", default=[], metavar="TASK",
                   help="FILE.jsonl ({query, choices, gold} per line) | TASK.yaml (lm-eval) | humaneval | "
                        "stdlib-next-line; repeatable")
    p.add_argument("--json", help="write the results with provenance to this file")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward (default 16)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: the default)")
    p.add_argument("--limit", type=int, help="score only the first N items (documents for --text) of each")
    p.add_argument("--stride", type=int, help="--text: window stride in tokens (default: half the model's context)")
    p.add_argument("--samples", type=int, default=1, help="humaneval: completions per problem (n)")
    p.add_argument("--pass-k", default="1", help="humaneval: comma-separated k of pass@k (each <= --samples)")
    p.add_argument("--max-tokens", type=int, default=256, help="humaneval: new tokens per completion")
    p.add_argument("--temperature", type=float, default=0.2, help="humaneval: sampling temperature (0: greedy)")
    p.add_argument("--timeout", type=float, default=10.0, help="humaneval: seconds per program run")
    p.add_argument("--seed", type=int, default=0, help="humaneval: sampling seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    # --epochs over a preset's step count: config.build_config's run-length rule, as for TOML and --set
    return {name: getattr(args, name) for name in TRAIN_FLAGS if getattr(args, name, None) is not None}


def cmd_train(args: argparse.Namespace) -> int:
    from .checkpoint.files import read_meta, resolve_checkpoint
    from .config import Config, build_config
    from .train.runtime import setup_runtime
    from .train.trainer import Trainer

    base = None
    if args.resume and not (args.config or args.config_file):
        base = Config.from_dict(read_meta(resolve_checkpoint(args.resume))["config"])
    elif args.init_from and not (args.config or args.config_file):
        # a warm start without --config: the checkpoint's model, its preset's training settings
        saved = Config.from_dict(read_meta(resolve_checkpoint(args.init_from))["config"])
        base = build_config(saved.preset or None)
        base.model = saved.model
    cfg = build_config(args.config, args.config_file, _cli_overrides(args), args.set, base=base)
    rt = setup_runtime(cfg.training.device, cfg.training.threads)
    try:
        result = Trainer(cfg, rt).fit()
    finally:
        rt.shutdown()
    if rt.is_main and result.final_checkpoint is not None:
        print(f"done: step {result.step}, val_loss {result.val_loss:.4f}"
              + (f", val_bpb {result.val_bpb:.3f}" if result.val_bpb is not None else ""))
        print(f"next: nanochat-train generate --checkpoint {result.final_checkpoint} --prompt 'def '")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data.corpus import prepare_data

    out = prepare_data([Path(p) for p in args.inputs], Path(args.out), vocab_size=args.vocab_size,
                       val_fraction=args.val_fraction, glob=args.glob, parquet_column=args.parquet_column,
                       seed=args.seed)
    meta = json.loads((out / "meta.json").read_text())
    print(f"wrote {out}: vocab {meta['vocab_size']}, {meta['train_tokens']:,} train / "
          f"{meta['val_tokens']:,} val tokens from {meta['n_docs']:,} documents")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import math

    import torch

    from .checkpoint import open_checkpoint
    from .generate import generate, prompt_ids, stream_text

    if args.max_tokens < 1:
        raise UserError(f"--max-tokens {args.max_tokens}: must be >= 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature {args.temperature}: must be a finite number >= 0")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p {args.top_p}: must be in (0, 1]")
    if args.threads < 0:
        raise UserError(f"--threads {args.threads}: must be >= 0 (0: torch's default)")
    if Path(args.checkpoint).suffix == ".gguf" and Path(args.checkpoint).is_file():
        from .export.run import generate_gguf

        return generate_gguf(args, Path(args.checkpoint))
    if args.threads:
        torch.set_num_threads(args.threads)
    opened = open_checkpoint(args.checkpoint, device=args.device)
    tok = opened.require_tokenizer()
    sys.stdout.write(args.prompt)
    with torch.inference_mode():
        stream_text(generate(opened.model, prompt_ids(tok, args.prompt), max_tokens=args.max_tokens,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed),
                    tok.decode)
    sys.stdout.write("\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint

    export_checkpoint(args.checkpoint, args.format, args.out, quant=args.quant, force=args.force)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .config import build_config, format_config
    from .model.info import model_info

    cfg = build_config(args.config, args.config_file, None, args.set)
    info = model_info(cfg)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(format_config(cfg))
    print(f"\nparameters: {info['params']:,} total, {info['non_embedding_params']:,} non-embedding "
          f"({info['params'] / 1e6:.1f}M / {info['non_embedding_params'] / 1e6:.1f}M)")
    print(f"  Muon (hidden matrices): {info['muon_params']:,}   AdamW (rest): {info['adamw_params']:,}")
    print(f"weights: {info['fp32_weight_bytes'] / 2**20:,.1f} MiB fp32 shadow weights; "
          f"{info['ternary_packed_bytes'] / 2**20:,.1f} MiB packed ternary (2 bits/weight + scales)")
    print(f"optimizer state at fp32 (momentum 4 B + AdamW 8 B per param): "
          f"{info['fp32_optimizer_state_bytes'] / 2**20:,.1f} MiB (size arithmetic; measure it with training)")
    return 0


def _available_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cmd_memory(args: argparse.Namespace) -> int:
    import torch

    from .config import build_config
    from .model.gpt import GPT
    from .model.info import model_info
    from .optim.factory import measure_optimizer_state
    from .train.memory import measure_training_step

    cfg = build_config(args.config, args.config_file, None, args.set)
    if args.steps < 1:
        raise UserError(f"memory: --steps must be >= 1, got {args.steps}")
    info = model_info(cfg)
    # a real step holds weights, grads, optimizer state (fp32: ~16 B/param) plus activations
    need = info["params"] * 16
    avail = _available_memory_bytes()
    on_cpu = cfg.training.device == "cpu" or (cfg.training.device == "auto" and not torch.cuda.is_available())
    if on_cpu and avail is not None and need > 0.8 * avail:
        raise UserError(f"measuring {cfg.preset or 'this config'} ({info['params'] / 1e9:.2f}B params) needs "
                        f"~{need / 2**30:.0f} GiB; this machine has {avail / 2**30:.0f} GiB available. "
                        f"Not measured (run it on a bigger machine)")
    try:
        step = measure_training_step(cfg, steps=args.steps)
    except torch.OutOfMemoryError as e:  # on CUDA there is no estimate to refuse with: the step itself says
        first = str(e).splitlines()[0] if str(e) else "out of memory"
        raise UserError(f"measuring {cfg.preset or 'this config'} ({info['params'] / 1e9:.2f}B params) ran out of "
                        f"memory ({first}). Not measured: try a smaller batch_size, gradient_checkpointing=true, "
                        f"use_8bit_optim=true or latent_dtype=bfloat16") from None
    with torch.device("meta"):
        model = GPT(cfg.model)
    rep = measure_optimizer_state(model, cfg.training, baseline=True, seed=cfg.training.seed)
    rep["preset"] = cfg.preset
    rep["step"] = step
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    mib = 2**20
    b, s_len, k = step["batch"]
    print(f"{step['steps']} training step(s) of {cfg.preset or 'custom'} ({step['params'] / 1e6:.1f}M params, "
          f"batch {b} x {s_len} x {k} micro-batches) on {step['device']}, measured:")
    print(f"  peak           {step['peak_bytes'] / mib:>10.1f} MiB   ({step['peak_source']})")
    by = ", ".join(f"{v / mib:.1f} MiB {d}" for d, v in step["weights_by_dtype"].items())
    print(f"  weights        {step['weights_bytes'] / mib:>10.1f} MiB   ({by})")
    print(f"  gradients      {step['grads_peak_bytes'] / mib:>10.1f} MiB   (most alive at once in the backward)")
    print(f"  optimizer      {step['optimizer_state_bytes'] / mib:>10.1f} MiB   (state tensors after the steps)")
    print(f"  activations    {step['activations_saved_bytes'] / mib:>10.1f} MiB   (saved for the backward, one "
          f"micro-batch)")
    print("  options: " + ", ".join(f"{k}={v}" for k, v in step["options"].items()))
    print(f"optimizer state after one step (measured from the state tensors), variant {rep['variant']}")
    print(f"  Muon : {rep['muon_params']:>13,} params  {rep['muon_state_bytes'] / mib:>10.2f} MiB  "
          f"{rep['bytes_per_muon_param']:.3f} B/param  (int8 momenta: {rep['muon_int8_tensors']}, "
          f"GaLore-projected: {rep['galore_projected']})")
    print(f"  AdamW: {rep['adamw_params']:>13,} params  {rep['adamw_state_bytes'] / mib:>10.2f} MiB")
    print(f"  total: {rep['total_state_bytes'] / mib:.2f} MiB")
    print(f"  fp32 Muon on the same params (measured): {rep['fp32_muon_state_bytes'] / mib:.2f} MiB -> "
          f"this variant's Muon state is {rep['muon_state_vs_fp32']:.1%} of it "
          f"({1 - rep['muon_state_vs_fp32']:.1%} less)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import time

    from .bench.runner import SUITES, BenchSettings, command_line, run_bench

    if args.configs:
        configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    elif args.suite in SUITES:
        configs = SUITES[args.suite]
    else:
        raise UserError(f"bench: unknown suite '{args.suite}' (suites: {', '.join(SUITES)})")
    for key in ("steps", "seeds"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise UserError(f"bench: --{key} must be >= 1")
    kw = dict(model=args.model, steps=args.steps, seeds=args.seeds, dataset=args.dataset,
              data_path=args.data_path, batch_size=args.batch_size, seq_len=args.seq_len,
              grad_accum_steps=args.grad_accum_steps, threads=args.threads, device=args.device,
              overrides=args.set, keep_checkpoints=args.keep_checkpoints)
    if args.quick:
        settings = BenchSettings.quick(**kw)
    else:
        settings = BenchSettings(**{k: v for k, v in kw.items() if v is not None})
    out = Path(args.out) if args.out else Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")
    argv = sys.argv[1:] if args.argv is None else args.argv
    run_bench(settings, configs, args.peers, out, command=command_line(argv))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.run import EvalOptions, run_eval

    try:
        pass_k = [int(k) for k in args.pass_k.split(",") if k.strip()]
    except ValueError:
        raise UserError(f"--pass-k {args.pass_k!r}: give comma-separated integers, e.g. 1,10") from None
    return run_eval(EvalOptions(args.checkpoint, args.text, args.tasks, args.json, args.batch_size, args.device,
                                args.limit, args.stride, args.threads, args.seed, args.samples, pass_k,
                                args.max_tokens, args.temperature, args.timeout,
                                command="nanochat-train " + " ".join(sys.argv[1:] if args.argv is None else args.argv),
                                progress=not args.no_progress))


COMMANDS = {"train": cmd_train, "prepare-data": cmd_prepare, "generate": cmd_generate, "info": cmd_info,
            "memory": cmd_memory, "bench": cmd_bench, "export": cmd_export, "eval": cmd_eval}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["train", *(argv if argv is not None else sys.argv[1:])])
    args.argv = argv
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"{e.prefix}: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
