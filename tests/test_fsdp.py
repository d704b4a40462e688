"""parallelism = "fsdp": sharded Muon against a float64 reference, fsdp vs ddp losses under torchrun,
DCP checkpoints that reshard (2 ranks -> 1 process), kill -9 during a DCP save, and the config checks.

Every multi-rank test runs 2 gloo ranks on CPU with a tiny model (dim 64, 2 layers, seq 32)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanochat_ternary.cli import main
from nanochat_ternary.config import ConfigError, TrainConfig
from nanochat_ternary.optim.sharded_muon import balance_owners, ns_flops

A, B, C = 3.4445, -4.7750, 2.0315


pytestmark = pytest.mark.usefixtures("isolated_cache", "one_thread")


# ---------------------------------------------------------------- sharded Muon vs float64 reference

def reference_muon(params, grads_per_step, lrs, wds, mu=0.95, nesterov=True, steps=5):
    """Plain float64 Muon, written from the algorithm (not from the code under test)."""
    params = [p.double().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for i, (p, buf, g) in enumerate(zip(params, bufs, grads)):
            if g is None:
                continue
            g = g.double()
            buf.mul_(mu).add_(g, alpha=1 - mu)
            u = (1 - mu) * g + mu * buf if nesterov else buf
            X = u.T if u.shape[0] > u.shape[1] else u
            X = X / (torch.linalg.matrix_norm(X) + 1e-7)
            for _ in range(steps):
                Am = X @ X.T
                X = A * X + (B * Am + C * Am @ Am) @ X
            ortho = X.T if u.shape[0] > u.shape[1] else X
            p.mul_(1 - lrs[i] * wds[i])
            p.sub_(lrs[i] * max(1.0, p.shape[0] / p.shape[1]) ** 0.5 * ortho)
    return params


# rows not divisible by 2 (25, 3), fewer rows than ranks would be at 4 (3), tall and wide
SHAPES = [(24, 24), (40, 16), (25, 40), (3, 20), (24, 24), (16, 40)]


def _muon_data():
    g = torch.Generator().manual_seed(7)
    init = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(3)]
    grads[1][2] = None  # a matrix without a gradient in step 2
    return init, grads


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_worker(rank, world, port, out_dir, bucket_elements, nesterov):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from nanochat_ternary.optim.sharded_muon import ShardedMuon

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        init, grads = _muon_data()
        params = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in init]
        opt = ShardedMuon([{"params": params[:3]}, {"params": params[3:], "lr": 0.05, "weight_decay": 0.1}],
                          lr=0.02, nesterov=nesterov, bucket_elements=bucket_elements)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = None if g is None else distribute_tensor(g.clone(), mesh, [Shard(0)])
            opt.step()
        out = {"params": [p.full_tensor() for p in params],
               "local_state_bytes": sum(s["momentum_buffer"].to_local().nbytes for s in opt.state.values()),
               "momentum": [opt.state[p]["momentum_buffer"].full_tensor() for p in params]}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bucket_elements,nesterov", [(1 << 20, True), (1000, False)])
def test_sharded_muon_matches_float64_reference(tmp_path, bucket_elements, nesterov):
    """2 gloo ranks, each holding half the rows of every matrix: the gathered weights equal a plain
    float64 Muon over the whole matrices. Tolerance 2e-5 absolute: the fp32 Newton–Schulz
    (5 iterations of products of unit-norm matrices, entries O(0.1-1)) carries ~1e-6 relative
    rounding per step, times lr (<= 0.05) over 3 steps: well under 1e-5; a wrong owner, a swapped
    shard or a lost momentum moves weights by ~lr = 2e-2. bucket 1000 forces one bucket per matrix."""
    import torch.multiprocessing as mp

    mp.spawn(_sharded_worker, args=(2, _free_port(), str(tmp_path), bucket_elements, nesterov), nprocs=2,
             join=True)
    init, grads = _muon_data()
    ref = reference_muon(init, grads, lrs=[0.02] * 3 + [0.05] * 3, wds=[0.0] * 3 + [0.1] * 3, nesterov=nesterov)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r in ranks:
        for got, want in zip(r["params"], ref):
            assert (got.double() - want).abs().max() < 2e-5
    # the momentum stays sharded: each rank holds half the rows (rounded up) of every fp32 buffer
    want_bytes = sum(-(-s[0] // 2) * s[1] * 4 for s in SHAPES)
    assert ranks[0]["local_state_bytes"] == want_bytes
    assert ranks[1]["local_state_bytes"] == sum((s[0] // 2) * s[1] * 4 for s in SHAPES)


def test_owners_are_balanced_by_newton_schulz_flops():
    shapes = [(64, 64)] * 3 + [(256, 64)] * 2 + [(8, 8)]
    owners = balance_owners(shapes, 2)
    load = [sum(ns_flops(*s) for s, o in zip(shapes, owners) if o == r) for r in range(2)]
    # the two big matrices go to different ranks, the three mid ones and the small one fill the gap
    assert owners[3] != owners[4]
    assert max(load) / min(load) < 1.4
    assert balance_owners(shapes, 2) == owners  # deterministic: every rank computes the same


# ---------------------------------------------------------------- config checks

def test_config_refuses_what_fsdp_does_not_serve():
    from nanochat_ternary.config import Config
    from nanochat_ternary.config_checks import validate

    cfg = Config()
    cfg.training.parallelism = "zero3"
    with pytest.raises(ConfigError, match="parallelism"):
        validate(cfg)
    for key, value in [("optimizer_in_backward", True), ("use_8bit_optim", True), ("use_galore", True),
                       ("adamw_state", "foam"), ("latent_dtype", "bfloat16"), ("compile", "true")]:
        cfg = Config()
        cfg.training.parallelism = "fsdp"
        setattr(cfg.training, key, value)
        with pytest.raises(ConfigError, match=f"parallelism = 'fsdp' does not support {key}") as e:
            validate(cfg)
        assert "\n" not in str(e.value)
    cfg = Config()
    cfg.training.parallelism = "fsdp"
    validate(cfg)  # the defaults are served
    assert TrainConfig().parallelism == "ddp"
