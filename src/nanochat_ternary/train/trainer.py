"""The training loop: one optimizer step, then the policies that decide what follows it.

    for step in range(start, total):                                   (Trainer._fit)
        train_step(step):
            set lr from the schedule
            for each micro-batch:  objective.prepare(x);  loss = objective(model(x), y) / accum;
                                   loss.backward()   (DDP all-reduces)
            clip the global grad norm
            if loss and grad norm are finite:  Muon.step() on hidden matrices;  AdamW.step() on the rest
            else: skip the update (guard.py: counted, logged, stop after too many in a row)
            (optimizer_in_backward: Muon steps each matrix inside backward(), optim/in_backward.py)
        log · evaluate · checkpoint · stop, each when its policy says (policies.py)

The parts, each in its own module: the objective (objective.py; sft.py's masked targets and
distill.py's teacher plug in there), where the run starts (start.py: resume, warm start, FIRE),
the checkpointer (checkpointer.py), the policies (policies.py), the optional task evaluation
(task_eval.py).

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

from ..checkpoint import files as ckpt_io
from ..config import Config, TrainConfig, format_config
from ..data.batches import TokenBatches, val_batches
from ..data.loader import make_batch_source
from ..errors import UserError
from ..model.compile import compile_enabled, compile_error_line, is_compile_error
from ..model.gpt import GPT
from ..optim.factory import build_optimizers
from ..optim.in_backward import install_in_backward
from ..optim.sharded_muon import build_sharded_optimizers
from . import fsdp
from .checkpointer import Checkpointer
from .checkpointing import checkpoint_meta, choose_run_dir
from .dataset import LoadedData, load_training_data
from .fingerprint import data_fingerprint
from .gpu_monitor import GpuUtilization
from .guard import NonFiniteGuard
from .lock import RunLock
from .metrics import MetricsLogger
from .objective import TrainObjective, build_objective
from .policies import CheckpointPolicy, EvalPolicy, LogPolicy, StepOutcome, StopPolicy
from .qat import QatSchedule
from .reports import optimizer_memory_line, sample_text
from .runtime import Runtime, is_comm_failure
from .schedule import schedule_factors, set_lr, set_weight_decay
from .signals import StopRequests
from .start import StartPoint, check_start, fire_once, open_start, restore
from .task_eval import TaskEval


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
    task_metrics: dict[str, float] = field(default_factory=dict)  # eval_tasks' fields at the last evaluation


def round_up(n: int, multiple: int) -> int:
    return multiple * math.ceil(n / multiple)


OptimizerFactory = Callable[[torch.nn.Module, TrainConfig], list[torch.optim.Optimizer]]


@dataclass
class _Loop:
    """What one ``fit`` holds while it runs: its sinks, its batch source and its policies."""

    logger: MetricsLogger
    bar: Any  # tqdm
    source: Any  # the batch source (data/loader.py)
    gpu: GpuUtilization
    log: LogPolicy
    evaluate: EvalPolicy
    checkpoint: CheckpointPolicy
    stop: StopPolicy
    last_metrics: dict[str, Any] = field(default_factory=dict)  # the newest record of an unskipped step
    opt_report_done: bool = False

    def close(self, result: TrainResult) -> None:
        self.gpu.stop()
        result.gpu_util = self.gpu.overall()
        self.bar.close()
        self.logger.close()
        self.source.close()  # stops loader workers on normal exit, error and Ctrl-C alike


class Trainer:
    """``optimizer_factory`` replaces the config's optimizers (the benchmark's peers use it); every
    param group it returns must carry ``initial_lr`` for the schedule. ``objective`` replaces the
    config's objective (objective.py's :class:`TrainObjective`); ``task`` another kind of data
    (sft.py's SFTTask: conversations, masked targets, chat tokens; None: the config's corpus)."""

    def __init__(self, cfg: Config, runtime: Runtime, echo: Callable[[str], None] = print,
                 optimizer_factory: OptimizerFactory | None = None, task: Any = None,
                 objective: TrainObjective | None = None) -> None:
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
        # the resume target is read first: it fixes the run dir and the model shape (start.py)
        self.start: StartPoint = open_start(t, task)
        self._load_data()
        self._make_batches()
        self._build_model()
        # the loss: pretraining's, sft's on masked targets, or with a teacher's KL (objective.py)
        self.objective: TrainObjective = objective if objective is not None else build_objective(
            cfg, runtime.device, runtime.autocast, self.fingerprint, compiled=self.compiled,
            # the LM head and CE chunked (no [B*T, V] logits) on CUDA; on CPU only with gradient checkpointing
            chunked_head=t.gradient_checkpointing or runtime.device.type == "cuda")
        # recipes (docs/recipes.md): continual QAT's quantizer mix per step
        self.qat = QatSchedule(t, self.total_steps)
        self.step_stats: dict[str, float] = {}
        self._build_optimizers(optimizer_factory)
        # ---- run dir (locked by the main rank until the run ends)
        self.lock: RunLock | None = None
        self.run_dir, self.lock = choose_run_dir(cfg, runtime, self.start.resume_ckpt, self.echo, self.warn)
        self.ckpt = Checkpointer(
            self.run_dir, runtime, self.model, self.optimizers, lambda step, m: checkpoint_meta(self, step, m),
            in_backward=self.in_backward, fsdp=self.fsdp, keep_last=t.keep_last_checkpoints,
            resumed_from=self.start.resume_ckpt, tokenizer_path=self.data.tokenizer_path,
            make_model=lambda: fsdp.empty_cpu_model(self.cfg.model), command=self.command, warn=self.warn)
        self.start_step = 0
        self.tokens_seen = 0
        try:
            self._begin()
        except BaseException:
            self.close()
            raise

    # what checkpoint meta records of the start (checkpointing.py)
    @property
    def fire_done(self) -> dict[str, Any] | None:
        return self.start.fire_done

    @property
    def warm_record(self) -> dict[str, Any] | None:
        return self.start.warm_record

    @property
    def last_checkpoint(self) -> Path | None:
        """The newest good checkpoint, named when things fail."""
        return self.ckpt.last

    def _load_data(self) -> None:
        """The data (the main rank prepares and caches; the others wait, then read the cache), the
        vocab fitted to its tokenizer, its fingerprint checked against what is resumed."""
        cfg, task, warm = self.cfg, self.task, self.start.warm
        self.data: LoadedData = (task.load_data if task is not None else load_training_data)(
            cfg, self.rt, tokenizer=warm.tokenizer_path if warm else None)
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
        check_start(self.start, self.fingerprint, self.data.tokenizer_path, m, cfg.training.allow_data_change,
                    self.warn, warm_ignore=getattr(task, "warm_ignore", ()))

    def _make_batches(self) -> None:
        """The batches, a pure function of (seed, step, micro, rank), and the run's length."""
        t, rt = self.cfg.training, self.rt
        if self.task is not None:
            self.batches, self.val = self.task.batches(self.data, t, rt)
        else:
            self.batches = TokenBatches(self.data.train, t.batch_size, t.seq_len, t.seed, rank=rt.rank,
                                        world_size=rt.world_size, grad_accum_steps=t.grad_accum_steps)
            self.val = val_batches(self.data.val, t.batch_size, t.seq_len, t.eval_batches)
        self.tokens_per_step = t.batch_size * t.seq_len * t.grad_accum_steps * rt.world_size
        if t.total_steps > 0:
            self.total_steps = t.total_steps
        else:
            epochs = t.epochs if t.epochs > 0 else 1.0
            self.total_steps = max(1, math.ceil(epochs * self.batches.steps_per_epoch))

    def _build_model(self) -> None:
        t, rt = self.cfg.training, self.rt
        torch.manual_seed(t.seed)
        # built on its device: a CUDA model is initialised there (seconds for billions of weights)
        with torch.device(rt.device):
            self.model = GPT(self.cfg.model)
        self.model.gradient_checkpointing = t.gradient_checkpointing
        # parallelism = "fsdp" under torchrun: weights, grads and optimizer state sharded (fsdp.py)
        self.fsdp = t.parallelism == "fsdp" and rt.distributed
        # torch.compile (model/compile.py): the blocks and the loss head's softmax, on CUDA by default
        # ("auto" stays eager under fsdp: compiled blocks under fully_shard are not tested yet)
        self.compiled = compile_enabled(t.compile, rt.device) and not self.fsdp
        if self.compiled:
            self.model.compile_blocks()

    def _build_optimizers(self, optimizer_factory: OptimizerFactory | None) -> None:
        t, rt = self.cfg.training, self.rt
        if self.fsdp:
            fsdp.shard_model(self.model, rt)
        if optimizer_factory is not None:
            self.optimizers = optimizer_factory(self.model, t)
        elif self.fsdp:
            self.optimizers = build_sharded_optimizers(self.model, t)
        else:
            self.optimizers = build_optimizers(self.model, t, rt.device)
        # optimizer_in_backward: Muon matrices are updated in backward hooks (optim/in_backward.py)
        self.in_backward = (install_in_backward(self.optimizers, t.grad_accum_steps, t.grad_clip, rt.distributed)
                            if t.optimizer_in_backward else None)
        if t.optimizer_in_backward and t.use_8bit_optim and t.grad_accum_steps > 1 and not t.stochastic_rounding:
            # measured (docs/low_memory.md, Convergence): nearest rounding at every micro-batch lost 0.8-1.8%
            self.warn("note: the in-backward step requantises the int8 momentum at every micro-batch; with "
                      "round-to-nearest that cost +0.8% and +1.8% val loss in matched runs, with stochastic "
                      "rounding -0.1% and -0.8% (docs/low_memory.md): set stochastic_rounding = true")
        self.ddp: torch.nn.Module = self.model
        if rt.distributed and not self.fsdp:
            ids = [rt.device.index] if rt.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)

    def _begin(self) -> None:
        """Load what the run starts from (resume or warm start, then FIRE), then check that no save of
        this run collides with what is in the run dir."""
        start, t = self.start, self.cfg.training
        if start.resume_ckpt is not None:
            self._restore(start.resume_ckpt, start.resume_meta)
        elif start.warm is not None:
            start.warm.load_weights(self.model, getattr(self.task, "new_rows_from", None))
            self.echo(start.warm.line())
        if t.fire and start.loads_weights:
            fire_once(start, self.model, self.optimizers, self.cfg.model.group_size, self.start_step, self.echo)
        if self.rt.is_main:  # a save this run would make must not collide with what is there
            ckpt_io.check_destination(self.run_dir, self.start_step, self.total_steps)

    def _restore(self, ckpt: Path, meta: dict[str, Any]) -> None:
        self.start_step = restore(ckpt, meta, self.model, self.optimizers, self.rt.device, fsdp=self.fsdp,
                                  in_backward=self.in_backward)
        self.tokens_seen = int(meta.get("tokens_seen", self.start_step * self.tokens_per_step))
        self.echo(f"resumed from {ckpt} at step {self.start_step}")

    def close(self) -> None:
        """Release the run dir (idempotent; ``fit`` calls it when it ends, however it ends)."""
        if self.lock is not None:
            self.lock.release()

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
            self.objective.prepare(x)  # e.g. the teacher's logits for this micro-batch (distill.py)
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
        """Steps from ``start_step`` to ``total_steps``, each followed by the policies (policies.py)."""
        self._announce()
        result = TrainResult(run_dir=self.run_dir, final_checkpoint=None, step=self.start_step)
        if self.start_step >= self.total_steps:
            self.echo(f"nothing to do: already at step {self.start_step} of {self.total_steps}")
            return result
        loop = self._open_loop()
        self.model.train()
        step = self.start_step
        try:
            with loop.stop.stops:
                for step in range(self.start_step, self.total_steps):
                    out = self._timed_step(step, loop, result)
                    self._after_step(out, loop, result)
                loop.bar.close()
                # still under the handlers: a signal now waits for the final checkpoint
                result.step = self.total_steps
                result.final_checkpoint = self.ckpt.save_on_exit(self.total_steps, loop.last_metrics,
                                                                 f"training finished at step {self.total_steps}")
        except RuntimeError as e:
            if not (self.rt.distributed and is_comm_failure(e)):
                raise
            raise self._lost_contact(e, step) from None
        except KeyboardInterrupt:
            self.warn(f"interrupted again: stopped at once without saving (the step in flight may be half "
                      f"applied); last checkpoint: {self.last_checkpoint or 'none'}")
            raise
        finally:
            loop.close(result)
        self._finish(result)
        return result

    def _announce(self) -> None:
        cfg, rt = self.cfg, self.rt
        self.echo(format_config(cfg))
        n_params, n_body = self.model.num_params(), self.model.num_params(non_embedding=True)
        self.echo(f"model: {n_params / 1e6:.2f}M params ({n_body / 1e6:.2f}M "
                  f"non-embedding), quantization={cfg.model.quantization}, device={rt.device}, "
                  f"world_size={rt.world_size}")
        self.echo(f"data: {self.data.describe()['name']}: {len(self.data.train):,} train tokens, "
                  f"{len(self.data.val):,} val tokens; {self.tokens_per_step:,} tokens/step, "
                  f"{self.total_steps} steps ({self.total_steps / self.batches.steps_per_epoch:.2f} epochs)")
        self.echo(f"run dir: {self.run_dir}")
        for line in (self.qat.line() if self.qat.enabled else "", self.objective.line()):
            if line:
                self.echo(line)

    def _open_loop(self) -> _Loop:
        """The sinks, the batch source and the policies of one ``fit``."""
        t, rt = self.cfg.training, self.rt
        tasks = TaskEval.from_config(self.cfg, self.model, self.data, rt) if t.eval_tasks else None
        logger = MetricsLogger(t.log_file, t.tensorboard, enabled=rt.is_main, warn=self.warn)
        bar = tqdm(total=self.total_steps, initial=self.start_step, disable=not rt.is_main, unit="step",
                   dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
        # its clock starts before the batch source: the loader's start-up counts in the first tok_per_s, as before
        log = LogPolicy(t.log_interval, self.start_step, self.total_steps, self.tokens_per_step)
        source = make_batch_source(self.batches, self.start_step, self.total_steps,
                                   use_async=t.use_async_loader, num_workers=t.num_workers,
                                   prefetch_batches=t.prefetch_batches, device=rt.device)
        gpu = GpuUtilization(rt.device)  # NVML busy share, logged as gpu_util (gpu_monitor.py)
        if rt.device.type == "cuda" and not gpu.available:
            self.warn(f"note: GPU utilization is not measured ({gpu.unavailable_reason}); "
                      f"pip install nvidia-ml-py to log gpu_util")
        return _Loop(
            logger, bar, source, gpu,
            log=log,
            evaluate=EvalPolicy(t.eval_interval, self.total_steps, lambda: self.evaluate(),
                                tasks.run if tasks is not None else None),
            checkpoint=CheckpointPolicy(t.checkpoint_interval, self.total_steps),
            stop=StopPolicy(NonFiniteGuard(t.max_consecutive_skips), StopRequests(announce=rt.is_main),
                            self.total_steps, rt.any_rank))

    def _timed_step(self, step: int, loop: _Loop, result: TrainResult) -> StepOutcome:
        """``train_step`` and what the run records of every step (time, data wait, stats, loss)."""
        ts = time.perf_counter()
        try:
            loss, grad_norm, skipped = self.train_step(step, loop.source)
        except Exception as e:
            if self.compiled and is_compile_error(e):
                raise UserError(compile_error_line(e)) from None
            raise
        out = StepOutcome(step + 1, loss, grad_norm, skipped)
        result.step_times.append(time.perf_counter() - ts)
        if self.compiled and step == self.start_step:
            result.compile_s = result.step_times[-1]
            self._note(loop, f"torch.compile: first step {result.compile_s:.1f} s (compiling the blocks and "
                             f"the loss head); later steps run the compiled code")
        loop.gpu.start()  # after the first step: compiling is not GPU work
        if step == self.cfg.training.act_quant_switch_step > 0:
            self._note(loop, f"step {step}: activations switch from int8 to {self.cfg.model.act_quant}")
        if self.qat.enabled and step == self.qat.start and step > 0:
            self._note(loop, f"step {step}: continual QAT switches from full precision to ternary")
        result.data_waits.append(self.data_wait_s)
        result.step_stats.append(dict(self.step_stats))
        loop.log.step_done(self.data_wait_s)
        self.tokens_seen += self.tokens_per_step
        if not loop.opt_report_done and not skipped:
            self.echo(optimizer_memory_line(self.optimizers))
            loop.opt_report_done = True
        result.losses[out.done] = loss
        loop.stop.record(out)
        if skipped:
            result.skipped_steps.append(out.done)
            self.warn(loop.stop.guard.skip_line(out.done, loss, grad_norm))
        return out

    def _note(self, loop: _Loop, line: str) -> None:
        if self.rt.is_main:  # tqdm.write is a classmethod: it ignores disable=
            loop.bar.write(line)

    def _after_step(self, out: StepOutcome, loop: _Loop, result: TrainResult) -> None:
        """The policies, in order: log (+ evaluate), stop on divergence, checkpoint, stop on a signal."""
        is_eval = loop.evaluate.due(out, stopping=loop.stop.diverged)
        if loop.log.due(out) or is_eval:
            self._log(out, loop, result, is_eval)
        loop.bar.update(1)
        if loop.stop.diverged:
            raise loop.stop.guard.diverged(out.done, self.last_checkpoint)
        if loop.checkpoint.due(out.done):
            self.ckpt.save_or_warn(out.done, loop.last_metrics)
        if loop.stop.signalled(out.done):
            raise self.ckpt.preempted(out.done, loop.stop.stops.name, loop.last_metrics)

    def _log(self, out: StepOutcome, loop: _Loop, result: TrainResult, is_eval: bool) -> None:
        """One metrics record (with the evaluation when it is due) to the log, the bar and ``result``."""
        extra: dict[str, Any] = {
            "skipped_steps": loop.stop.guard.total,  # non-finite steps skipped so far in this process
            **({"gpu_util": u} if (u := loop.gpu.take()) is not None else {}),
            **({"skipped": True} if out.skipped else {}),
            **{k: self.rt.all_reduce_mean(v) for k, v in self.step_stats.items()},
        }
        rec = loop.log.record(out, float(self.optimizers[0].param_groups[0]["lr"]), self.tokens_seen, extra)
        if is_eval:
            fields, task_s = loop.evaluate.run()
            loop.log.exclude(task_s)  # a task evaluation is not training time: kept out of the next tok/s
            rec.update(fields)
            result.val_loss, result.val_bpb = rec["val_loss"], rec["val_bpb"]
            result.val_curve[out.done] = rec["val_loss"]
            result.task_metrics = {k: v for k, v in fields.items() if k.startswith("task_") and k != "task_eval_s"}
            bpb = f" bpb {rec['val_bpb']:.3f}" if rec["val_bpb"] is not None else ""
            tasks = "".join(f" | {k[5:]} {v:.4f}" for k, v in result.task_metrics.items())
            self._note(loop, f"step {out.done:>6} | loss {out.loss:.4f} | val_loss {rec['val_loss']:.4f}{bpb}{tasks}")
        loop.logger.log(rec)
        if not out.skipped:
            loop.last_metrics = rec
        loop.bar.set_postfix(loss=f"{out.loss:.3f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tok_per_s']:.0f}",
                             refresh=False)

    def _lost_contact(self, e: RuntimeError, step: int) -> UserError:
        """Another rank died: say so in one line (its own message is above, under torchrun)."""
        rt = self.rt
        where = f"; last checkpoint: {self.last_checkpoint or 'none'}" if rt.is_main else ""
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        return UserError(f"rank {rt.rank}: lost contact with the other ranks during step {step + 1} ({first}); "
                         f"another rank failed or was killed, see its message{where}")

    def _finish(self, result: TrainResult) -> None:
        """After the loop: the final checkpoint's name and the sample."""
        t, rt = self.cfg.training, self.rt
        if not rt.is_main:
            result.final_checkpoint = None
        if result.final_checkpoint is not None:
            self.echo(f"checkpoint: {result.final_checkpoint}")
        if t.sample_tokens > 0 and self.fsdp and self.data.tokenizer_path is not None:
            self.echo(f"note: no sample under parallelism = 'fsdp' (the weights are sharded); sample the "
                      f"checkpoint with: nanochat-train generate --checkpoint {result.final_checkpoint}")
        elif t.sample_tokens > 0 and rt.is_main and self.data.tokenizer_path is not None:
            result.sample = sample_text(self.model, self.data.tokenizer_path, t, self.echo)
