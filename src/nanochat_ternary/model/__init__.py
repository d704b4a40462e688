"""The GPT model and its ternary BitLinear layer."""

from .bitlinear import (
    BitLinear,
    quantize_activations,
    quantize_activations_int8,
    quantize_weight,
    ternary_quantize_weight,
)
from .gpt import GPT, KVCache

__all__ = [
    "GPT",
    "BitLinear",
    "KVCache",
    "quantize_activations",
    "quantize_activations_int8",
    "quantize_weight",
    "ternary_quantize_weight",
]
