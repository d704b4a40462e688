"""Per-rank memory and communication of one training step, DDP vs FSDP (+ sharded Muon), on gloo ranks.

    PYTHONPATH=src python benchmarks/fsdp_memory.py [--ranks 2 4] [--dim 256 --layers 4 --vocab 4096]
                                                    [--seq 64 --batch 2] [--steps 2] [--json out.json]

For each world size and each mode, ``W`` CPU processes (gloo, 1 thread each) build the GPT, wrap it
(``DistributedDataParallel``, or ``fully_shard`` per block + root with :class:`ShardedMuon` and
AdamW on the shards), and run ``--steps`` optimizer steps on random tokens. Then, on each rank:

* **memory** is measured from the tensors themselves: parameter bytes (each tensor's local shard,
  a tied weight once), gradient bytes (local shards, before zeroing), optimizer-state bytes
  (``optimizer_state_bytes``: every state tensor's local storage). DDP's reducer buckets (a second
  copy of the gradients unless ``gradient_as_bucket_view``) are not counted: the DDP figure is a
  lower bound.
* **communication** is counted in the collectives the step calls, per rank and per step (the last
  step): ``torch.distributed``'s Python collectives are wrapped (FSDP2's all-gather and
  reduce-scatter, sharded Muon's all-to-all, DDP Muon's all-gather, the loss / grad-norm
  all-reduces) and DDP's gradient all-reduce is counted by a comm hook on its buckets. ``payload``
  is the collective's tensor size as the rank sees it: all-gather output, reduce-scatter input,
  all-reduce buffer, all-to-all send buffer.

Modelled NCCL bytes sent per rank per step (ring algorithms, ``W`` ranks, payload ``S``):
``all_gather, reduce_scatter, all_to_all: S (W - 1) / W``; ``all_reduce: 2 S (W - 1) / W``.
Gloo's algorithms differ (it is CPU-side); the payload column is what both move.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
import kit  # noqa: E402

from nanochat_ternary.config import ModelConfig, TrainConfig  # noqa: E402
from nanochat_ternary.model.gpt import GPT  # noqa: E402
from nanochat_ternary.optim.factory import build_optimizers, optimizer_state_bytes  # noqa: E402
from nanochat_ternary.optim.sharded_muon import ShardedMuon, build_sharded_optimizers  # noqa: E402
from nanochat_ternary.train import fsdp  # noqa: E402
from nanochat_ternary.train.runtime import Runtime  # noqa: E402

# torch >= 2.13 names FSDP2's collectives all_gather_single / reduce_scatter_single (the *_tensor ones before)
WRAPPED = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor",
           "reduce_scatter_single", "all_to_all_single", "broadcast")
RING_FACTOR = {"all_reduce": 2.0}  # x (W - 1) / W; every other op 1.0


def _payload(name: str, args: tuple, kwargs: dict) -> int:
    """Bytes of the collective's tensor as this rank sees it (see the module docstring)."""
    if name == "all_gather":
        return sum(t.nbytes for t in (kwargs.get("tensor_list") or args[0]))
    if name in ("all_gather_into_tensor", "all_gather_single"):
        return (kwargs["output_tensor"] if "output_tensor" in kwargs else args[0]).nbytes
    if name in ("reduce_scatter_tensor", "reduce_scatter_single"):
        return (kwargs["input"] if "input" in kwargs else args[1]).nbytes
    if name == "all_to_all_single":
        return (kwargs.get("input") if "input" in kwargs else args[1]).nbytes
    return (kwargs.get("tensor") if "tensor" in kwargs else args[0]).nbytes


