"""Optimizers: Muon for the hidden matrices, AdamW for the rest."""

from .factory import (
    build_optimizers,
    memory_report,
    optimizer_state_bytes,
    split_named_params,
    split_params,
)
from .muon import Muon, zeropower_via_newtonschulz5

__all__ = [
    "Muon",
    "build_optimizers",
    "memory_report",
    "optimizer_state_bytes",
    "split_named_params",
    "split_params",
    "zeropower_via_newtonschulz5",
]
