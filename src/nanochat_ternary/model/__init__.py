"""The GPT model and its ternary BitLinear layer."""

from .bitlinear import (
    BitLinear,
    cached_weight_quantization,
    quantize_activations,
    quantize_activations_int8,
    quantize_weight,
    ternary_quantize_weight,
)
from .gpt import GPT, KVCache

__all__ = [
    "cached_weight_quantization",
    "GPT",
    "BitLinear",
    "KVCache",
    "quantize_activations",
    "quantize_activations_int8",
    "quantize_weight",
    "ternary_quantize_weight",
]
