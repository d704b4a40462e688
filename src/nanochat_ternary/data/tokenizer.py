"""Byte-level BPE tokenizer (HF ``tokenizers``) with one special token, the document separator.

Why byte-level: every string, in any script, and any source file maps to ids and back exactly
(``decode(encode(s)) == s``), because the base alphabet is the 256 byte values, so there is no
unknown token and no normalisation that could change code (tabs, trailing spaces, CRLF).

Why a wrapper class: the rest of the project needs only encode / decode / the vocabulary size /
the separator id, and it must not matter whether the tokenizer was trained here, loaded from a
prepared data dir or is the merge-free byte tokenizer of the synthetic dataset. The HF object is
still reachable as ``Tokenizer.hf`` for anything else.

Special tokens are never produced from text: ``<|endoftext|>`` appearing literally inside a
document is encoded as ordinary bytes (``encode_special_tokens``), so the only separators in a
token stream are the ones the data pipeline inserted between documents.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ..errors import DataError

EOT = "<|endoftext|>"
SPECIAL_TOKENS = [EOT]
#: The byte alphabet plus the special tokens: the smallest vocabulary a byte-level BPE can have.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def _bytes_to_unicode() -> dict[int, str]:
    """Byte value -> the printable character the ByteLevel pre-tokenizer uses for it.

    Printable Latin-1 bytes map to themselves; the other 68 bytes are moved to code points from
    256 upward, in byte order. This is the mapping HF's ByteLevel uses, recomputed here so the byte
    tokenizer can give byte b the id b.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class Tokenizer:
    """A thin, typed wrapper over a byte-level HF tokenizer."""

    def __init__(self, hf: HFTokenizer) -> None:
        self.hf = hf
        # Text is data: a literal "<|endoftext|>" in a document must not become a separator.
        self.hf.encode_special_tokens = True
        eot = hf.token_to_id(EOT)
        if eot is None:
            raise DataError(f"tokenizer has no {EOT} token")
        self.eot_id: int = int(eot)

    @property
    def vocab_size(self) -> int:
        """Number of ids, including special tokens (ids are 0 .. vocab_size-1)."""
        return int(self.hf.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many documents at once; HF parallelises this across cores."""
        return [list(e.ids) for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Like ``encode_batch``, as uint32 arrays, without the offsets (``encode_batch_fast``: the
        same ids, less work and memory); the documents are encoded in parallel on all cores."""
        hf = self.hf
        enc = hf.encode_batch_fast if hasattr(hf, "encode_batch_fast") else hf.encode_batch
        return [np.array(e.ids, dtype=np.uint32) for e in enc(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. Special tokens are kept so a separator stays visible in generations."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 byte length of each id's text (0 for special tokens).

        Each character of a byte-level token stands for exactly one byte, so the length of the
        token string is its byte count. Used to count the bytes behind any slice of a token stream
        (bits-per-byte) even when the slice cuts a multi-byte character.
        """
        specials = set(SPECIAL_TOKENS)
        out = []
        for i in range(self.vocab_size):
            tok = self.hf.id_to_token(i)
            out.append(0 if tok is None or tok in specials else len(tok))
        return out

    def save(self, path: str | Path) -> None:
        self.hf.save(str(path))


def _new_byte_level(model: models.Model) -> HFTokenizer:
    hf = HFTokenizer(model)
    # add_prefix_space=False: a leading space would be invented on encode and break the round trip.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    return hf


def train_tokenizer(
    text_iterator: Iterable[str] | Iterator[str], vocab_size: int, show_progress: bool = False
) -> Tokenizer:
    """Train a byte-level BPE of ``vocab_size`` ids (specials included) on the given texts.

    The full 256-byte alphabet is seeded so bytes absent from the training sample still encode.
    On a small corpus BPE may run out of merges and return fewer than ``vocab_size`` ids; callers
    must use ``Tokenizer.vocab_size``, not the requested size.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"vocab size {vocab_size} too small: a byte-level BPE needs at least {MIN_VOCAB_SIZE}"
        )
    hf = _new_byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    hf.train_from_iterator(text_iterator, trainer=trainer)
    return Tokenizer(hf)


def byte_tokenizer() -> Tokenizer:
    """A tokenizer with no merges: id b is byte b, and ``<|endoftext|>`` is 256 (vocab 257).

    Used by the synthetic dataset, whose patterns are easiest to learn (and to read back) when
    one character is one token.
    """
    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    for i, tok in enumerate(SPECIAL_TOKENS):
        vocab[tok] = 256 + i
    hf = _new_byte_level(models.BPE(vocab=vocab, merges=[]))
    hf.add_special_tokens(list(SPECIAL_TOKENS))
    return Tokenizer(hf)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` written by ``Tokenizer.save`` (or any HF byte-level tokenizer
    that has the ``<|endoftext|>`` token)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file not found: {path}")
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"cannot load tokenizer {path}: {msg}") from e
    return Tokenizer(hf)
