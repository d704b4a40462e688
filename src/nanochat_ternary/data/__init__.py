"""Data pipeline: token files, byte-level BPE tokenizer, corpus preparation, named datasets and
deterministic batch sampling. See each module's docstring for the why."""

from .batches import TokenBatches, val_batches
from .corpus import (
    PREPARED_FORMAT_VERSION,
    Documents,
    PreparedData,
    collect_documents,
    load_prepared,
    prepare_data,
    prepare_documents,
)
from .datasets import (
    DATASET_NAMES,
    default_cache_dir,
    load_dataset,
    stdlib_dataset,
    synthetic_dataset,
    text_dataset,
)
from .stream import PrepareSettings, PrepareSummary, prepare_stream
from .tokenfile import check_token_range, read_header, read_tokens, write_tokens
from .tokenizer import EOT, Tokenizer, byte_tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "DATASET_NAMES",
    "EOT",
    "PREPARED_FORMAT_VERSION",
    "Documents",
    "PrepareSettings",
    "PrepareSummary",
    "PreparedData",
    "TokenBatches",
    "Tokenizer",
    "byte_tokenizer",
    "check_token_range",
    "collect_documents",
    "default_cache_dir",
    "load_dataset",
    "load_prepared",
    "load_tokenizer",
    "prepare_data",
    "prepare_documents",
    "prepare_stream",
    "read_header",
    "read_tokens",
    "stdlib_dataset",
    "synthetic_dataset",
    "text_dataset",
    "train_tokenizer",
    "val_batches",
    "write_tokens",
]
