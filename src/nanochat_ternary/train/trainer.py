"""The training loop: one optimizer step reads like the algorithm.

    for step in range(start, total):
        set lr from the schedule
        for each micro-batch:  loss = CE(model(x), y) / accum;  loss.backward()   (DDP all-reduces)
        clip the global grad norm
        if loss and grad norm are finite:  Muon.step() on hidden matrices;  AdamW.step() on the rest
        else: skip the update (guard.py: counted, logged, stop after too many in a row)
        (optimizer_in_backward: Muon steps each matrix inside backward(), optim/in_backward.py)
        log · evaluate · checkpoint · stop here if a signal asked to (signals.py)

Everything a resumed run needs is either in the checkpoint (weights, optimizer states, RNG) or a
pure function of (seed, step, rank) (the batches), so N steps + resume + N steps reproduces 2N
straight steps exactly on CPU.

Fault handling lives beside this file, each piece in its own module: stop requests from signals
(signals.py), skipped non-finite steps (guard.py), the run-dir lock (lock.py), the data
fingerprint checked on resume (fingerprint.py), durable atomic checkpoints (checkpoint/files.py).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..checkpoint import dcp as ckpt_dcp
from ..checkpoint import files as ckpt_io
from ..config import Config, TrainConfig, format_config
from ..data.batches import TokenBatches, val_batches
from ..data.loader import make_batch_source
from ..errors import CheckpointError, UserError
from ..model.compile import compile_enabled, compile_error_line, is_compile_error
from ..model.gpt import GPT
from ..optim.factory import build_optimizers, split_named_params
from ..optim.in_backward import install_in_backward
from ..optim.sharded_muon import build_sharded_optimizers
from . import fsdp
from .checkpointing import checkpoint_meta, choose_run_dir, rng_state, set_rng_state
from .dataset import LoadedData, load_training_data
from .distill import Distiller
from .fingerprint import check_resume_data, data_fingerprint
from .fire import apply_fire
from .gpu_monitor import GpuUtilization
from .guard import NonFiniteGuard
from .lock import RunLock
from .metrics import MetricsLogger
from .objective import Objective
from .qat import QatSchedule
from .reports import optimizer_memory_line, sample_text
from .runtime import Runtime, is_comm_failure
from .schedule import schedule_factors, set_lr, set_weight_decay
from .signals import Preempted, StopRequests
from .warm_start import WarmStart, check_model_config, reset_momentum


@dataclass
class TrainResult:
    run_dir: Path
    final_checkpoint: Path | None
    step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> train loss, every step
    val_curve: dict[int, float] = field(default_factory=dict)  # step -> val loss, at each evaluation
    step_times: list[float] = field(default_factory=list)  # seconds per optimizer step, data wait included
    data_waits: list[float] = field(default_factory=list)  # seconds of each step spent waiting for data
    step_stats: list[dict[str, float]] = field(default_factory=list)  # per step: mtp_ce_k, kept_frac
    val_loss: float | None = None
    val_bpb: float | None = None
    sample: str | None = None
    skipped_steps: list[int] = field(default_factory=list)  # steps whose update was skipped (non-finite)
    gpu_util: float | None = None  # mean NVML GPU utilization (percent) over the run; None off CUDA
    compile_s: float | None = None  # first step's time when compiled (compiling included)


def round_up(n: int, multiple: int) -> int:
    return multiple * math.ceil(n / multiple)


OptimizerFactory = Callable[[torch.nn.Module, TrainConfig], list[torch.optim.Optimizer]]


class Trainer:
    """``optimizer_factory`` replaces the config's optimizers (the benchmark's peers use it); every
    param group it returns must carry ``initial_lr`` for the schedule."""

    def __init__(self, cfg: Config, runtime: Runtime, echo: Callable[[str], None] = print,
                 optimizer_factory: OptimizerFactory | None = None, task: Any = None) -> None:
        # task: another kind of data (sft.py's SFTTask: conversations, masked targets, chat tokens);
        # None: the config's corpus
        self.task = task
        self.command = getattr(task, "command", "train")  # what "continue with: nanochat-train ..." says
        self.cfg = cfg
        self.rt = runtime
        self.echo = echo if runtime.is_main else (lambda _msg: None)
        # warnings go to stderr through tqdm, so a line is never glued to the progress bar
        self.warn: Callable[[str], None] = ((lambda msg: tqdm.write(msg, file=sys.stderr))
                                            if runtime.is_main else (lambda _msg: None))
        t = cfg.training
        if task is None and (t.sft_data or t.sft_batching != "pack"):
            raise UserError("sft_data / sft_batching apply to chat fine-tuning: run nanochat-train sft "
                            "(train reads the corpus of --dataset)")

        # ---- resume target (read first: it fixes the run dir and the model shape)
        self.resume_ckpt: Path | None = None
        resume_meta: dict[str, Any] | None = None
        if t.resume:
            self.resume_ckpt = ckpt_io.resolve_checkpoint(t.resume)
            resume_meta = ckpt_io.read_meta(self.resume_ckpt)
            if task is None and str((resume_meta.get("data") or {}).get("name", "")).startswith("sft:"):
                raise UserError(f"{self.resume_ckpt} is a chat fine-tune: continue it with "
                                f"nanochat-train sft --resume {t.resume}")
        # warm start (init_from): a checkpoint's weights, and its tokenizer for the data (warm_start.py)
        self.warm = WarmStart.open(t.init_from) if t.init_from else None
        # FIRE already applied in this run (recorded in its checkpoints): never again on resume
        self.fire_done: dict[str, Any] | None = (resume_meta or {}).get("fire")
        self.warm_record = self.warm.record() if self.warm else (resume_meta or {}).get("warm_start")

        # ---- data (the main rank prepares and caches; the others wait, then read the cache)
        self.data: LoadedData = (task.load_data if task is not None else load_training_data)(
            cfg, runtime, tokenizer=self.warm.tokenizer_path if self.warm else None)
        m = cfg.model
        if self.data.tokenizer_path is not None:
            want = round_up(self.data.vocab_size, 64)
            if m.vocab_size != want:
                self.echo(f"note: vocab_size {m.vocab_size} -> {want} (the data's tokenizer has "
                          f"{self.data.vocab_size} tokens, rounded up to a multiple of 64)")
                m.vocab_size = want
        elif self.data.vocab_size > m.vocab_size:
            raise UserError(f"the data has token ids up to {self.data.vocab_size - 1} but the model's "
                            f"vocab_size is {m.vocab_size} (use --set vocab_size={self.data.vocab_size})")
        self.fingerprint = data_fingerprint(self.data.train, self.data.tokenizer_path, self.data.vocab_size)
        if resume_meta is not None:
            check_resume_data(resume_meta.get("data_fingerprint"), self.fingerprint, self.resume_ckpt,
                              t.allow_data_change, self.warn)
            check_model_config(resume_meta, m, self.resume_ckpt)
        if self.warm is not None:
            self.warm.check_data(self.data.tokenizer_path)
            check_model_config(self.warm.meta, m, self.warm.ckpt, ignore=getattr(task, "warm_ignore", ()))

        # ---- batches: a pure function of (seed, step, micro, rank)
        if task is not None:
            self.batches, self.val = task.batches(self.data, t, runtime)
        else:
            self.batches = TokenBatches(self.data.train, t.batch_size, t.seq_len, t.seed,
                                        rank=runtime.rank, world_size=runtime.world_size,
                                        grad_accum_steps=t.grad_accum_steps)
            self.val = val_batches(self.data.val, t.batch_size, t.seq_len, t.eval_batches)
        self.tokens_per_step = t.batch_size * t.seq_len * t.grad_accum_steps * runtime.world_size
        if t.total_steps > 0:
            self.total_steps = t.total_steps
        else:
            epochs = t.epochs if t.epochs > 0 else 1.0
            self.total_steps = max(1, math.ceil(epochs * self.batches.steps_per_epoch))

        # ---- model and optimizers
        torch.manual_seed(t.seed)
        # built on its device: a CUDA model is initialised there (seconds for billions of weights)
        with torch.device(runtime.device):
            self.model = GPT(m)
        self.model.gradient_checkpointing = t.gradient_checkpointing
        # parallelism = "fsdp" under torchrun: weights, grads and optimizer state sharded (fsdp.py)
        self.fsdp = t.parallelism == "fsdp" and runtime.distributed
        # torch.compile (model/compile.py): the blocks and the loss head's softmax, on CUDA by default
        # ("auto" stays eager under fsdp: compiled blocks under fully_shard are not tested yet)
        self.compiled = compile_enabled(t.compile, runtime.device) and not self.fsdp
        if self.compiled:
            self.model.compile_blocks()
        # loss (+ MTP heads) (+ Collider filter); see objective.py. On CUDA the LM head never makes
        # [B*T, V] logits (model/linear_ce.py); on CPU only with gradient checkpointing.
        self.objective = Objective(m, t, chunked_head=t.gradient_checkpointing or runtime.device.type == "cuda",
                                   compiled=self.compiled)
        # recipes (docs/recipes.md): continual QAT's quantizer mix per step; distillation wraps the objective
        self.qat = QatSchedule(t, self.total_steps)
        self.distiller = (Distiller(cfg, self.objective, runtime.device, self.fingerprint, runtime.autocast)
                          if t.teacher else None)
        if self.distiller is not None:
            self.objective = self.distiller
        self.step_stats: dict[str, float] = {}
        if self.fsdp:
            fsdp.shard_model(self.model, runtime)
        if optimizer_factory is not None:
            self.optimizers = optimizer_factory(self.model, t)
        elif self.fsdp:
            self.optimizers = build_sharded_optimizers(self.model, t)
        else:
            self.optimizers = build_optimizers(self.model, t, runtime.device)
        # optimizer_in_backward: Muon matrices are updated in backward hooks (optim/in_backward.py)
        self.in_backward = (install_in_backward(self.optimizers, t.grad_accum_steps, t.grad_clip, runtime.distributed)
                            if t.optimizer_in_backward else None)
        if t.optimizer_in_backward and t.use_8bit_optim and t.grad_accum_steps > 1 and not t.stochastic_rounding:
            # measured (docs/low_memory.md, Convergence): nearest rounding at every micro-batch lost 0.8-1.8%
            self.warn("note: the in-backward step requantises the int8 momentum at every micro-batch; with "
                      "round-to-nearest that cost +0.8% and +1.8% val loss in matched runs, with stochastic "
                      "rounding -0.1% and -0.8% (docs/low_memory.md): set stochastic_rounding = true")
        self.ddp: torch.nn.Module = self.model
        if runtime.distributed and not self.fsdp:
            ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)

        # ---- run dir (locked by the main rank until the run ends)
        self.lock: RunLock | None = None
        self.run_dir, self.lock = choose_run_dir(cfg, runtime, self.resume_ckpt, self.echo, self.warn)
        self.start_step = 0
        self.tokens_seen = 0
        self.last_checkpoint: Path | None = self.resume_ckpt  # the newest good one, named when things fail
        if self.resume_ckpt is not None or self.warm is not None:
            try:
                if self.resume_ckpt is not None:
                    self._restore(self.resume_ckpt, resume_meta)
                else:
                    self.warm.load_weights(self.model, getattr(self.task, "new_rows_from", None))
                    self.echo(self.warm.line())
                if t.fire:
                    self._apply_fire()
            except BaseException:
                self.close()
                raise
        if self.rt.is_main:  # a save this run would make must not collide with what is there
            try:
                ckpt_io.check_destination(self.run_dir, self.start_step, self.total_steps)
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        """Release the run dir (idempotent; ``fit`` calls it when it ends, however it ends)."""
        if self.lock is not None:
            self.lock.release()

    # ------------------------------------------------------------------------------------------
    def _restore(self, ckpt: Path, meta: dict[str, Any]) -> None:
        if ckpt_dcp.is_dcp_checkpoint(ckpt):  # a sharded run's: reshards to this run's ranks (or one process)
            ckpt_dcp.load_dcp_checkpoint(ckpt, self.model, self.optimizers)
            state = ckpt_io.load_trainer_state(ckpt)
        elif self.fsdp:
            raise CheckpointError(f"checkpoint {ckpt} was saved by a ddp / single-process run: resume it with "
                                  f"parallelism = 'ddp' (fsdp resumes the dcp/ checkpoints of fsdp runs)")
        else:
            state = self._restore_files(ckpt)
        if self.in_backward is not None and "in_backward" in state:
            try:
                self.in_backward.load_state_dict(state["in_backward"])
            except (ValueError, KeyError, RuntimeError, TypeError, AttributeError, IndexError) as e:
                raise CheckpointError(f"checkpoint {ckpt}: in-backward state does not match ({e})") from None
        set_rng_state(state.get("rng", {}), self.rt.device, ckpt)
        self.start_step = int(meta["step"])
        self.tokens_seen = int(meta.get("tokens_seen", self.start_step * self.tokens_per_step))
        self.echo(f"resumed from {ckpt} at step {self.start_step}")

    def _restore_files(self, ckpt: Path) -> dict[str, Any]:
        """Weights and optimizer states of a ddp / single-process checkpoint; returns trainer.pt."""
        ckpt_io.load_model_weights(self.model, ckpt)
        state = ckpt_io.load_trainer_state(ckpt)
        saved = state.get("optimizers", [])
        if len(saved) != len(self.optimizers):
            raise CheckpointError(f"checkpoint {ckpt} holds {len(saved)} optimizer states, expected "
                                  f"{len(self.optimizers)} (was it saved with another optimizer setup?)")
        # trainer.pt's structure is checked by load_trainer_state; what does not fit these
        # optimizers (a crafted or foreign file) is one line naming it, whatever torch raises
        try:
            for opt, sd in zip(self.optimizers, saved):
                opt.load_state_dict(sd)
        except (ValueError, KeyError, RuntimeError, TypeError, AttributeError, IndexError) as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"checkpoint {ckpt}: optimizer state does not match ({first})") from None
        return state

    def _apply_fire(self) -> None:
        """FIRE (fire.py) on the Muon matrices, once per run: a resumed run whose checkpoint records it
        keeps its weights; on resume the orthogonalised matrices' momentum is reset."""
        if self.fire_done is not None:
            self.echo(f"fire: already applied at step {self.fire_done['step']} of this run (checkpoint meta); "
                      f"not again")
            return
        muon, _ = split_named_params(self.model)
        report = apply_fire(muon, self.cfg.model.group_size)
        if self.resume_ckpt is not None:
            reset_momentum(self.optimizers, [p for _, p in muon])
        self.fire_done = {"step": self.start_step, "via": "resume" if self.resume_ckpt is not None else "init_from",
                          **report.to_dict()}
        self.echo(report.line())

    def _save(self, step: int, metrics: dict[str, Any]) -> Path | None:
        """Write checkpoint ``step`` (main rank) and wait for it on every rank. Raises
        ``CheckpointWriteError`` when the filesystem refuses and ``CheckpointError`` on NaN/inf."""
        if self.fsdp:  # every rank writes its shards (checkpoint/dcp.py)
            path = ckpt_dcp.save_dcp_checkpoint(self.run_dir, step, self.model, self.optimizers,
                                                {"rng": rng_state(self.rt.device)},
                                                checkpoint_meta(self, step, metrics),
                                                make_model=lambda: fsdp.empty_cpu_model(self.cfg.model),
                                                tokenizer_path=self.data.tokenizer_path,
                                                keep_last=self.cfg.training.keep_last_checkpoints,
                                                protect=(self.resume_ckpt,) if self.resume_ckpt else ())
            self.last_checkpoint = path
            return path if self.rt.is_main else None
        path = None
        err: CheckpointError | None = None
        if self.rt.is_main:
            state = {"optimizers": [opt.state_dict() for opt in self.optimizers], "rng": rng_state(self.rt.device)}
            if self.in_backward is not None:
                state["in_backward"] = self.in_backward.state_dict()
            meta = checkpoint_meta(self, step, metrics)
            try:
                path = ckpt_io.save_checkpoint(self.run_dir, step, self.model, state, meta,
                                               tokenizer_path=self.data.tokenizer_path,
                                               keep_last=self.cfg.training.keep_last_checkpoints,
                                               protect=(self.resume_ckpt,) if self.resume_ckpt else ())
                self.last_checkpoint = path
            except CheckpointError as e:
                err = e
        self.rt.barrier()  # after the main rank's attempt, failed or not, so no rank waits forever
        if err is not None:
            raise err
        return path

    def _save_or_warn(self, step: int, metrics: dict[str, Any]) -> None:
        """An interval checkpoint the disk refuses does not end the run: the previous checkpoint is
        intact, the partial one is gone, and the next interval tries again (a full disk is often
        freed by the user or by ``keep_last_checkpoints`` pruning). Only the final save is fatal."""
        try:
            self._save(step, metrics)
        except ckpt_io.CheckpointWriteError as e:
            self.warn(f"warning: {e}; training goes on and retries at the next interval "
                      f"(last checkpoint: {self.last_checkpoint or 'none yet'})")

    def _save_on_exit(self, step: int, metrics: dict[str, Any], why: str) -> Path:
        """The checkpoint at the end of a run or on a stop request; failure is a one-line error."""
        if self.last_checkpoint is not None and self.last_checkpoint.name == ckpt_io.step_dir_name(step) \
                and self.last_checkpoint.parent == self.run_dir:
            return self.last_checkpoint  # the interval checkpoint of this very step
        try:
            path = self._save(step, metrics)
        except ckpt_io.CheckpointWriteError as e:
            raise CheckpointError(f"{why}: {e}; the last checkpoint is {self.last_checkpoint or 'none'}") from None
        return path if path is not None else self.run_dir / ckpt_io.step_dir_name(step)
    def _preempted(self, step: int, signal_name: str, metrics: dict[str, Any]) -> Preempted:
        """Save the checkpoint of ``step`` (the last finished one) and say how to continue."""
        why = f"{signal_name or 'a signal on another rank'} at step {step}"
        path = self._save_on_exit(step, metrics, f"stopped by {why}")
        return Preempted(f"{why}: checkpoint saved in {path}; continue with: "
                         f"nanochat-train {self.command} --resume {self.run_dir}")

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> tuple[float, float | None]:
        """Mean next-token CE over the fixed validation batches, and bits per byte if known."""
        self.model.eval()
        # under fsdp the same number of forwards (collectives) on every rank; padding ones not counted
        mine = (fsdp.even_share(self.val, self.rt.rank, self.rt.world_size) if self.fsdp
                else [(b, True) for b in self.val[self.rt.rank::self.rt.world_size]])
        total = torch.zeros(2, dtype=torch.float64, device=self.rt.device)
        for (x, y), counts in mine:
            x, y = x.to(self.rt.device), y.to(self.rt.device)
            with self.rt.autocast():
                loss = self.model(x, targets=y)
            if counts:
                total[0] += loss.double() * y.numel()
                total[1] += y.numel()
        if self.rt.distributed:
            dist.all_reduce(total)
        self.model.train()
        val_loss = (total[0] / total[1].clamp(min=1)).item()
        tpb = self.data.val_tokens_per_byte
        return val_loss, (val_loss * tpb / math.log(2) if tpb else None)

    def train_step(self, step: int, source: Any = None) -> tuple[float, float, bool]:
        """One optimizer step: (loss averaged over ranks, grad norm, skipped). ``source`` yields the
        step's micro-batches in order (sync or async); without one they are computed here. Time
        spent waiting for data goes to ``data_wait_s``. A non-finite loss or grad norm on any rank
        skips the update on every rank, leaving weights and optimizer state untouched."""
        t = self.cfg.training
        lr_f, wd_f = schedule_factors(step, self.total_steps, t)
        set_lr(self.optimizers, lr_f)
        if t.lr_schedule != "wsd":  # the two-stage schedules turn weight decay off in their second stage
            set_weight_decay(self.optimizers, wd_f)
        self._apply_act_schedule(step)
        if self.qat.enabled:
            self.qat.apply(self.model, step)
        stat_sums: dict[str, torch.Tensor] = {}
        self.data_wait_s = 0.0
        for micro in range(t.grad_accum_steps):
            tw = time.perf_counter()
            x, y = source.next() if source is not None else self.batches.get(step, micro)
            self.data_wait_s += time.perf_counter() - tw
            x = x.to(self.rt.device, non_blocking=True)
            y = y.to(self.rt.device, non_blocking=True)
            if self.distiller is not None:
                self.distiller.prepare(x)  # the teacher's logits for this micro-batch
            last = micro == t.grad_accum_steps - 1
            # a fresh context per use: DDP's no_sync() is a one-shot generator context manager
            def sync(last: bool = last) -> contextlib.AbstractContextManager:
                return (fsdp.gradient_sync(self.model, last) if self.fsdp else
                        self.ddp.no_sync() if (self.rt.distributed and not last) else contextlib.nullcontext())
            with sync(), self.rt.autocast():
                loss, stats = self.ddp(x, targets=y, objective=self.objective)
            if self.in_backward is not None:
                self.in_backward.begin_micro_batch(micro)
            with sync():
                (loss / t.grad_accum_steps).backward()
            for k, v in stats.items():
                stat_sums[k] = stat_sums.get(k, 0.0) + v.float()
        # logged per step: plain next-token CE as ``loss``; mtp_ce_k / kept_frac when enabled
        means = {k: v / t.grad_accum_steps for k, v in stat_sums.items()}
        self.step_stats = {k: float(v) for k, v in means.items() if k != "ce"}
        if self.in_backward is not None:  # Muon matrices already stepped; clip by the previous step's norm
            grad_norm = self.in_backward.finish_step()
        else:
            max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")
            clip = fsdp.clip_grad_norm if self.fsdp else torch.nn.utils.clip_grad_norm_
            grad_norm = clip(self.model.parameters(), max_norm)
        # one collective: the mean loss over ranks and whether any rank saw a non-finite value
        ce = means["ce"].detach().double()
        both = torch.stack([ce, (~torch.isfinite(ce) | ~torch.isfinite(grad_norm.detach())).double()])
        if self.rt.distributed:
            dist.all_reduce(both)
        loss_mean, nonfinite = both[0].item() / self.rt.world_size, bool(both[1].item() > 0)
        if not nonfinite:
            for opt in self.optimizers:
                opt.step()
        self.model.zero_grad(set_to_none=True)
        return loss_mean, float(grad_norm), nonfinite

    def _apply_act_schedule(self, step: int) -> None:
        """int8 activations before ``act_quant_switch_step``, the model's ``act_quant`` from there on
        (BitNet a4.8's two-stage recipe); with no switch step, ``act_quant`` throughout. A pure
        function of the step, so a resumed run lands in the right stage."""
        t = self.cfg.training
        want = self.cfg.model.act_quant if step >= t.act_quant_switch_step else "int8"
        if self.model.act_quant != want:
            self.model.set_act_quant(want)

    def fit(self) -> TrainResult:
        try:
            return self._fit()
        finally:
            self.close()

    def _fit(self) -> TrainResult:
        cfg, t, rt = self.cfg, self.cfg.training, self.rt
        self.echo(format_config(cfg))
        n_params = self.model.num_params()
        self.echo(f"model: {n_params / 1e6:.2f}M params ({self.model.num_params(non_embedding=True) / 1e6:.2f}M "
                  f"non-embedding), quantization={cfg.model.quantization}, device={rt.device}, "
                  f"world_size={rt.world_size}")
        self.echo(f"data: {self.data.describe()['name']}: {len(self.data.train):,} train tokens, "
                  f"{len(self.data.val):,} val tokens; {self.tokens_per_step:,} tokens/step, "
                  f"{self.total_steps} steps ({self.total_steps / self.batches.steps_per_epoch:.2f} epochs)")
        self.echo(f"run dir: {self.run_dir}")
        for recipe in (self.qat if self.qat.enabled else None, self.distiller):
            if recipe is not None:
                self.echo(recipe.line())
        result = TrainResult(run_dir=self.run_dir, final_checkpoint=None, step=self.start_step)
        if self.start_step >= self.total_steps:
            self.echo(f"nothing to do: already at step {self.start_step} of {self.total_steps}")
            return result

        logger = MetricsLogger(t.log_file, t.tensorboard, enabled=rt.is_main, warn=self.warn)
        bar = tqdm(total=self.total_steps, initial=self.start_step, disable=not rt.is_main, unit="step",
                   dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
        self.model.train()
        t0 = time.perf_counter()
        interval_t0, interval_steps = t0, 0
        last_metrics: dict[str, Any] = {}
        guard = NonFiniteGuard(t.max_consecutive_skips)
        stops = StopRequests(announce=rt.is_main)
        opt_report_done = False
        source = make_batch_source(self.batches, self.start_step, self.total_steps,
                                   use_async=t.use_async_loader, num_workers=t.num_workers,
                                   prefetch_batches=t.prefetch_batches, device=rt.device)
        interval_wait = 0.0
        step = self.start_step
        gpu = GpuUtilization(rt.device)  # NVML busy share, logged as gpu_util (gpu_monitor.py)
        if rt.device.type == "cuda" and not gpu.available:
            self.warn(f"note: GPU utilization is not measured ({gpu.unavailable_reason}); "
                      f"pip install nvidia-ml-py to log gpu_util")
        try:
            with stops:
                for step in range(self.start_step, self.total_steps):
                    ts = time.perf_counter()
                    try:
                        loss, grad_norm, skipped = self.train_step(step, source)
                    except Exception as e:
                        if self.compiled and is_compile_error(e):
                            raise UserError(compile_error_line(e)) from None
                        raise
                    done = step + 1  # the weights now hold step `done` (its update, or its skip)
                    result.step_times.append(time.perf_counter() - ts)
                    if self.compiled and step == self.start_step:
                        result.compile_s = result.step_times[-1]
                        if rt.is_main:
                            bar.write(f"torch.compile: first step {result.compile_s:.1f} s (compiling the blocks and "
                                      f"the loss head); later steps run the compiled code")
                    gpu.start()  # after the first step: compiling is not GPU work
                    if step == t.act_quant_switch_step > 0 and rt.is_main:
                        bar.write(f"step {step}: activations switch from int8 to {cfg.model.act_quant}")
                    if self.qat.enabled and step == self.qat.start and step > 0 and rt.is_main:
                        bar.write(f"step {step}: continual QAT switches from full precision to ternary")
                    result.data_waits.append(self.data_wait_s)
                    result.step_stats.append(dict(self.step_stats))
                    interval_wait += self.data_wait_s
                    self.tokens_seen += self.tokens_per_step
                    interval_steps += 1
                    if not opt_report_done and not skipped:
                        self.echo(optimizer_memory_line(self.optimizers))
                        opt_report_done = True
                    result.losses[done] = loss
                    guard.record(done, skipped)
                    if skipped:
                        result.skipped_steps.append(done)
                        self.warn(guard.skip_line(done, loss, grad_norm))
                    is_log = (done % t.log_interval == 0 or done == self.total_steps or done == self.start_step + 1
                              or skipped)
                    is_eval = ((t.eval_interval > 0 and done % t.eval_interval == 0) or done == self.total_steps) \
                        and not guard.exhausted
                    if is_log or is_eval:
                        now = time.perf_counter()
                        rec: dict[str, Any] = {
                            "step": done,
                            "loss": loss,
                            "lr": float(self.optimizers[0].param_groups[0]["lr"]),
                            "grad_norm": grad_norm,
                            "tok_per_s": interval_steps * self.tokens_per_step / max(now - interval_t0, 1e-9),
                            "elapsed_s": now - t0,
                            "tokens_seen": self.tokens_seen,
                            # mean seconds per step spent waiting for the batch (since the last record)
                            "data_wait_s": interval_wait / interval_steps,
                            "skipped_steps": guard.total,  # non-finite steps skipped so far in this process
                            **({"gpu_util": u} if (u := gpu.take()) is not None else {}),
                            **({"skipped": True} if skipped else {}),
                            **{k: self.rt.all_reduce_mean(v) for k, v in self.step_stats.items()},
                        }
                        interval_t0, interval_steps, interval_wait = now, 0, 0.0
                        if is_eval:
                            rec["val_loss"], rec["val_bpb"] = self.evaluate()
                            result.val_loss, result.val_bpb = rec["val_loss"], rec["val_bpb"]
                            result.val_curve[done] = rec["val_loss"]
                            bpb = f" bpb {rec['val_bpb']:.3f}" if rec["val_bpb"] is not None else ""
                            if rt.is_main:  # tqdm.write is a classmethod: it ignores disable=
                                bar.write(f"step {done:>6} | loss {loss:.4f} | val_loss {rec['val_loss']:.4f}{bpb}")
                        logger.log(rec)
                        if not skipped:
                            last_metrics = rec
                        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tok_per_s']:.0f}",
                                        refresh=False)
                    bar.update(1)
                    if guard.exhausted:
                        raise guard.diverged(done, self.last_checkpoint)
                    if t.checkpoint_interval > 0 and done % t.checkpoint_interval == 0 and done != self.total_steps:
                        self._save_or_warn(done, last_metrics)
                    if done < self.total_steps and rt.any_rank(stops.requested):
                        raise self._preempted(done, stops.name, last_metrics)
                bar.close()
                # still under the handlers: a signal now waits for the final checkpoint
                result.step = self.total_steps
                result.final_checkpoint = self._save_on_exit(self.total_steps, last_metrics,
                                                             f"training finished at step {self.total_steps}")
        except RuntimeError as e:
            if not (rt.distributed and is_comm_failure(e)):
                raise
            # another rank died: say so in one line (its own message is above, under torchrun)
            where = f"; last checkpoint: {self.last_checkpoint or 'none'}" if rt.is_main else ""
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserError(f"rank {rt.rank}: lost contact with the other ranks during step {step + 1} ({first}); "
                            f"another rank failed or was killed, see its message{where}") from None
        except KeyboardInterrupt:
            self.warn(f"interrupted again: stopped at once without saving (the step in flight may be half "
                      f"applied); last checkpoint: {self.last_checkpoint or 'none'}")
            raise
        finally:
            gpu.stop()
            result.gpu_util = gpu.overall()
            bar.close()
            logger.close()
            source.close()  # stops loader workers on normal exit, error and Ctrl-C alike
        if not rt.is_main:
            result.final_checkpoint = None
        if result.final_checkpoint is not None:
            self.echo(f"checkpoint: {result.final_checkpoint}")
        if t.sample_tokens > 0 and self.fsdp and self.data.tokenizer_path is not None:
            self.echo(f"note: no sample under parallelism = 'fsdp' (the weights are sharded); sample the "
                      f"checkpoint with: nanochat-train generate --checkpoint {result.final_checkpoint}")
        elif t.sample_tokens > 0 and rt.is_main and self.data.tokenizer_path is not None:
            result.sample = sample_text(self.model, self.data.tokenizer_path, t, self.echo)
        return result
