"""The trainer's seams (train/trainer.py, policies.py, objective.py, task_eval.py): each policy's
timing on its own, and the loop calling the objective and the policies in a tiny run."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from conftest import SMALL_CPU_RUN, train_small, write_corpus

from nanochat_ternary.cli import _cli_overrides, build_parser
from nanochat_ternary.config import build_config
from nanochat_ternary.train.guard import NonFiniteGuard
from nanochat_ternary.train.objective import Objective
from nanochat_ternary.train.policies import CheckpointPolicy, EvalPolicy, LogPolicy, StepOutcome, StopPolicy
from nanochat_ternary.train.runtime import Runtime
from nanochat_ternary.train.trainer import Trainer

TRAIN = Path(__file__).resolve().parents[1] / "src" / "nanochat_ternary" / "train"


def _out(done: int, skipped: bool = False, loss: float = 1.0) -> StepOutcome:
    return StepOutcome(done, loss, 0.5, skipped)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------------------------------
# the policies' timing


def test_log_policy_logs_intervals_first_last_and_skipped_steps():
    p = LogPolicy(interval=10, first_step=0, total_steps=25, tokens_per_step=1)
    assert [d for d in range(1, 26) if p.due(_out(d))] == [1, 10, 20, 25]
    assert p.due(_out(7, skipped=True))  # every skipped step is on record
    resumed = LogPolicy(interval=10, first_step=13, total_steps=25, tokens_per_step=1)
    assert [d for d in range(14, 26) if resumed.due(_out(d))] == [14, 20, 25]  # the first step of this process


def test_log_policy_measures_throughput_per_interval_and_leaves_excluded_time_out():
    clock = Clock()
    p = LogPolicy(interval=2, first_step=0, total_steps=10, tokens_per_step=64, clock=clock)
    for wait in (0.25, 0.75):
        clock.now += 1.0
        p.step_done(wait)
    rec = p.record(_out(2), lr=0.1, tokens_seen=128, extra={"x": 1})
    assert rec["tok_per_s"] == pytest.approx(2 * 64 / 2.0) and rec["data_wait_s"] == pytest.approx(0.5)
    assert rec["elapsed_s"] == pytest.approx(2.0) and rec["x"] == 1 and rec["lr"] == 0.1
    assert list(rec)[:8] == ["step", "loss", "lr", "grad_norm", "tok_per_s", "elapsed_s", "tokens_seen",
                             "data_wait_s"]  # the JSONL's field order, as before the split
    clock.now += 3.0  # a task evaluation: 3 s that are not training
    p.exclude(3.0)
    clock.now += 1.0
    p.step_done(0.0)
    rec = p.record(_out(3), lr=0.1, tokens_seen=192, extra={})
    assert rec["tok_per_s"] == pytest.approx(64 / 1.0)  # not 64 / 4
    assert rec["elapsed_s"] == pytest.approx(6.0)  # wall time since the start, everything included


def test_eval_policy_evaluates_at_intervals_and_the_end_never_when_stopping():
    p = EvalPolicy(interval=4, total_steps=10, validate=lambda: (1.0, None))
    assert [d for d in range(1, 11) if p.due(_out(d))] == [4, 8, 10]
    assert not p.due(_out(8), stopping=True) and not p.due(_out(10), stopping=True)
    only_end = EvalPolicy(interval=0, total_steps=10, validate=lambda: (1.0, None))
    assert [d for d in range(1, 11) if only_end.due(_out(d))] == [10]


def test_eval_policy_times_the_tasks_apart_from_the_val_loss():
    clock = Clock()

    def validate():
        clock.now += 5.0  # the val loss's time is not the tasks'
        return 2.5, 1.25

    def tasks():
        clock.now += 2.0
        return {"task_t_acc": 0.75}

    fields, spent = EvalPolicy(1, 4, validate, tasks, clock=clock).run()
    assert fields == {"val_loss": 2.5, "val_bpb": 1.25, "task_t_acc": 0.75, "task_eval_s": 2.0} and spent == 2.0
    fields, spent = EvalPolicy(1, 4, validate, None, clock=clock).run()
    assert fields == {"val_loss": 2.5, "val_bpb": 1.25} and spent == 0.0  # off: no task field at all


def test_checkpoint_policy_saves_at_intervals_but_not_the_last_step():
    assert [d for d in range(1, 10) if CheckpointPolicy(3, 9).due(d)] == [3, 6]  # 9: the final save's
    assert not any(CheckpointPolicy(0, 9).due(d) for d in range(1, 10))


class _Stops:
    def __init__(self, requested: bool) -> None:
        self.requested, self.name = requested, "SIGTERM"


def test_stop_policy_diverges_after_consecutive_skips_only():
    stop = StopPolicy(NonFiniteGuard(2), _Stops(False), total_steps=10)
    for done, skipped in [(1, True), (2, False), (3, True)]:
        stop.record(_out(done, skipped))
        assert not stop.diverged  # a finite step between two skips resets the count
    stop.record(_out(4, True))
    assert stop.diverged


def test_stop_policy_asks_every_rank_about_signals_except_after_the_last_step():
    asked: list[bool] = []

    def any_rank(flag: bool) -> bool:
        asked.append(flag)
        return flag

    stop = StopPolicy(NonFiniteGuard(5), _Stops(True), total_steps=10, any_rank=any_rank)
    assert stop.signalled(3) and asked == [True]
    assert not stop.signalled(10) and asked == [True]  # the last step ends the run anyway: its final save
    assert not StopPolicy(NonFiniteGuard(5), _Stops(False), 10, any_rank).signalled(3)


# ---------------------------------------------------------------------------------------------
# the loop: objective and policies


def _config(*args: str):
    ns = build_parser().parse_args(["train", *SMALL_CPU_RUN, *args])
    return build_config(ns.config, ns.config_file, _cli_overrides(ns), ns.set)


class RecordingObjective(Objective):
    """The pretraining objective, recording what the loop hands it."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg.model, cfg.training)
        self.prepared: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def prepare(self, x: torch.Tensor) -> None:
        self.prepared.append(x.clone())

    def __call__(self, model, h, targets):
        self.targets.append(targets.clone())
        return super().__call__(model, h, targets)


