"""`info --ranks N` / `memory --ranks N` (train/rank_memory.py): the per-rank estimate against the
bytes a real 2-rank gloo fsdp run and a ddp rank hold (tests/test_fsdp.py has the fsdp training)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers.distributed import gloo_group, spawn_ranks

from nanochat_ternary.cli import main

pytestmark = pytest.mark.usefixtures("isolated_cache", "one_thread")


def _tiny_cfg(**training):
    from nanochat_ternary.config import Config

    cfg = Config()
    cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads, cfg.model.n_kv_heads = 64, 2, 2, 1
    for k, v in training.items():
        setattr(cfg.training, k, v)
    return cfg


def _measured_bytes(model, opts) -> dict[str, int]:
    """What the run holds on this rank after a step: every tensor's local storage (a tied weight once)."""
    from nanochat_ternary.optim.factory import optimizer_state_bytes

    def local(t):
        return (t.to_local() if hasattr(t, "to_local") else t).nbytes

    params = list({id(p): p for p in model.parameters()}.values())
    return {"param_bytes": sum(local(p) for p in params), "grad_bytes": sum(local(p.grad) for p in params),
            "muon_state_bytes": optimizer_state_bytes(opts[0]), "adamw_state_bytes": optimizer_state_bytes(opts[1])}


def _one_step(model, opts, seed: int) -> None:
    x = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(seed))
    model(x, targets=x).backward()
    for opt in opts:
        opt.step()


def _memory_worker(rank, world, port, out_dir):
    from nanochat_ternary.model.gpt import GPT
    from nanochat_ternary.optim.sharded_muon import build_sharded_optimizers
    from nanochat_ternary.train import fsdp
    from nanochat_ternary.train.runtime import Runtime

    torch.set_num_threads(1)
    with gloo_group(rank, world, port):
        out = {}
        for eight_bit in (False, True):
            cfg = _tiny_cfg(use_8bit_optim=eight_bit)
            torch.manual_seed(0)
            model = fsdp.shard_model(GPT(cfg.model), Runtime(device=torch.device("cpu"), rank=rank, world_size=world))
            opts = build_sharded_optimizers(model, cfg.training)
            _one_step(model, opts, rank)
            out[eight_bit] = _measured_bytes(model, opts)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def test_per_rank_memory_estimate_equals_a_real_fsdp_run(tmp_path):
    """The size arithmetic `info --ranks` / `memory --ranks` print is exact: each of 2 real gloo fsdp
    ranks (fully_shard + sharded Muon, fp32 or 8-bit (the owner's whole int8 momenta), + AdamW on the
    shards, after one step) holds exactly the estimated parameter, gradient, Muon and AdamW bytes (the
    (32, 64) / (4096, 64) / (64,) shapes
    split evenly; the uneven torch.chunk split is checked against measured momentum shards in
    test_sharded_muon_matches_float64_reference at 4 ranks and by shard_rows below)."""
    from nanochat_ternary.train.rank_memory import per_rank_memory, shard_rows

    measured = spawn_ranks(_memory_worker, tmp_path, 2)
    for eight_bit in (False, True):
        est = per_rank_memory(_tiny_cfg(use_8bit_optim=eight_bit), 2)["modes"]["fsdp"]["ranks"]
        for r in range(2):
            for key, value in measured[r][eight_bit].items():
                assert est[r][key] == value, (eight_bit, r, key, est[r][key], value)
    # torch.chunk's split (what fully_shard does): 25 rows over 4 ranks 7/7/7/4, 3 rows 1/1/1/0
    for rows in (25, 3, 8):
        assert [shard_rows(rows, 4, r) for r in range(4)] == [len(c) for c in torch.arange(rows).chunk(4)] + \
            [0] * (4 - len(torch.arange(rows).chunk(4)))


@pytest.mark.parametrize("eight_bit", [False, True])
def test_per_rank_memory_estimate_equals_ddp_rank(eight_bit):
    """Under ddp every rank holds what one process holds (the whole model, its gradients, all state):
    the estimate equals the bytes one process measures after a step, fp32 Muon and 8-bit Muon
    (int8 blocks for the matrices of >= 4096 values, fp32 for the (32, 64) ones)."""
    from nanochat_ternary.model.gpt import GPT
    from nanochat_ternary.optim.factory import build_optimizers
    from nanochat_ternary.train.rank_memory import per_rank_memory

    cfg = _tiny_cfg(use_8bit_optim=eight_bit)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    opts = build_optimizers(model, cfg.training, torch.device("cpu"))
    _one_step(model, opts, 0)
    rep = per_rank_memory(cfg, 4)
    for r in range(4):
        for key, value in _measured_bytes(model, opts).items():
            assert rep["modes"]["ddp"]["ranks"][r][key] == value, (key, eight_bit)
    assert rep["modes"]["fsdp"]["vs_ddp"] <= 0.3  # the 4-rank target, by the same arithmetic
    # fsdp at 4 ranks: every matrix's momentum on exactly one owner (8-bit) or split in rows (fp32)
    fsdp_ranks = rep["modes"]["fsdp"]["ranks"]
    assert sum(x["muon_state_bytes"] for x in fsdp_ranks) == rep["modes"]["ddp"]["ranks"][0]["muon_state_bytes"]


def test_info_and_memory_print_per_rank(capsys):
    tiny = ["--set", "dim=64", "--set", "n_layers=2", "--set", "n_heads=2", "--set", "n_kv_heads=1"]
    assert main(["info", *tiny, "--ranks", "4"]) == 0
    out = capsys.readouterr().out
    assert "per rank at 4 ranks" in out and "fsdp" in out and "0.250" in out
    assert main(["info", *tiny, "--ranks", "2", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)["per_rank"]
    assert rep["world"] == 2 and len(rep["modes"]["fsdp"]["ranks"]) == 2
    capsys.readouterr()
    assert main(["info", *tiny, "--ranks", "2", "--set", "use_galore=true"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --ranks:") and err.count("\n") == 1, err
    assert main(["memory", *tiny, "--ranks", "-1"]) == 1  # refused before anything is measured
    assert "--ranks must be >= 1" in capsys.readouterr().err

