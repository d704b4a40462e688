"""``nanochat-train``: train, prepare data, generate, inspect.

Every user mistake (bad config, missing data, corrupt checkpoint...) surfaces as a ``UserError``:
one line on stderr, exit status 1, no traceback. Exit statuses: 0 done, 1 an error in the input or
environment, 2 bad command line, 3 training diverged (train/guard.py), 70 an internal error (a bug:
one line ``internal error: ...; details in FILE``, the traceback in FILE), 75 stopped by a signal with
a checkpoint saved (train/signals.py), 130 interrupted without a checkpoint, 141 stdout closed by its
reader (``generate | head``). Run under ``torchrun``
for data parallel training.
"""

from __future__ import annotations

import argparse
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

    p = sub.add_parser("sft", help="chat fine-tune a checkpoint on conversations (loss on the assistant's tokens)",
                       description="Chat fine-tuning: adds the chat tokens to the checkpoint's tokenizer and model, "
                                   "then trains on conversations (OpenAI {\"messages\"} or ShareGPT "
                                   "{\"conversations\"} JSONL; default: the embedded set) with the train flags. "
                                   "See docs/chat_and_serving.md.")
    _add_config_args(p)
    p.add_argument("--data", action="append", metavar="FILE.jsonl",
                   help="conversations (repeatable; default: the embedded stdlib-docs + arithmetic set)")
    for name, (typ, help_text) in TRAIN_FLAGS.items():
        if name not in ("dataset", "data_path", "n_samples"):
            p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=help_text)

    p = sub.add_parser("chat", help="chat with a fine-tuned checkpoint in the terminal (streamed)")
    p.add_argument("--checkpoint", required=True, help="sft checkpoint dir, run dir, packed .safetensors or .gguf")
    p.add_argument("--system", default="", help="system message (change it in the chat with /system TEXT)")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens per reply")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: the default)")

    p = sub.add_parser("prepare-data", help="train a BPE tokenizer and write token shards (streamed, resumable)",
                       description="Tokenize text/code dirs, JSONL, parquet, datasets dirs and .gz/.zst files into "
                                   "a prepared dir (docs/data.md). An interrupted run resumes when re-run the "
                                   "same way.")
    p.add_argument("inputs", nargs="+", help="text files, directories, .jsonl, .parquet, datasets dirs (.gz/.zst too)")
    p.add_argument("--out", "-o", required=True,
                   help="output dir: must not exist or be empty, or be an unfinished prepare of the same inputs")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--glob", default="**/*", help="files to take from directories (default: all text files)")
    p.add_argument("--text-field", "--parquet-column", dest="text_field", default="text",
                   help="JSONL field / parquet or datasets column holding the text (default: text)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-tokens", type=int, default=100_000_000,
                   help="tokens per shard (default 100M); 0: one train.bin and one val.bin")
    p.add_argument("--tokenizer", help="encode with this tokenizer.json instead of training a BPE")
    p.add_argument("--tokenizer-sample-mb", type=float, default=48.0,
                   help="train the BPE on a seeded sample of this many MB of text (default 48)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad input instead of skipping it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

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

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (+ a chat page at /) for a checkpoint",
                       description="Serve a checkpoint over HTTP: POST /v1/chat/completions and /v1/completions "
                                   "(streaming with stream: true), GET /v1/models, GET /health, and a chat page "
                                   "at /. Up to --max-batch requests decode together; --max-queue more wait; "
                                   "beyond that a request gets 503. SIGTERM finishes the replies in flight and "
                                   "exits 0. See docs/chat_and_serving.md.")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint dir, run dir (latest checkpoint) or packed .safetensors")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ (default: $NANOCHAT_API_KEY if "
                                     "set, else no key)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together in one forward step")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a decode row before 503s")
    p.add_argument("--stream-interval", type=float, default=0.0,
                   help="ms: a stream sends the tokens decoded within this interval as one chunk (default 0: "
                        "each decode step's tokens as soon as they are decoded)")
    p.add_argument("--truncation", default="disabled", choices=["disabled", "auto"],
                   help="chat requests that do not fit the context: 400 context_length_exceeded (disabled, as "
                        "OpenAI) or drop their oldest turns (auto); a request's \"truncation\" field overrides it")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: the default)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

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
    p.add_argument("--ranks", type=int, default=0, help="also print per-rank params / grads / optimizer "
                                                      "state at N ranks, ddp vs fsdp (size arithmetic)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("memory", help="measured peak memory of real training steps of a config on this device "
                                      "(weights, grads, optimizer state, activations), and its optimizer state "
                                      "vs fp32 Muon")
    _add_config_args(p)
    p.add_argument("--steps", type=int, default=2, help="training steps to measure (default 2: the second runs "
                                                         "with the optimizer state in place)")
    p.add_argument("--ranks", type=int, default=0, help="also print per-rank params / grads / optimizer "
                                                      "state at N ranks, ddp vs fsdp (size arithmetic)")
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
    p.add_argument("--no-float-twin", dest="float_twin", action="store_false",
                   help="skip the baseline's full-precision twin (quantization=none), whose gap to the baseline "
                        "the report states as what ternary costs")
    p.add_argument("--tasks", help="scored once on each run's final model, in the report and its ternary-vs-float "
                                   "gap: built-in task names, .jsonl / .yaml task files or bpb:PATH, comma-separated "
                                   "(default stdlib-next-line; --quick: none; 'none': none)")
    p.add_argument("--task-items", type=int, help="items (bpb: documents) per task (default 200)")
    p = sub.add_parser("eval", help="score a model: bits per byte on text, multiple-choice tasks, HumanEval pass@k",
                       description="Judge a model (run dir, step dir, packed .safetensors, .gguf on llama.cpp or "
                                   "an HF export dir on transformers): bits per byte on "
                                   "any text (tokenizer-independent), multiple-choice accuracy from a local JSONL "
                                   "or an lm-eval-harness task YAML, the built-in stdlib-next-line task, HumanEval "
                                   "pass@k in a sandbox. A table on stdout, --json with provenance. "
                                   "See docs/evaluation.md.")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint dir, run dir (latest checkpoint), packed .safetensors, .gguf or HF export dir")
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
    from .checkpoint.files import read_config, resolve_checkpoint, resume_config
    from .config import build_config
    from .train.runtime import setup_runtime
    from .train.trainer import Trainer

    base = None
    if args.resume and not (args.config or args.config_file):
        # the checkpoint's config minus its output paths: a resume writes where the user points
        base = resume_config(args.resume)
    elif args.init_from and not (args.config or args.config_file):
        # a warm start without --config: the checkpoint's model, its preset's training settings
        saved = read_config(resolve_checkpoint(args.init_from))
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


def cmd_sft(args: argparse.Namespace) -> int:
    from .chat.finetune import run_sft, sft_config
    from .train.runtime import setup_runtime

    cfg = sft_config(args.config, args.config_file, _cli_overrides(args), args.set, args.data)
    rt = setup_runtime(cfg.training.device, cfg.training.threads)
    try:
        result = run_sft(cfg, rt)
    finally:
        rt.shutdown()
    if rt.is_main and result.final_checkpoint is not None:
        print(f"done: step {result.step}, val_loss {result.val_loss:.4f} (assistant tokens)")
        print(f"next: nanochat-train chat --checkpoint {result.final_checkpoint}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat.terminal import run_chat

    return run_chat(args)


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data.stream import PrepareSettings, prepare_stream

    settings = PrepareSettings(vocab_size=args.vocab_size, val_fraction=args.val_fraction, seed=args.seed,
                               glob=args.glob, text_field=args.text_field, shard_tokens=args.shard_tokens,
                               tokenizer_sample_bytes=int(args.tokenizer_sample_mb * 2**20), strict=args.strict)
    summary = prepare_stream(args.inputs, args.out, settings, tokenizer=args.tokenizer,
                             show_progress=not args.no_progress)
    for line in summary.lines():
        print(line)
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
    if 0 < args.temperature < 1e-4:  # logits / T overflows to inf, and softmax of inf is NaN
        raise UserError(f"--temperature {args.temperature}: too small to sample with (>= 1e-4); "
                        f"0 is greedy decoding")
    if not 0 <= args.seed < 2**63:
        raise UserError(f"--seed {args.seed}: must be in [0, 2**63)")
    if args.max_tokens > 10**7:
        raise UserError(f"--max-tokens {args.max_tokens}: must be <= 10,000,000")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as lone surrogates
        raise UserError("--prompt: not valid UTF-8 text (the shell passed bytes that are not UTF-8)") from None
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


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve.run import serve_checkpoint

    return serve_checkpoint(args.checkpoint, host=args.host, port=args.port, api_key=args.api_key,
                            max_batch=args.max_batch, max_queue=args.max_queue, device=args.device,
                            threads=args.threads, log_level=args.log_level, stream_interval_ms=args.stream_interval,
                            truncation=args.truncation)


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint

    export_checkpoint(args.checkpoint, args.format, args.out, quant=args.quant, force=args.force)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .config import build_config
    from .train.memory_report import report_info

    return report_info(build_config(args.config, args.config_file, None, args.set), args.ranks, args.json)


def cmd_memory(args: argparse.Namespace) -> int:
    from .config import build_config
    from .train.memory_report import report_memory

    if args.steps < 1:
        raise UserError(f"memory: --steps must be >= 1, got {args.steps}")
    return report_memory(build_config(args.config, args.config_file, None, args.set), args.steps, args.ranks,
                         args.json)


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
              overrides=args.set, keep_checkpoints=args.keep_checkpoints, float_twin=args.float_twin,
              tasks=("" if args.tasks.strip().lower() in ("", "none") else args.tasks) if args.tasks is not None
              else None, task_items=args.task_items)
    if args.task_items is not None and args.task_items < 1:
        raise UserError("bench: --task-items must be >= 1")
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
            "memory": cmd_memory, "bench": cmd_bench, "export": cmd_export, "eval": cmd_eval,
            "sft": cmd_sft, "chat": cmd_chat, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["train", *(argv if argv is not None else sys.argv[1:])])
    args.argv = argv
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"{e.prefix}: {_one_line(str(e))}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `generate ... | head`: the reader left; nothing to report
        _silence_stdout()
        return 141
    except MemoryError as e:
        print(f"error: out of memory ({_one_line(str(e)) or 'MemoryError'}); try a smaller model, batch or "
              f"sequence", file=sys.stderr)
        return 1
    except Exception as e:  # a bug, not bad input: one line, the traceback in a file
        if _is_out_of_memory(e):
            print(f"error: out of memory ({_one_line(str(e))[:200]}); try a smaller model, batch or sequence",
                  file=sys.stderr)
            return 1
        where = _write_crash_report(args)
        print(f"internal error: {type(e).__name__}: {_one_line(str(e))[:300]}; details in {where}",
              file=sys.stderr)
        return EXIT_INTERNAL


#: Exit status of an unexpected exception (a bug): EX_SOFTWARE of sysexits.h, so a wrapper can tell it
#: from bad input (1). The traceback goes to a file named in the one line printed.
EXIT_INTERNAL = 70


def _one_line(text: str) -> str:
    """A message for one stderr line: its lines joined, never a multi-line dump."""
    return " ".join(ln.strip() for ln in text.splitlines() if ln.strip())


def _is_out_of_memory(e: BaseException) -> bool:
    oom = getattr(sys.modules.get("torch"), "OutOfMemoryError", None)
    return (oom is not None and isinstance(e, oom)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def _silence_stdout() -> None:
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _write_crash_report(args: argparse.Namespace) -> str:
    """The current exception's traceback (+ version, command line) in a new file; its path.

    In ``$NANOCHAT_CRASH_DIR`` if set, else the system temp dir; created with ``mkstemp`` (O_EXCL,
    a fresh name), so it never overwrites or follows anything already there."""
    import os
    import tempfile
    import traceback

    argv = sys.argv if args.argv is None else args.argv
    text = f"nanochat-ternary {__version__}\ncommand: {args.command}\nargv: {argv}\n\n{traceback.format_exc()}"
    try:
        fd, name = tempfile.mkstemp(prefix="nanochat-ternary-crash-", suffix=".txt",
                                    dir=os.environ.get("NANOCHAT_CRASH_DIR") or None)
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as fh:
            fh.write(text)
        return name
    except OSError as e:
        return f"no file (it could not be written: {e.strerror or e}; set NANOCHAT_CRASH_DIR)"


if __name__ == "__main__":
    sys.exit(main())
