"""AdamW's state formats side by side on one model's AdamW parameters (embedding, head, norms).

Compared: torch's fp32 AdamW (the reference, as the factory builds it), our ``AdamW8bit`` (int8
``r = m / sqrt(v)`` + bf16 ``v``), FOAM at several fold levels (``AdamWFoam``; also with the
authors' second moment, ``v_fold = mean_of_squares``, at one level), and torchao's ``AdamW8bit``
when ``import torchao.optim`` works. Ours are built through the factory
(``adamw_state = ...``), with the preset's ``adam_lr``, betas and eps and no weight decay.

Reported per format:
* **state**: bytes of the tensors in the optimizer's state after the run (``optimizer_state_bytes``),
  and per parameter;
* **step time**: median over ``--rounds`` of one ``step()``, the formats interleaved in each round
  so that a change of machine load hits all alike (torchao's first, compiling step is excluded and
  reported on its own);
* **drift** after ``--steps`` steps on the same gradient stream: ``||p - p_fp32|| / ||p_fp32 - p_0||``
  over all AdamW parameters, the distance to fp32 AdamW's weights over the distance those moved.

The gradient stream is real: the model's gradients at its initial weights on ``--steps`` batches of
random tokens, computed once and fed to every format, so the formats differ only in the optimizer.

    python benchmarks/adamw_state.py                         # d20, vocab 4096, 20 steps, ~1-2 min
    python benchmarks/adamw_state.py --levels 1 2 3 4 5 --steps 50 --no-torchao
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable

import kit  # benchmarks/kit.py: provenance, interleaved timing
import torch
from torch.nn import Parameter

from nanochat_ternary.config import build_config
from nanochat_ternary.model.gpt import GPT
from nanochat_ternary.optim.factory import _build, optimizer_state_bytes, split_named_params
from nanochat_ternary.optim.foam import AdamWFoam


def gradient_stream(model: GPT, params: list[Parameter], steps: int, batch: int, seq: int,
                    seed: int) -> list[list[torch.Tensor]]:
    """``steps`` gradients of ``params`` (the model's AdamW parameters) at the initial weights, one per
    batch of uniform random tokens."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.vocab_size
    out = []
    for _ in range(steps):
        idx = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        model.zero_grad(set_to_none=True)
        model(idx[:, :-1], idx[:, 1:]).backward()
        out.append([p.grad.detach().clone() for p in params])
    model.zero_grad(set_to_none=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="d20")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--levels", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--steps", type=int, default=20, help="steps of the drift run (= gradients computed)")
    ap.add_argument("--rounds", type=int, default=9, help="timed steps per format (interleaved)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-torchao", action="store_true", help="leave torchao's AdamW8bit out (its first step "
                    "compiles for ~25 s per shape on a CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    cfg = build_config(args.preset, None, None, [f"vocab_size={args.vocab}", f"seq_len={args.seq}",
                                                 f"seed={args.seed}"])
    torch.manual_seed(args.seed)
    model = GPT(cfg.model)
    _, named = split_named_params(model)
    params = [p for _, p in named]
    start = [p.detach().clone() for p in params]
    t0 = time.perf_counter()
    grads = gradient_stream(model, params, args.steps, args.batch, args.seq, args.seed)
    t_grads = time.perf_counter() - t0
    t = cfg.training

    def ours(**kw) -> Callable[[list[Parameter]], torch.optim.Optimizer]:
        return lambda ps: _build([], ps, dataclasses.replace(t, **kw), torch.device("cpu"))[0]

    formats: dict[str, Callable[[list[Parameter]], torch.optim.Optimizer]] = {
        "fp32 AdamW (torch)": ours(adamw_state="fp32"),
        "AdamW8bit (ours)": ours(adamw_state="8bit"),
    }
    for lv in args.levels:
        formats[f"FOAM l={lv}"] = ours(adamw_state="foam", foam_fold_level=lv)
    mid = args.levels[len(args.levels) // 2]
    formats[f"FOAM l={mid} mean(g^2)"] = lambda ps: AdamWFoam(ps, lr=t.adam_lr, betas=tuple(t.adam_betas),
                                                              eps=t.adam_eps, fold_level=mid, v_fold="mean_of_squares")
    note = ""
    if not args.no_torchao:
        try:
            import torchao.optim

            formats["AdamW8bit (torchao)"] = lambda ps: torchao.optim.AdamW8bit(
                ps, lr=t.adam_lr, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=0.0)
        except Exception as e:  # not installed, or a build that does not import here
            note = f"torchao left out: import torchao.optim failed ({type(e).__name__}: {e})"
    else:
        note = "torchao left out (--no-torchao)"

    # drift run: every format from the same start on the same gradients
    runs: dict[str, tuple[list[Parameter], torch.optim.Optimizer]] = {}
    first_step: dict[str, float] = {}
    for name, make in formats.items():
        ps = [Parameter(s.clone()) for s in start]
        opt = make(ps)
        for k, gs in enumerate(grads):
            for p, gr in zip(ps, gs):
                p.grad = gr.clone()
            t1 = time.perf_counter()
            opt.step()
            if k == 0:
                first_step[name] = time.perf_counter() - t1
        runs[name] = (ps, opt)
    after = {name: torch.cat([p.detach().flatten() for p in ps]) for name, (ps, _) in runs.items()}
    ref = after["fp32 AdamW (torch)"]
    moved = (ref - torch.cat([s.flatten() for s in start])).norm()
    drift = {name: float((w - ref).norm() / moved) for name, w in after.items()}

    # step time: one step of each format per round, the formats interleaved
    rounds = {name: 0 for name in runs}

    def one_step(name: str) -> float:
        """One step of a format on round r's gradients (set untimed), timed."""
        ps, opt = runs[name]
        for p, gr in zip(ps, grads[rounds[name] % len(grads)]):
            p.grad = gr.clone()
        rounds[name] += 1
        t1 = time.perf_counter()
        opt.step()
        return time.perf_counter() - t1

    times = kit.interleaved({name: (lambda n=name: one_step(n)) for name in runs}, reps=args.rounds, warmup=0,
                            self_timed=True)

    n = sum(s.numel() for s in start)
    kit.header("adamw_state", preset=args.preset, vocab=args.vocab, steps=args.steps, rounds=args.rounds)
    print(f"# {args.preset}, vocab {args.vocab}: AdamW params {n:,} in {len(start)} tensors "
          f"(largest {tuple(max(start, key=lambda s: s.numel()).shape)}); adam_lr {t.adam_lr}, betas "
          f"{tuple(t.adam_betas)}; {args.steps} steps of real gradients ({args.batch} x {args.seq} random tokens, "
          f"{t_grads:.1f} s to compute); step time median of {args.rounds}")
    if note:
        print(f"# {note}")
    print(f"{'format':<24} {'state MiB':>10} {'B/param':>8} {'vs fp32':>8} {'ms/step':>9} {'drift':>9}")
    fp32_bytes = optimizer_state_bytes(runs["fp32 AdamW (torch)"][1])
    for name, (_, opt) in runs.items():
        nbytes = optimizer_state_bytes(opt)
        print(f"{name:<24} {nbytes / 2**20:>10.3f} {nbytes / n:>8.3f} {nbytes / fp32_bytes:>8.3f} "
              f"{1e3 * times[name].median:>9.2f} {drift[name]:>9.4f}")
    if "AdamW8bit (torchao)" in first_step:
        print(f"# torchao's first step (torch.compile of its step): {first_step['AdamW8bit (torchao)']:.1f} s")
    print(f"# total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
