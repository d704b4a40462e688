"""llama.cpp behind one small interface, for everything here that runs a ``.gguf`` (generate, chat,
serve, eval, benchmarks).

Two Python bindings of llama.cpp's C API are accepted; the first that loads is used:

1. ``llama_cpp_py_sync`` (PyPI ``llama-cpp-py-sync``, the ``llamacpp-prebuilt`` extra): a prebuilt CPU
   ``libllama`` with CFFI bindings, nothing to compile. Its Linux build needs glibc >= 2.38
   (Debian 13, Ubuntu 24.04); on an older system the library does not load and the next one is tried.
2. ``llama_cpp`` (PyPI ``llama-cpp-python``, the ``llamacpp`` extra): ctypes bindings over a ``libllama`` it builds from
   source at install time (~20 min on 2 cores).

Both run the same code below, on the C API (``llama_decode``, ``llama_get_logits``, the sampler
chain); a binding only says how to make buffers and read pointers (:class:`_Cffi`, :class:`_Ctypes`).
Neither installed (or loadable): one :class:`UserError` naming ``pip install 'nanochat-ternary[llamacpp]'``.

Interface (all a caller needs; one :class:`LlamaCpp` is not thread-safe: serialize calls)::

    llm = open_gguf(path, n_ctx=0, threads=0)   # n_ctx 0: the model's trained context; threads 0: all cores
    llm.backend, llm.path, llm.n_ctx, llm.n_vocab, llm.eos
    llm.tokenize(text, special=False) -> list[int]   # never adds BOS; special=True parses control tokens
    llm.special_id("<|end|>") -> int | None          # the one control token spelled so, if any
    llm.token_bytes(ids) -> bytes; llm.detokenize(ids) -> str (invalid UTF-8 replaced)
    llm.chat_template() -> str | None                # tokenizer.chat_template of the GGUF
    llm.logits(ids, last=None) -> np.ndarray [len(ids) or last, n_vocab] float32, a fresh context fed ids
    llm.generate(ids, max_tokens, temperature=0.8, top_k=None, top_p=None, seed=0, stop=()) -> Iterator[int]
    llm.close()

Sampling is ours (:func:`~..generate.sample_next`): ``temperature <= 0`` greedy; otherwise logits /
temperature, then top-k (``None`` / ``<= 0``: off), then top-p (``None`` / ``>= 1``: off) on the
tempered distribution, then a draw from llama.cpp's seeded RNG. (llama.cpp's own default chain
applies top-p before the temperature and adds min-p 0.05; we do not.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

INSTALL = "pip install 'nanochat-ternary[llamacpp]'"
_ERROR, _WARN = 4, 3  # ggml_log_level


class _Cffi:
    """``llama_cpp_py_sync``: a CFFI ``lib`` and its ``ffi``."""

    name = "llama-cpp-py-sync"

    def __init__(self, lib: Any, ffi: Any) -> None:
        self.lib, self.ffi, self.null = lib, ffi, ffi.NULL

    def tokens(self, n: int) -> Any:
        return self.ffi.new("llama_token[]", max(1, n))

    def chars(self, n: int) -> Any:
        return self.ffi.new("char[]", max(1, n))

    def read_bytes(self, buf: Any, n: int) -> bytes:
        return bytes(self.ffi.buffer(buf, n))

    def read_floats(self, ptr: Any, n: int) -> np.ndarray:
        return np.frombuffer(self.ffi.buffer(ptr, 4 * n), dtype=np.float32).copy()

    def cstr(self, p: Any) -> bytes | None:
        return None if p == self.ffi.NULL else self.ffi.string(p)

    def log_callback(self, fn: Any) -> Any:
        return self.ffi.callback("ggml_log_callback", lambda lvl, text, _ud: fn(int(lvl), self.cstr(text)))


class _Ctypes:
    """``llama_cpp`` (llama-cpp-python): its ctypes module mirrors the C API name for name."""

    name = "llama-cpp-python"
    null = None

    def __init__(self, lib: Any) -> None:
        import ctypes

        self.lib, self.ctypes = lib, ctypes

    def tokens(self, n: int) -> Any:
        return (self.ctypes.c_int32 * max(1, n))()

    def chars(self, n: int) -> Any:
        return self.ctypes.create_string_buffer(max(1, n))

    def read_bytes(self, buf: Any, n: int) -> bytes:
        return buf.raw[:n]

    def read_floats(self, ptr: Any, n: int) -> np.ndarray:
        return np.ctypeslib.as_array(ptr, shape=(n,)).copy()

    def cstr(self, p: Any) -> bytes | None:
        return p  # c_char_p results arrive as bytes (or None)

    def log_callback(self, fn: Any) -> Any:
        return self.lib.llama_log_callback(lambda lvl, text, _ud: fn(int(lvl), text))


_BINDING: Any = None
_LOG: list[str] = []  # llama.cpp's last warnings / errors, for the message of a failed load


def _log(level: int, text: bytes | None) -> None:
    if level in (_ERROR, _WARN) and text:
        _LOG.append(text.decode("utf-8", "replace").strip())
        del _LOG[:-4]


def binding() -> Any:
    """The loaded binding (:class:`_Cffi` or :class:`_Ctypes`), llama.cpp's logging silenced; a
    UserError when neither package is installed or loads."""
    global _BINDING
    if _BINDING is not None:
        return _BINDING
    why = []
    try:
        from llama_cpp_py_sync._cffi_bindings import get_ffi, get_lib

        b: Any = _Cffi(get_lib(), get_ffi())
    except ImportError:
        why.append("llama-cpp-py-sync is not installed")
        b = None
    except (RuntimeError, OSError) as e:  # e.g. "version `GLIBC_2.38' not found"
        glibc = "GLIBC_2." in str(e)
        why.append("llama-cpp-py-sync's prebuilt libllama does not load here"
                   + (" (it needs glibc >= 2.38)" if glibc else f" ({str(e).splitlines()[0][:120]})"))
        b = None
    if b is None:
        try:
            import llama_cpp

            b = _Ctypes(llama_cpp)
        except ImportError:
            why.append("llama-cpp-python (builds llama.cpp from source) is not installed")
        except (RuntimeError, OSError) as e:
            why.append(f"llama-cpp-python does not load ({str(e).splitlines()[0][:120]})")
    if b is None:
        raise UserError(f"running a .gguf needs llama.cpp: {INSTALL} ({'; '.join(why)})")
    _BINDING = activate(b)
    return b


def activate(b: Any) -> Any:
    """Route llama.cpp's log to :func:`_log` (quiet) and initialise its backend; returns ``b``."""
    b.log_keepalive = b.log_callback(_log)  # the C side holds only a pointer: keep the Python object
    b.lib.llama_log_set(b.log_keepalive, b.null)
    b.lib.llama_backend_init()
    return b


