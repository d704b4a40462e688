"""Tests for the data pipeline: token files, tokenizer, preparation, datasets, batch sampling."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from nanochat_ternary.data import (
    TokenBatches,
    byte_tokenizer,
    check_token_range,
    load_dataset,
    load_prepared,
    load_tokenizer,
    prepare_data,
    read_tokens,
    synthetic_dataset,
    text_dataset,
    train_tokenizer,
    val_batches,
    write_tokens,
)
from nanochat_ternary.data.datasets import default_cache_dir, synthetic_documents
from nanochat_ternary.data.tokenfile import HEADER_SIZE, MAGIC
from nanochat_ternary.errors import DataError

UNICODE_SAMPLES = [
    "hello world",
    "héllo wörld — naïve café",
    "日本語のテキスト, 中文, 한국어",
    "emoji 🎉🚀 and ZWJ 👩‍👩‍👧",
    "def f(x):\n\treturn x ** 2  # trailing spaces   \r\n",
    "literal <|endoftext|> inside text",
    "\x00\x01 control \u200b zero-width \ufeff bom",
    "",
    "   leading spaces",
]

CODE_FILES = {
    "a.py": "import os\n\n\ndef main():\n    print(os.getcwd())\n",
    "b.py": "class Foo:\n    def bar(self):\n        return 'bar' * 3\n",
    "pkg/c.py": "# -*- coding: utf-8 -*-\nNAME = 'ünïcödé'\nVALUES = [1, 2, 3]\n",
    "pkg/d.txt": "plain text notes, ça va?\n" * 20,
    "pkg/e.md": "# Title\n\nSome *markdown* with `code`.\n" * 10,
    "README": "readme without suffix\n" * 5,
}


def _write_tree(root, files=CODE_FILES):
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return root


# ---------------------------------------------------------------------------- token files


@pytest.mark.parametrize("vocab,dtype", [(4096, np.uint16), (65536, np.uint16), (100_000, np.uint32)])
def test_bin_round_trip(tmp_path, vocab, dtype):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=10_001)
    path = tmp_path / "t.bin"
    assert write_tokens(path, tokens, vocab) == len(tokens)
    back = read_tokens(path)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, tokens)
    assert path.stat().st_size == HEADER_SIZE + len(tokens) * np.dtype(dtype).itemsize


def test_bin_streams_chunks(tmp_path):
    chunks = [np.arange(i * 100, (i + 1) * 100) for i in range(5)] + [np.array([], dtype=np.int64)]
    path = tmp_path / "s.bin"
    assert write_tokens(path, iter(chunks), 1000) == 500
    np.testing.assert_array_equal(read_tokens(path), np.arange(500))
    assert [p.name for p in tmp_path.iterdir()] == ["s.bin"]  # no temp file left behind


def test_bin_truncated_and_extra(tmp_path):
    path = tmp_path / "t.bin"
    write_tokens(path, np.arange(100), 256)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(DataError, match=r"truncated: header says 100 tokens, file holds 95"):
        read_tokens(path)
    path.write_bytes(data + b"\0\0")
    with pytest.raises(DataError, match="extra bytes"):
        read_tokens(path)
    path.write_bytes(data[:20])
    with pytest.raises(DataError, match="header"):
        read_tokens(path)


def test_bin_bad_magic_empty_missing_version(tmp_path):
    path = tmp_path / "t.bin"
    write_tokens(path, np.arange(10), 256)
    data = bytearray(path.read_bytes())
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"XXXXXXXX" + bytes(data[8:]))
    with pytest.raises(DataError, match="bad magic"):
        read_tokens(bad)
    raw = tmp_path / "raw.bin"  # a headerless nanoGPT-style file
    raw.write_bytes(np.arange(1000, dtype=np.uint16).tobytes())
    with pytest.raises(DataError, match="bad magic"):
        read_tokens(raw)
    v2 = tmp_path / "v2.bin"
    v2.write_bytes(MAGIC + struct.pack("<I", 99) + bytes(data[12:]))
    with pytest.raises(DataError, match="version 99"):
        read_tokens(v2)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        read_tokens(empty)
    with pytest.raises(DataError, match="not found"):
        read_tokens(tmp_path / "nope.bin")
    zero = tmp_path / "zero.bin"
    write_tokens(zero, np.array([], dtype=np.int64), 256)
    with pytest.raises(DataError, match="no tokens"):
        read_tokens(zero)


def test_token_range(tmp_path):
    check_token_range(np.array([0, 5, 9]), 10)
    with pytest.raises(DataError, match=r"token id 10 >= vocab size 10 in x\.bin"):
        check_token_range(np.array([0, 10, 3]), 10, "x.bin")
    with pytest.raises(DataError, match="token id 300 >= vocab size 256"):
        write_tokens(tmp_path / "t.bin", np.array([1, 300]), 256)
    assert not (tmp_path / "t.bin").exists()
    with pytest.raises(DataError, match="negative"):
        write_tokens(tmp_path / "t.bin", np.array([1, -1]), 256)


# ---------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_save(tmp_path):
    corpus = list(CODE_FILES.values()) * 3 + UNICODE_SAMPLES
    tok = train_tokenizer(corpus, 400)
    assert 257 <= tok.vocab_size <= 400
    for s in UNICODE_SAMPLES + list(CODE_FILES.values()):
        assert tok.decode(tok.encode(s)) == s
    # a literal separator string in a document is text, not the separator token
    assert tok.eot_id not in tok.encode("x <|endoftext|> y")
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"
    assert tok.encode_batch(["ab", "cd"]) == [tok.encode("ab"), tok.encode("cd")]
    tok.save(tmp_path / "tokenizer.json")
    tok2 = load_tokenizer(tmp_path / "tokenizer.json")
    s = "def naïve(x): return '🎉' * x\n"
    assert tok2.encode(s) == tok.encode(s)
    assert len(tok.token_byte_lengths()) == tok.vocab_size
    lengths = tok.token_byte_lengths()
    assert sum(lengths[i] for i in tok.encode(s)) == len(s.encode())


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="too small"):
        train_tokenizer(["abc"], 100)
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="cannot load tokenizer"):
        load_tokenizer(bad)


def test_byte_tokenizer():
    tok = byte_tokenizer()
    assert tok.vocab_size == 257 and tok.eot_id == 256
    for s in UNICODE_SAMPLES:
        ids = tok.encode(s)
        assert ids == list(s.encode("utf-8"))
        assert tok.decode(ids) == s


# ---------------------------------------------------------------------------- prepare / load


def _check_prepared(out, expected_docs=None):
    for name in ("tokenizer.json", "train.bin", "val.bin", "meta.json"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "meta.json").read_text())
    train, val = read_tokens(out / "train.bin"), read_tokens(out / "val.bin")
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    tok = load_tokenizer(out / "tokenizer.json")
    assert meta["vocab_size"] == tok.vocab_size
    assert int(max(train.max(), val.max())) < meta["vocab_size"]
    # Decode each split back into documents: they are exactly the input docs, and the byte
    # counts are their UTF-8 sizes.
    split_docs = {}
    for name, arr in (("train", train), ("val", val)):
        assert arr[-1] == tok.eot_id
        text = tok.decode(arr)
        docs = text.split("<|endoftext|>")[:-1]
        split_docs[name] = docs
        assert meta[f"{name}_bytes"] == sum(len(d.encode()) for d in docs)
    assert meta["n_val_docs"] == len(split_docs["val"]) >= 1
    assert meta["n_train_docs"] == len(split_docs["train"]) >= 1
    if expected_docs is not None:
        assert sorted(split_docs["train"] + split_docs["val"]) == sorted(expected_docs)
    return meta, split_docs


def test_prepare_dir(tmp_path):
    src = _write_tree(tmp_path / "src")
    (src / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0IHDR" + bytes(range(256)))
    (src / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (src / ".git").mkdir()
    (src / ".git" / "config").write_text("[core]\n")
    out = prepare_data([src], tmp_path / "out", vocab_size=320, val_fraction=0.2, show_progress=False)
    meta, _ = _check_prepared(out, expected_docs=list(CODE_FILES.values()))
    assert meta["n_docs"] == len(CODE_FILES)
    assert meta["skipped_files"] == 2  # the png and the latin-1 file; .git is not even listed
    data = load_prepared(out)
    assert data.vocab_size == meta["vocab_size"] and data.tokenizer_path == out / "tokenizer.json"
    assert len(data.train) == meta["train_tokens"]
    assert data.bits_per_byte(1.0) == pytest.approx(meta["val_tokens"] / (meta["val_bytes"] * np.log(2)))
    # deterministic: same seed -> same split and tokens; the dir is replaced in place
    prepare_data([src], tmp_path / "out2", vocab_size=320, val_fraction=0.2, show_progress=False)
    assert (out / "val.bin").read_bytes() == (tmp_path / "out2" / "val.bin").read_bytes()
    prepare_data([src], out, vocab_size=320, val_fraction=0.2, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out2", "src"]  # no temp dirs left
    # an output dir inside the input dir is never read back as input
    inner = src / "prepared"
    for _ in range(2):
        prepare_data([src], inner, vocab_size=320, val_fraction=0.2, show_progress=False)
        assert json.loads((inner / "meta.json").read_text())["n_docs"] == len(CODE_FILES)


def test_prepare_glob_and_files(tmp_path):
    src = _write_tree(tmp_path / "src")
    out = prepare_data([src], tmp_path / "py", vocab_size=300, glob="*.py", show_progress=False)
    meta, _ = _check_prepared(out, [v for k, v in CODE_FILES.items() if k.endswith(".py")])
    assert meta["n_files"] == 3
    # a single text file: one document, val is the tail of its token stream
    one = prepare_data([src / "pkg" / "d.txt"], tmp_path / "one", vocab_size=300, show_progress=False)
    m1 = json.loads((one / "meta.json").read_text())
    assert m1["n_docs"] == 1 and m1["val_tokens"] >= 1 and m1["train_tokens"] >= 1
    assert m1["train_bytes"] + m1["val_bytes"] == len(CODE_FILES["pkg/d.txt"].encode())


def test_prepare_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [f"row {i}: def f{i}(): return {i} * 'ü'\n" for i in range(40)] + [None, ""]
    table = pa.table({"content": rows, "id": list(range(len(rows)))})
    path = tmp_path / "data.parquet"
    pq.write_table(table, path)
    out = prepare_data(
        [path], tmp_path / "out", vocab_size=300, parquet_column="content", show_progress=False
    )
    meta, _ = _check_prepared(out, expected_docs=[r for r in rows if r])
    assert meta["n_docs"] == 40
    with pytest.raises(DataError, match=r"no column 'text' \(columns: content, id\)"):
        prepare_data([path], tmp_path / "out2", vocab_size=300, show_progress=False)


def test_prepare_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no input files matched"):
        prepare_data([tmp_path / "empty"], tmp_path / "out", show_progress=False)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    with pytest.raises(DataError, match="no text found"):
        prepare_data([tmp_path / "blank"], tmp_path / "out", show_progress=False)
    with pytest.raises(DataError, match="input not found"):
        prepare_data([tmp_path / "missing"], tmp_path / "out", show_progress=False)
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\0\1\2")
    with pytest.raises(DataError, match="not a UTF-8 text file"):
        prepare_data([binary], tmp_path / "out", show_progress=False)
    src = _write_tree(tmp_path / "src")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing to overwrite"):
        prepare_data([src], precious, vocab_size=300, show_progress=False)
    assert (precious / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_load_prepared_lone_bin_and_errors(tmp_path):
    path = tmp_path / "corpus.bin"
    write_tokens(path, np.arange(1000) % 300, 300)
    data = load_prepared(path, val_fraction=0.1)
    assert data.tokenizer_path is None and data.vocab_size == 300  # vocab from the header
    assert len(data.train) == 900 and len(data.val) == 100
    np.testing.assert_array_equal(np.concatenate([data.train, data.val]), np.arange(1000) % 300)
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 200}))
    with pytest.raises(DataError, match="token id 299 >= vocab size 200"):
        load_prepared(path)
    with pytest.raises(DataError, match="not found"):
        load_prepared(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="no train.bin"):
        load_prepared(tmp_path / "d")


# ---------------------------------------------------------------------------- datasets


def test_text_dataset_cached(tmp_path):
    src = _write_tree(tmp_path / "src")
    cache = tmp_path / "cache"
    a = text_dataset(src, cache_dir=cache, vocab_size=300, show_progress=False)
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1
    mtime = (entries[0] / "meta.json").stat().st_mtime_ns
    b = text_dataset(src, cache_dir=cache, vocab_size=300, show_progress=False)
    assert (entries[0] / "meta.json").stat().st_mtime_ns == mtime  # served from the cache
    np.testing.assert_array_equal(a.train, b.train)
    (src / "new.py").write_text("x = 1\n")  # the corpus changed: a new cache entry
    text_dataset(src, cache_dir=cache, vocab_size=300, show_progress=False)
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2
    assert load_dataset(None, src, cache_dir=cache, vocab_size=300, show_progress=False).meta["n_docs"] == 7


def test_synthetic_deterministic(tmp_path):
    a = synthetic_dataset(200, 64, seed=3, out_dir=tmp_path / "a")
    b = synthetic_dataset(200, 64, seed=3, cache_dir=tmp_path / "cache")
    c = synthetic_dataset(200, 64, seed=4, out_dir=tmp_path / "c")
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.val, b.val)
    assert not np.array_equal(a.train[:1000], c.train[:1000])
    assert a.vocab_size == 257 and a.meta["n_train_docs"] == 200
    tok = a.load_tokenizer()
    docs = synthetic_documents(200, 64, seed=3)
    assert tok.encode(docs[0]) == list(a.train[: len(docs[0])])
    assert a.meta["train_bytes"] == sum(len(d) for d in docs)
    assert all(0 < len(d) <= 64 for d in docs)
    assert "+" in "".join(docs) and "\n" in docs[0]


def test_load_dataset_dispatch(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        load_dataset("nope")
    with pytest.raises(DataError, match="needs --data-path"):
        load_dataset("tokens")
    with pytest.raises(DataError, match="takes no --data-path"):
        load_dataset("synthetic", tmp_path)
    path = tmp_path / "x.bin"
    write_tokens(path, np.arange(500) % 256, 256)
    assert load_dataset(None, path).vocab_size == 256


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_CACHE", str(tmp_path / "nc"))
    assert default_cache_dir() == tmp_path / "nc"
    monkeypatch.delenv("NANOCHAT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "nanochat-ternary"


# ---------------------------------------------------------------------------- batches


def _stream(n=10_000):
    return np.arange(n, dtype=np.int64)  # token value == position: windows are identifiable


def test_batches_shift_and_shape():
    tb = TokenBatches(_stream(), batch_size=4, seq_len=16, seed=0)
    x, y = tb.get(0)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y, x + 1)  # contiguous windows of the stream


def test_batches_determinism_and_purity():
    toks = _stream()
    a = TokenBatches(toks, 4, 16, seed=1)
    b = TokenBatches(toks, 4, 16, seed=1)
    for s in range(20):
        a.get(s)
    x5a, _ = a.get(5)
    x5b, _ = b.get(5)  # fresh object, no calls before
    assert torch.equal(x5a, x5b)
    assert not torch.equal(a.get(5)[0], a.get(6)[0])
    assert not torch.equal(TokenBatches(toks, 4, 16, seed=2).get(5)[0], x5a)
    far = 10 * a.steps_per_epoch + 3
    assert torch.equal(a.get(far)[0], b.get(far)[0])


def _window_ids(x: torch.Tensor, seq_len: int) -> list[int]:
    return [int(v) for v in x[:, 0]]  # start position of each row (token value == position)


def test_batches_epoch_coverage():
    seq_len, bs, accum = 16, 4, 2
    tb = TokenBatches(_stream(4 * 16 * 2 * 10 * 16 + 1), bs, seq_len, seed=0, grad_accum_steps=accum)
    assert tb.windows_per_epoch == 4 * 2 * 10 * 16
    assert tb.steps_per_epoch == 160
    seen = []
    for step in range(tb.steps_per_epoch):
        for m in range(accum):
            seen += _window_ids(tb.get(step, m)[0], seq_len)
    assert sorted(seen) == [k * seq_len for k in range(tb.windows_per_epoch)]
    assert tb.epoch_of(tb.steps_per_epoch - 1) == 0 and tb.epoch_of(tb.steps_per_epoch) == 1
    nxt = []
    for step in range(tb.steps_per_epoch, 2 * tb.steps_per_epoch):
        for m in range(accum):
            nxt += _window_ids(tb.get(step, m)[0], seq_len)
    assert sorted(nxt) == sorted(seen) and nxt != seen  # same windows, new order


def test_batches_epoch_offset_uses_tail():
    seq_len = 16
    n = 50 * seq_len + 1 + 7  # 7 leftover tokens: each epoch shifts its windows by 0..7
    tb = TokenBatches(_stream(n), 5, seq_len, seed=0)
    assert tb.windows_per_epoch == 50
    offsets = set()
    for e in range(12):
        starts = np.concatenate([tb.window_starts(s) for s in range(e * 10, (e + 1) * 10)])
        off = int(starts.min())
        assert sorted(starts) == [off + k * seq_len for k in range(50)]
        assert starts.max() + seq_len + 1 <= n
        offsets.add(off)
    assert len(offsets) > 1 and max(offsets) <= 7


def test_batches_rank_sharding():
    toks = _stream(2 * 4 * 16 * 20 + 1)
    r0 = TokenBatches(toks, 4, 16, seed=0, rank=0, world_size=2)
    r1 = TokenBatches(toks, 4, 16, seed=0, rank=1, world_size=2)
    steps = r0.steps_per_epoch
    assert steps == 20
    w0 = [w for s in range(steps) for w in _window_ids(r0.get(s)[0], 16)]
    w1 = [w for s in range(steps) for w in _window_ids(r1.get(s)[0], 16)]
    assert not set(w0) & set(w1)
    assert len(set(w0) | set(w1)) == r0.windows_per_epoch == len(w0) + len(w1)


def test_batches_too_little_data():
    with pytest.raises(DataError, match=r"has 16 tokens, too few for one sequence of seq_len\+1 = 17"):
        TokenBatches(_stream(16), 1, 16, seed=0)
    one = TokenBatches(_stream(17), 1, 16, seed=0)  # one window is enough: every step repeats it
    toks = _stream(17)
    for step in range(4):
        x, y = one.get(step)
        assert x.tolist() == [toks[:16].tolist()] and y.tolist() == [toks[1:17].tolist()]
    with pytest.raises(ValueError):
        TokenBatches(_stream(), 1, 16, seed=0, rank=2, world_size=2)


def test_val_batches():
    toks = _stream(1000 * 8 + 1)
    vb = val_batches(toks, batch_size=4, seq_len=8, n_batches=5)
    assert len(vb) == 5 and all(x.shape == (4, 8) for x, _ in vb)
    starts = [int(v) for x, _ in vb for v in x[:, 0]]
    assert len(set(starts)) == 20 and starts == sorted(starts)
    assert starts[0] == 0 and starts[-1] > 900 * 8  # spread over the whole split
    assert all(torch.equal(y, x + 1) for x, y in vb)
    again = val_batches(toks, 4, 8, 5)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(vb, again))
    small = val_batches(_stream(10 * 8 + 1), 4, 8, 5)  # fewer windows than asked: each once
    assert [x.shape[0] for x, _ in small] == [4, 4, 2]
    with pytest.raises(DataError, match="validation data has 5 tokens"):
        val_batches(_stream(5), 4, 8, 5)