def test_the_loop_runs_the_objective_it_is_given_on_every_micro_batch(tmp_path, one_thread):
    cfg = _config("--total-steps", "3", "--set", "grad_accum_steps=2", "--checkpoint-dir", str(tmp_path / "r"))
    obj = RecordingObjective(cfg)
    trainer = Trainer(cfg, Runtime(torch.device("cpu")), echo=lambda _m: None, objective=obj)
    assert trainer.objective is obj
    result = trainer.fit()
    want = [trainer.batches.get(step, micro) for step in range(3) for micro in range(2)]
    assert len(obj.prepared) == len(obj.targets) == 6  # prepare(x), then the call, per micro-batch
    for (x, y), px, ty in zip(want, obj.prepared, obj.targets):
        assert torch.equal(px, x) and torch.equal(ty, y)
    assert sorted(result.losses) == [1, 2, 3]


def test_the_loop_follows_its_policies_in_a_tiny_run(tmp_path, one_thread):
    recs = train_small(tmp_path, "run", "--total-steps", "7", "--log-interval", "3", "--eval-interval", "2",
                       "--checkpoint-interval", "3", "--set", "keep_last_checkpoints=0")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 6, 7]  # log: 1 (first), 3, 6, 7 (last); eval: 2, 4, 6, 7
    assert [r["step"] for r in recs if "val_loss" in r] == [2, 4, 6, 7]
    assert not any(k.startswith("task_") for r in recs for k in r)  # eval_tasks off: no task field
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("step_")) == \
        ["step_000003", "step_000006", "step_000007"]  # interval saves and the final one


def test_the_loop_knows_no_particular_objective():
    """sft (masked targets) and distillation (a wrapping objective) plug in through the objective
    seam: the loop's module names neither."""
    tree = ast.parse((TRAIN / "trainer.py").read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
        {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert not {"Distiller", "distiller", "SFTTask", "Objective"} & names


# ---------------------------------------------------------------------------------------------
# eval_tasks: a chosen evaluation next to the val loss


def _task_file(path: Path) -> Path:
    items = [{"query": f"def f{i}(x):\n    return ", "choices": ["x\n", "None  # nothing\n"], "gold": i % 2}
             for i in range(6)]
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    return path


def _text_run(tmp_path: Path, name: str, *args: str) -> list[dict]:
    corpus = write_corpus(tmp_path / "corpus", n_files=6, n_lines=30)
    return train_small(tmp_path, name, "--dataset", "text", "--data-path", str(corpus),
                       "--set", "tokenizer_vocab_size=300", "--total-steps", "4", "--eval-interval", "2", *args)


def test_eval_tasks_are_logged_with_their_own_time_at_each_evaluation(tmp_path, isolated_cache, one_thread):
    tasks = _task_file(tmp_path / "mini.jsonl")
    recs = _text_run(tmp_path, "on", "--set", f"eval_tasks={tasks},bpb:{tmp_path / 'corpus'},stdlib-next-line",
                     "--set", "eval_task_limit=4")
    evals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        for name in ("mini", "stdlib-next-line"):
            assert 0.0 <= r[f"task_{name}_acc"] <= 1.0 and 0.0 <= r[f"task_{name}_acc_norm"] <= 1.0
        assert r["task_corpus_bpb"] > 0 and r["task_eval_s"] > 0
    assert not any(k.startswith("task_") for r in recs if "val_loss" not in r for k in r)


def test_eval_tasks_off_builds_nothing(tmp_path, isolated_cache, monkeypatch, one_thread):
    from nanochat_ternary.train import task_eval

    def refuse(*_a, **_k):
        raise AssertionError("TaskEval built with eval_tasks off")

    monkeypatch.setattr(task_eval.TaskEval, "from_config", refuse)
    recs = _text_run(tmp_path, "off")
    assert not any(k.startswith("task_") for r in recs for k in r)


@pytest.mark.parametrize("spec,match", [
    ("nope.txt", "eval_tasks: 'nope.txt' is not"),
    ("humaneval", "humaneval"),
    ("missing.jsonl", "missing.jsonl"),
])
def test_bad_eval_tasks_fail_before_training_in_one_line(tmp_path, isolated_cache, capsys, spec, match):
    from nanochat_ternary.cli import main

    corpus = write_corpus(tmp_path / "corpus", n_files=6, n_lines=30)
    rc = main(["train", *SMALL_CPU_RUN, "--dataset", "text", "--data-path", str(corpus), "--set",
               "tokenizer_vocab_size=300", "--total-steps", "2", "--checkpoint-dir", str(tmp_path / "r"),
               "--set", f"eval_tasks={spec}"])
    err = capsys.readouterr().err
    assert rc == 1 and match in err and "Traceback" not in err
    assert not list((tmp_path / "r").glob("step_*"))