class LlamaCpp:
    """A GGUF loaded on llama.cpp's CPU backend (see the module docstring for the interface)."""

    def __init__(self, path: str | Path, n_ctx: int = 0, threads: int = 0) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such file")
        b = self._b = binding()
        lib = b.lib
        self.backend = b.name
        self._ctx = self._model = self._sampler = None
        del _LOG[:]
        mp = lib.llama_model_default_params()
        mp.n_gpu_layers = 0
        self._model = lib.llama_model_load_from_file(str(self.path).encode(), mp)
        if self._model == b.null or self._model is None:
            self._model = None
            detail = f": {_LOG[-1]}" if _LOG else ""
            raise UserError(f"llama.cpp ({self.backend}) cannot load {self.path}{detail}")
        self.n_ctx = int(n_ctx) if n_ctx > 0 else int(lib.llama_model_n_ctx_train(self._model))
        self._n_batch = min(self.n_ctx, 512)  # logits() feeds chunks of this many tokens
        cp = lib.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = self.n_ctx, self._n_batch, self._n_batch, 1
        cp.n_threads = cp.n_threads_batch = threads if threads > 0 else (os.cpu_count() or 1)
        self._ctx = lib.llama_init_from_model(self._model, cp)
        if self._ctx == b.null or self._ctx is None:
            self._ctx = None
            self.close()
            raise UserError(f"llama.cpp ({self.backend}) cannot make a {self.n_ctx}-token context for {self.path}")
        self._vocab = lib.llama_model_get_vocab(self._model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        self.eos = int(lib.llama_vocab_eos(self._vocab))

    # ---- text <-> ids

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """``text``'s ids (no BOS); ``special`` parses control-token spellings into their ids."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = self._b.tokens(cap)
        n = self._b.lib.llama_tokenize(self._vocab, data, len(data), buf, cap, False, special)
        if n < 0:  # cannot happen for byte-level BPE (<= 1 token per byte); kept for other vocabs
            cap = -n
            buf = self._b.tokens(cap)
            n = self._b.lib.llama_tokenize(self._vocab, data, len(data), buf, cap, False, special)
        return [int(buf[i]) for i in range(n)]

    def special_id(self, spelling: str) -> int | None:
        ids = self.tokenize(spelling, special=True)
        return ids[0] if len(ids) == 1 and ids != self.tokenize(spelling) else None

    def token_bytes(self, ids: Sequence[int]) -> bytes:
        """The bytes of ``ids`` (control tokens render as nothing), for incremental UTF-8 decoding."""
        out, buf, cap = [], self._b.chars(64), 64
        for t in ids:
            n = self._b.lib.llama_token_to_piece(self._vocab, int(t), buf, cap, 0, False)
            if n < 0:
                cap = -n
                buf = self._b.chars(cap)
                n = self._b.lib.llama_token_to_piece(self._vocab, int(t), buf, cap, 0, False)
            out.append(self._b.read_bytes(buf, n))
        return b"".join(out)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.token_bytes(ids).decode("utf-8", errors="replace")

    def chat_template(self) -> str | None:
        p = self._b.cstr(self._b.lib.llama_model_chat_template(self._model, self._b.null))
        return p.decode("utf-8") if p is not None else None

    # ---- running the model

    def _reset(self) -> None:
        self._b.lib.llama_memory_clear(self._b.lib.llama_get_memory(self._ctx), True)

    def _decode(self, ids: Sequence[int], pos: int, n_out: int) -> None:
        """Feed ``ids`` at positions ``pos..``; logits for the last ``n_out`` of them."""
        lib = self._b.lib
        batch = lib.llama_batch_init(len(ids), 0, 1)
        try:
            batch.n_tokens = len(ids)
            for i, t in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(t), pos + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if i >= len(ids) - n_out else 0
            rc = lib.llama_decode(self._ctx, batch)
        finally:
            lib.llama_batch_free(batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for {len(ids)} tokens at position {pos}")

    def _check_len(self, n: int) -> None:
        if n < 1:
            raise ValueError("no tokens to run")
        if n > self.n_ctx:
            raise ValueError(f"{n} tokens exceed the llama.cpp context of {self.n_ctx}")

    def logits(self, ids: Sequence[int], last: int | None = None) -> np.ndarray:
        """fp32 logits ``[n, n_vocab]`` of a fresh context fed ``ids``, for its last ``n = last``
        positions (default: all): row ``j`` predicts the token after ``ids[len(ids) - n + j]``."""
        self._check_len(len(ids))
        if min(ids) < 0 or max(ids) >= self.n_vocab:
            raise ValueError(f"token ids must be in [0, {self.n_vocab})")
        first = len(ids) - (len(ids) if last is None else max(1, min(last, len(ids))))  # first output position
        self._reset()
        rows = []
        for lo in range(0, len(ids), self._n_batch):
            chunk = ids[lo:lo + self._n_batch]
            n_out = max(0, lo + len(chunk) - max(first, lo))
            self._decode(chunk, lo, n_out)
            if n_out:
                rows.append(self._b.read_floats(self._b.lib.llama_get_logits(self._ctx), n_out * self.n_vocab))
        return np.concatenate(rows).reshape(len(ids) - first, self.n_vocab)

    def _new_sampler(self, temperature: float, top_k: int | None, top_p: float | None, seed: int) -> Any:
        lib = self._b.lib
        s = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if temperature <= 0:
            lib.llama_sampler_chain_add(s, lib.llama_sampler_init_greedy())
            return s
        lib.llama_sampler_chain_add(s, lib.llama_sampler_init_temp(float(temperature)))
        if top_k is not None and 0 < top_k < self.n_vocab:
            lib.llama_sampler_chain_add(s, lib.llama_sampler_init_top_k(int(top_k)))
        if top_p is not None and top_p < 1.0:
            lib.llama_sampler_chain_add(s, lib.llama_sampler_init_top_p(float(top_p), 1))
        lib.llama_sampler_chain_add(s, lib.llama_sampler_init_dist(int(seed) & 0xFFFFFFFF))
        return s

    def generate(self, ids: Sequence[int], max_tokens: int, temperature: float = 0.8, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, stop: Sequence[int] = ()) -> Iterator[int]:
        """Sampled continuation of ``ids``, token by token: at most ``max_tokens`` and never past the
        context; ends before a token in ``stop`` (which is not yielded)."""
        self._check_len(len(ids))
        budget = min(max_tokens, self.n_ctx - len(ids))
        stops = {int(t) for t in stop}
        lib = self._b.lib
        sampler = self._new_sampler(temperature, top_k, top_p, seed)
        try:
            self._reset()
            for lo in range(0, len(ids), self._n_batch):
                self._decode(ids[lo:lo + self._n_batch], lo, n_out=1)
            for k in range(budget):
                t = int(lib.llama_sampler_sample(sampler, self._ctx, -1))  # samples the last logits
                if t in stops:
                    return
                yield t
                if k + 1 < budget:
                    self._decode([t], len(ids) + k, n_out=1)
        finally:
            lib.llama_sampler_free(sampler)

    def close(self) -> None:
        lib = self._b.lib
        if self._ctx is not None:
            lib.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            lib.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_b", None) is not None:
            self.close()


def open_gguf(path: str | Path, n_ctx: int = 0, threads: int = 0) -> LlamaCpp:
    """``path`` on llama.cpp (CPU); ``n_ctx`` 0: the model's trained context; ``threads`` 0: all cores."""
    return LlamaCpp(path, n_ctx=n_ctx, threads=threads)