class CommCounter:
    """Wraps torch.distributed's collectives; ``counts[op]`` = payload bytes since the last reset."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = defaultdict(int)
        self.on = False
        for name in WRAPPED:
            orig = getattr(dist, name, None)
            if orig is None:
                continue

            def wrapper(*args, __orig=orig, __name=name, **kwargs):
                if self.on:
                    self.counts[__name] += _payload(__name, args, kwargs)
                return __orig(*args, **kwargs)

            setattr(dist, name, wrapper)

    def ddp_hook(self, state, bucket):  # DDP's gradient all-reduce, bucket by bucket
        if self.on:
            self.counts["all_reduce"] += bucket.buffer().nbytes
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        return allreduce_hook(state, bucket)


def _local_nbytes(t: torch.Tensor) -> int:
    return (t.to_local() if hasattr(t, "to_local") else t).nbytes


def _rank_main(rank: int, world: int, port: int, mode: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    counter = CommCounter()
    try:
        rt = Runtime(device=torch.device("cpu"), rank=rank, world_size=world)
        mcfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=max(1, args.dim // 64),
                           n_kv_heads=max(1, args.dim // 64), vocab_size=args.vocab, max_seq_len=args.seq)
        tcfg = TrainConfig(seed=0)
        torch.manual_seed(0)
        model = GPT(mcfg)
        if mode == "fsdp":
            fsdp.shard_model(model, rt)
            opts = build_sharded_optimizers(model, tcfg)
            run, clip = model, fsdp.clip_grad_norm
        else:
            opts = build_optimizers(model, tcfg, rt.device)
            run = torch.nn.parallel.DistributedDataParallel(model)
            run.register_comm_hook(None, counter.ddp_hook)
            clip = torch.nn.utils.clip_grad_norm_
        g = torch.Generator().manual_seed(rank)
        times = {"step_s": [], "muon_s": []}
        rec: dict[str, float] = {}
        for step in range(args.steps):
            counter.counts.clear()
            counter.on = step == args.steps - 1
            x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
            t0 = time.perf_counter()
            loss = run(x, targets=x)
            loss.backward()
            norm = clip(model.parameters(), 1.0)
            both = torch.stack([loss.detach().double(), norm.detach().double()])
            dist.all_reduce(both)  # the trainer's one collective: mean loss and non-finite flag
            tm = time.perf_counter()
            opts[0].step()
            times["muon_s"].append(time.perf_counter() - tm)
            for opt in opts[1:]:
                opt.step()
            times["step_s"].append(time.perf_counter() - t0)
            if step == args.steps - 1:
                seen: set[int] = set()
                params = [p for p in model.parameters() if not (id(p) in seen or seen.add(id(p)))]
                rec = {"param_bytes": sum(_local_nbytes(p) for p in params),
                       "grad_bytes": sum(_local_nbytes(p.grad) for p in params if p.grad is not None),
                       "optim_bytes": sum(optimizer_state_bytes(o) for o in opts),
                       "muon_state_bytes": optimizer_state_bytes(opts[0]),
                       "muon_sharded": isinstance(opts[0], ShardedMuon)}
            model.zero_grad(set_to_none=True)
        counter.on = False
        rec.update(comm=dict(counter.counts), step_s=times["step_s"][-1], muon_s=times["muon_s"][-1])
        torch.save(rec, os.path.join(out, f"{mode}_{world}_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nccl_bytes(comm: dict[str, int], world: int) -> float:
    """Modelled bytes each rank sends per step with NCCL's ring algorithms (module docstring)."""
    return sum(RING_FACTOR.get(op, 1.0) * n * (world - 1) / world for op, n in comm.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    head = kit.header("fsdp_memory", **{k: v for k, v in vars(args).items() if k != "json"})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.ranks:
            for mode in ("ddp", "fsdp"):
                mp.spawn(_rank_main, args=(world, _free_port(), mode, args, tmp), nprocs=world, join=True)
                recs = [torch.load(Path(tmp) / f"{mode}_{world}_{r}.pt") for r in range(world)]
                worst = max(recs, key=lambda r: r["param_bytes"] + r["grad_bytes"] + r["optim_bytes"])
                rows.append({"world": world, "mode": mode, **worst,
                             "state_bytes": worst["param_bytes"] + worst["grad_bytes"] + worst["optim_bytes"],
                             "payload_bytes": sum(worst["comm"].values()),
                             "nccl_bytes": nccl_bytes(worst["comm"], world)})
    mib = 2 ** 20
    print("| ranks | mode | params MiB | grads MiB | optimizer MiB | total MiB | vs ddp | collective payload MiB/step "
          "| NCCL-modelled sent MiB/step | Muon step s | step s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(b for b in rows if b["world"] == r["world"] and b["mode"] == "ddp")
        ops = ", ".join(f"{k} {v / mib:.2f}" for k, v in sorted(r["comm"].items()))
        print(f"| {r['world']} | {r['mode']} | {r['param_bytes'] / mib:.2f} | {r['grad_bytes'] / mib:.2f} | "
              f"{r['optim_bytes'] / mib:.2f} | {r['state_bytes'] / mib:.2f} | "
              f"{r['state_bytes'] / base['state_bytes']:.3f} | {r['payload_bytes'] / mib:.2f} ({ops}) | "
              f"{r['nccl_bytes'] / mib:.2f} | {r['muon_s']:.3f} | {r['step_s']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({**head, "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
