"""Where a run executes: device choice, threads, and the torch.distributed process group.

Nothing here is global state: a ``Runtime`` is created once per process and passed around, so the
same code runs as one process or as one of N under ``torchrun`` (which sets RANK / WORLD_SIZE /
LOCAL_RANK in the environment).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UserError


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA; plain fp32 on CPU (bf16 matmul is ~100x slower on these CPUs)."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        """``flag`` ORed over ranks, on every rank: decisions that end or skip work (a stop request, a
        non-finite step) must be the same everywhere, or the ranks that go on wait forever in the
        next collective for the ones that stopped."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def all_reduce_mean(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world_size

    def shutdown(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


_COMM_FAILURE_MARKS = ("connection closed by peer", "connection reset", "broken pipe", "gloo", "nccl",
                       "timed out", "socket")


def is_comm_failure(e: BaseException) -> bool:
    """Whether an error raised inside a collective means another rank is gone (crashed, killed,
    timed out). Gloo raises a plain ``RuntimeError`` for a peer that closed its sockets, so the
    message is all there is to go by."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and any(m in msg for m in _COMM_FAILURE_MARKS)


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: CUDA is not available on this machine (use --device cpu)")
        if spec == "cuda":
            return torch.device("cuda", local_rank)
        idx = int(spec.split(":", 1)[1])
        if idx >= torch.cuda.device_count():
            raise UserError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
        return torch.device("cuda", idx)
    return torch.device("cpu")


def setup_runtime(device_spec: str, threads: int = 0) -> Runtime:
    """Pick the device, set threads, and join the process group when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local_rank)
    if threads > 0:
        torch.set_num_threads(threads)
    elif world_size > 1 and device.type == "cpu":
        # N processes on one host share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return Runtime(device=device, rank=rank, world_size=world_size, local_rank=local_rank)
