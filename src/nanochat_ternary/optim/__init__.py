"""Optimizers: Muon (fp32, 8-bit, GaLore) for the hidden matrices, AdamW for the rest."""

from .adamw_lowmem import AdamW8bit
from .factory import (
    build_muon,
    build_optimizers,
    measure_optimizer_state,
    memory_report,
    optimizer_state_bytes,
    split_named_params,
    split_params,
    tensor_nbytes,
)
from .galore import GaLoreMuon, randomized_svd
from .muon import Muon, zeropower_via_newtonschulz5
from .quantized import BlockQuantized, Muon8bit

__all__ = [
    "AdamW8bit",
    "BlockQuantized",
    "GaLoreMuon",
    "Muon",
    "Muon8bit",
    "build_muon",
    "build_optimizers",
    "measure_optimizer_state",
    "memory_report",
    "optimizer_state_bytes",
    "randomized_svd",
    "split_named_params",
    "split_params",
    "tensor_nbytes",
    "zeropower_via_newtonschulz5",
]
