"""nanochat-ternary: train small ternary (1.58-bit) GPT models on the hardware you already have."""

__version__ = "0.1.0"
