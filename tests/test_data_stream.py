"""Streamed, sharded, resumable prepare-data (data/sources.py, data/shards.py, data/stream.py)."""

from __future__ import annotations

import errno
import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from nanochat_ternary.cli import main
from nanochat_ternary.data import TokenBatches, load_prepared, train_tokenizer
from nanochat_ternary.data.shards import INDEX_NAME, ShardedTokens, ShardWriter
from nanochat_ternary.data.sources import Problems, ReadOptions, iter_units, list_inputs
from nanochat_ternary.data.stream import PrepareSettings, prepare_stream
from nanochat_ternary.errors import DataError

SRC = Path(__file__).resolve().parents[1] / "src"


def _corpus(root: Path, n_files: int = 30, lines: int = 40) -> Path:
    """Deterministic Python-looking files of varied size (some share names at two depths)."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    words = ["def", "return", "self", "import", "x", "value", "for", "in", "range", "print", "ünï", "日本"]
    for i in range(n_files):
        body = []
        for j in range(int(rng.integers(lines // 2, lines))):
            ws = " ".join(words[k] for k in rng.integers(0, len(words), int(rng.integers(1, 8))))
            body.append("    " * int(rng.integers(0, 3)) + f"{ws} = {i * j}\n")
        sub = root / ("pkg" if i % 3 == 0 else "") / f"m{i:03d}.py"
        sub.parent.mkdir(parents=True, exist_ok=True)
        sub.write_text("".join(body), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory) -> Path:
    """One BPE for the runs that must be compared token for token."""
    d = tmp_path_factory.mktemp("tok")
    texts = [p.read_text() for p in sorted(_corpus(d / "c").rglob("*.py"))]
    path = d / "tokenizer.json"
    train_tokenizer(texts, 400).save(path)
    return path


def _prep(src, out, tokenizer=None, **kw) -> dict:
    s = PrepareSettings(**{"vocab_size": 400, "val_fraction": 0.2, **kw})
    return prepare_stream([src] if not isinstance(src, list) else src, out, s, tokenizer=tokenizer,
                          show_progress=False).meta


def _split_tokens(out: Path, split: str) -> np.ndarray:
    meta = json.loads((out / "meta.json").read_text())
    if meta["layout"] == "single":
        return np.asarray(load_prepared(out).train if split == "train" else load_prepared(out).val)
    return np.concatenate([np.fromfile(p, dtype=np.uint16, offset=64) for p in sorted(out.glob(f"{split}-*.bin"))])


# ---------------------------------------------------------------------------------------------
# pieces of a large document tokenize like the whole
# ---------------------------------------------------------------------------------------------


def test_pieces_encode_like_the_whole(tmp_path, tok_file):
    from nanochat_ternary.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_file)
    rng = np.random.default_rng(0)
    chunks = ["def f(x):\n", "    return x  \n", "\n\n", "a b  c\t\n", " \n x", "日本語 テキスト\n", "x" * 50,
              "\r\n", "  lead", "end.\nNext", "'s 're", "1 2 3\n"]
    text = "".join(chunks[k] for k in rng.integers(0, len(chunks), 4000))
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    opts = ReadOptions(piece_chars=500)
    units = list(iter_units(list_inputs([tmp_path / "big.txt"], opts), opts, Problems()))
    assert len(units) > 20 and "".join(u.text for u in units) == text
    assert [u.last for u in units] == [False] * (len(units) - 1) + [True]
    whole = tok.encode(text)
    pieces = [i for u in units for i in tok.encode(u.text)]
    assert pieces == whole  # the cut rule keeps every pre-token whole (sources._safe_cut)


# ---------------------------------------------------------------------------------------------
# shards == one file, train from shards, fingerprints
# ---------------------------------------------------------------------------------------------


def test_the_package_exports_the_streamed_prepare(tmp_path, tok_file):
    """`from nanochat_ternary.data import prepare_stream` is the path prepare-data runs (docs/data.md)."""
    import nanochat_ternary.data as data

    assert data.prepare_stream is prepare_stream and data.PrepareSettings is PrepareSettings
    src = _corpus(tmp_path / "src")
    summary = data.prepare_stream([src], tmp_path / "out", data.PrepareSettings(vocab_size=400, shard_tokens=700),
                                  tokenizer=tok_file, show_progress=False)
    assert summary.meta["layout"] == "shards" and summary.meta["train_shards"] > 1
    assert summary.lines()[0].startswith(f"wrote {tmp_path / 'out'}")


def test_shards_concatenated_equal_single_file(tmp_path, tok_file):
    src = _corpus(tmp_path / "src")
    m_shard = _prep(src, tmp_path / "sh", tok_file, shard_tokens=700)
    m_one = _prep(src, tmp_path / "one", tok_file, shard_tokens=0)
    assert m_shard["train_shards"] > 3 and m_one["layout"] == "single"
    for split in ("train", "val"):
        np.testing.assert_array_equal(_split_tokens(tmp_path / "sh", split), _split_tokens(tmp_path / "one", split))
        assert m_shard[f"{split}_tokens"] == m_one[f"{split}_tokens"]
        assert m_shard[f"{split}_bytes"] == m_one[f"{split}_bytes"]
    sizes = [json.loads((tmp_path / "sh" / INDEX_NAME).read_text())["train"]["shards"][i]["tokens"]
             for i in range(m_shard["train_shards"])]
    assert set(sizes[:-1]) == {700} and 0 < sizes[-1] <= 700  # fixed size, the last one partial
    # bytes: every document's UTF-8 bytes, each in one split
    assert m_shard["train_bytes"] + m_shard["val_bytes"] == sum(len(p.read_bytes()) for p in src.rglob("*.py"))
    assert m_shard["n_train_docs"] + m_shard["n_val_docs"] == 30 and m_shard["n_val_docs"] >= 1

    sh, one = load_prepared(tmp_path / "sh"), load_prepared(tmp_path / "one")
    assert isinstance(sh.train, ShardedTokens) and len(sh.train) == len(one.train)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(one.train), (7, 33))
    np.testing.assert_array_equal(sh.train[idx], one.train[idx])
    np.testing.assert_array_equal(sh.train[695:1410], one.train[695:1410])  # spans three shards
    edges = np.arange(690, 723)[None, :] + np.array([[0], [700], [1400], [5]])  # windows across shard edges
    np.testing.assert_array_equal(sh.train[edges], one.train[edges])
    assert sh.train[-1] == one.train[-1] and sh.train[700] == one.train[700]
    # the sampler's batches (rank-disjoint windows, position = step) are the same across shard edges
    for rank in (0, 1):
        a = TokenBatches(sh.train, 4, 32, seed=3, rank=rank, world_size=2)
        b = TokenBatches(one.train, 4, 32, seed=3, rank=rank, world_size=2)
        for step in (0, 5, 40):
            for x, y in zip(a.get(step), b.get(step)):
                assert x.equal(y)


def test_fingerprint_of_shards_equals_single_file(tmp_path, tok_file, monkeypatch):
    import nanochat_ternary.data.shards as shards_mod
    from nanochat_ternary.train import fingerprint

    assert shards_mod.FULL_VIEW_BYTES == fingerprint.FULL_HASH_BYTES  # the two thresholds must agree
    src = _corpus(tmp_path / "src")
    _prep(src, tmp_path / "sh", tok_file, shard_tokens=500)
    _prep(src, tmp_path / "one", tok_file, shard_tokens=0)
    sh, one = load_prepared(tmp_path / "sh"), load_prepared(tmp_path / "one")
    assert fingerprint._array_digest(sh.train) == fingerprint._array_digest(one.train)
    # the block-hash path of large arrays (made small here): slices of the lazy byte view
    monkeypatch.setattr(shards_mod, "FULL_VIEW_BYTES", 1000)
    monkeypatch.setattr(fingerprint, "FULL_HASH_BYTES", 1000)
    monkeypatch.setattr(fingerprint, "_BLOCK_BYTES", 333)
    assert fingerprint._array_digest(sh.train) == fingerprint._array_digest(one.train)


def test_train_two_steps_from_shards_like_single_file(tmp_path, tok_file):
    src = _corpus(tmp_path / "src", n_files=40)
    _prep(src, tmp_path / "sh", tok_file, shard_tokens=600)
    _prep(src, tmp_path / "one", tok_file, shard_tokens=0)
    losses = []
    for name in ("sh", "one"):
        log = tmp_path / f"{name}.jsonl"
        rc = main(["train", "--set", "dim=64", "--set", "n_layers=2", "--set", "n_heads=2", "--set", "n_kv_heads=1",
                   "--batch-size", "4", "--seq-len", "32", "--sample-tokens", "0", "--total-steps", "2",
                   "--log-interval", "1", "--eval-interval", "0", "--device", "cpu", "--dataset", "tokens",
                   "--data-path", str(tmp_path / name), "--checkpoint-dir", str(tmp_path / f"run-{name}"),
                   "--log-file", str(log)])
        assert rc == 0
        losses.append([r["loss"] for r in map(json.loads, log.read_text().splitlines()) if "loss" in r])
    assert losses[0] == losses[1] and len(losses[0]) >= 2


# ---------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}


def test_resume_after_disk_full_gives_the_same_shards(tmp_path, tok_file, monkeypatch):
    src = _corpus(tmp_path / "src")
    _prep(src, tmp_path / "ref", tok_file, shard_tokens=400)
    real_write, calls = ShardWriter._write, [0]

    def failing_write(self, chunk):
        calls[0] += 1
        if calls[0] == 25:
            self.abort()
            raise shards_disk_error(self)
        return real_write(self, chunk)

    def shards_disk_error(self):
        from nanochat_ternary.data.shards import disk_error

        return disk_error(OSError(errno.ENOSPC, "No space left on device"), self._path())

    monkeypatch.setattr(ShardWriter, "_write", failing_write)
    with pytest.raises(DataError, match="disk full while writing .*resume") as e:
        _prep(src, tmp_path / "out", tok_file, shard_tokens=400)
    assert "\n" not in str(e.value)
    out = tmp_path / "out"
    idx = json.loads((out / INDEX_NAME).read_text())
    done = [s["file"] for sp in ("train", "val") for s in idx[sp]["shards"]]
    assert done and not (out / "meta.json").exists() and not list(out.glob(".*.tmp"))
    for name in done:  # every listed shard is whole and equal to the uninterrupted run's
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    with pytest.raises(DataError, match="unfinished prepare-data output"):
        load_prepared(out)
    monkeypatch.setattr(ShardWriter, "_write", real_write)
    summary = prepare_stream([src], out, PrepareSettings(vocab_size=400, val_fraction=0.2, shard_tokens=400),
                             tokenizer=tok_file, show_progress=False)
    assert summary.resumed
    assert _shard_bytes(out) == _shard_bytes(tmp_path / "ref")
    ref_meta = json.loads((tmp_path / "ref" / "meta.json").read_text())
    for k in ("train_tokens", "val_tokens", "train_bytes", "val_bytes", "n_train_docs", "n_val_docs"):
        assert summary.meta[k] == ref_meta[k], k


def test_resume_after_kill_gives_the_same_shards(tmp_path):
    src = _corpus(tmp_path / "src", n_files=120, lines=60)
    args = [str(src), "--vocab-size", "400", "--shard-tokens", "500", "--no-progress", "--tokenizer-sample-mb", "0.05"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "RAYON_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "nanochat_ternary.cli", "prepare-data"]
    same = PrepareSettings(vocab_size=400, shard_tokens=500, tokenizer_sample_bytes=int(0.05 * 2**20))  # = args
    prepare_stream([src], tmp_path / "ref", same, show_progress=False)
    out = tmp_path / "out"
    proc = subprocess.Popen([*cli, *args, "--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(json.loads((out / INDEX_NAME).read_text())["train"]["shards"]) >= 3:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "meta.json").exists(), "the prepare finished before it could be killed"
    assert prepare_stream([src], out, same, show_progress=False).resumed  # the CLI's job, resumed in-process
    assert _shard_bytes(out) == _shard_bytes(tmp_path / "ref")
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "ref" / "tokenizer.json").read_bytes()


# ---------------------------------------------------------------------------------------------
# the output dir
# ---------------------------------------------------------------------------------------------


def test_out_dir_is_never_replaced(tmp_path, tok_file, capsys):
    src = _corpus(tmp_path / "src", n_files=6)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    assert main(["prepare-data", str(src), "--out", str(precious), "--tokenizer", str(tok_file)]) == 1
    assert "not empty" in capsys.readouterr().err and (precious / "notes.txt").read_text() == "keep me"
    done = tmp_path / "done"
    assert main(["prepare-data", str(src), "--out", str(done), "--no-progress"]) == 0
    before = _shard_bytes(done)
    assert main(["prepare-data", str(src), "--out", str(done), "--no-progress"]) == 1  # finished: refused too
    assert "never replaces" in capsys.readouterr().err and _shard_bytes(done) == before
    # an unfinished prepare of other settings is not resumed
    idx = json.loads((done / INDEX_NAME).read_text())
    (done / "meta.json").unlink()
    assert main(["prepare-data", str(src), "--out", str(done), "--seed", "1", "--no-progress"]) == 1
    assert "other inputs or settings" in capsys.readouterr().err
    assert json.loads((done / INDEX_NAME).read_text()) == idx
    # an empty dir is fine; an output inside the input dir is not read back
    (tmp_path / "empty").mkdir()
    assert main(["prepare-data", str(src), "--out", str(tmp_path / "empty"), "--no-progress"]) == 0
    assert main(["prepare-data", str(src), "--out", str(src / "prepared"), "--no-progress", "--glob", "**/*"]) == 0
    assert json.loads((src / "prepared" / "meta.json").read_text())["n_docs"] == 6


def test_meta_tokenizer_stays_inside_its_dir(tmp_path, tok_file):
    src = _corpus(tmp_path / "src", n_files=6)
    for layout in (0, 300):
        out = tmp_path / f"o{layout}"
        _prep(src, out, tok_file, shard_tokens=layout)
        meta = json.loads((out / "meta.json").read_text())
        secret = tmp_path / "secret.json"
        secret.write_text("{}")
        for bad in (str(secret), "../secret.json", ["tokenizer.json"]):
            (out / "meta.json").write_text(json.dumps({**meta, "tokenizer": bad}))
            with pytest.raises(DataError, match="'tokenizer' must be a file name inside"):
                load_prepared(out)
        (out / "meta.json").write_text(json.dumps({**meta, "tokenizer": "link.json"}))
        (out / "link.json").symlink_to(secret)
        with pytest.raises(DataError, match="not a link"):
            load_prepared(out)
        (out / "meta.json").write_text(json.dumps(meta))
        assert load_prepared(out).tokenizer_path == out / "tokenizer.json"
    # an index naming a file outside the dir
    out = tmp_path / "o300"
    idx = json.loads((out / INDEX_NAME).read_text())
    idx["train"]["shards"][0]["file"] = "../o0/train.bin"
    (out / INDEX_NAME).write_text(json.dumps(idx))
    with pytest.raises(DataError, match="is not a train shard name"):
        load_prepared(out)


# ---------------------------------------------------------------------------------------------
# inputs and bad inputs
# ---------------------------------------------------------------------------------------------


def _bad_tree(root: Path) -> tuple[Path, list[str]]:
    """Good documents in every supported form, plus one of every bad input; the expected texts."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    root.mkdir(parents=True)
    good = [f"def good{i}(): return {i}\n" * 5 for i in range(6)]
    (root / "a.py").write_text(good[0])
    with gzip.open(root / "b.txt.gz", "wt") as f:
        f.write(good[1])
    (root / "c.jsonl").write_text(json.dumps({"text": good[2]}) + "\nnot json\n" + json.dumps({"id": 1}) + "\n"
                                  + json.dumps({"text": 5}) + "\n[1, 2]\n\n")
    zst = zstandard.ZstdCompressor().compress((json.dumps({"text": good[3]}) + "\n").encode())
    (root / "d.jsonl.zst").write_bytes(zst)
    pq.write_table(pa.table({"text": [good[4], None, ""]}), root / "e.parquet")
    pq.write_table(pa.table({"content": ["no text column"]}), root / "f.parquet")
    (root / "g.txt").write_text(good[5])
    (root / "empty.txt").write_bytes(b"")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0IHDR" + bytes(range(256)))
    (root / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    whole = gzip.compress(("truncated text " * 2000).encode())
    (root / "trunc.txt.gz").write_bytes(whole[: len(whole) // 2])
    (root / "notparquet.parquet").write_bytes(b"PAR1 garbage")
    return root, good


def test_bad_inputs_are_counted_and_skipped(tmp_path, tok_file, capsys):
    root, good = _bad_tree(tmp_path / "in")
    rc = main(["prepare-data", str(root), "--out", str(tmp_path / "out"), "--tokenizer", str(tok_file),
               "--val-fraction", "0.3", "--no-progress", "--shard-tokens", "100"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    warn = [line for line in cap.err.splitlines() if line.startswith("warning:")]
    assert len(warn) == 1 and "skipped 10 bad inputs" in warn[0] and "and 5 more" in warn[0]
    for kind in ("not JSON", "no 'text' field", "binary", "not UTF-8", "empty", "truncated or corrupt .gz",
                 "no column 'text'", "not a readable parquet"):
        assert kind in warn[0], kind
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["n_docs"] == len(good) and meta["skipped_files"] == 10
    assert meta["train_bytes"] + meta["val_bytes"] == sum(len(g.encode()) for g in good)
    data = load_prepared(tmp_path / "out")
    from nanochat_ternary.data.tokenizer import load_tokenizer

    text = load_tokenizer(tok_file).decode(np.concatenate([np.asarray(data.train), np.asarray(data.val)]))
    assert sorted(t for t in text.split("<|endoftext|>") if t) == sorted(good)
    # --strict: the first bad input is one error line, nothing is written
    rc = main(["prepare-data", str(root), "--out", str(tmp_path / "strict"), "--tokenizer", str(tok_file), "--strict",
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("error: ") and "--strict" in err[0]
    assert not [p for p in (tmp_path / "strict").iterdir() if not p.name.startswith(".")]  # nothing claimed


def test_nothing_readable_and_special_files(tmp_path, capsys):
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_bytes(b"\0\1")
    assert main(["prepare-data", str(tmp_path / "blank"), "--out", str(tmp_path / "o1"), "--no-progress"]) == 1
    assert "no text found" in capsys.readouterr().err
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert main(["prepare-data", str(fifo), "--out", str(tmp_path / "o2"), "--no-progress"]) == 1
    assert "not a regular file" in capsys.readouterr().err
    assert main(["prepare-data", str(tmp_path / "nope"), "--out", str(tmp_path / "o3")]) == 1
    assert main(["prepare-data", str(tmp_path / "blank"), "--out", str(tmp_path / "o4"), "--shard-tokens", "-1"]) == 1
    capsys.readouterr()
    (tmp_path / "blank" / "b.txt").write_text("some text\n")
    assert main(["prepare-data", str(tmp_path / "blank"), "--out", str(tmp_path / ("x" * 300)), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot create --out")


def test_hf_datasets_dir(tmp_path, tok_file):
    datasets = pytest.importorskip("datasets")
    texts = [f"row {i}: def f{i}(): return {i}\n" * 3 for i in range(12)]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": texts[:9]}),
                               "test": datasets.Dataset.from_dict({"content": texts[9:]})})
    dd.save_to_disk(str(tmp_path / "hf"))
    meta = _prep(tmp_path / "hf", tmp_path / "out", tok_file, text_field="content", shard_tokens=0)
    assert meta["n_docs"] == 12 and meta["train_bytes"] + meta["val_bytes"] == sum(len(t) for t in texts)


def test_val_split_is_stable_when_the_corpus_grows(tmp_path, tok_file):
    src = _corpus(tmp_path / "src", n_files=40)
    opts = ReadOptions()
    from nanochat_ternary.data.stream import _unit_hash

    def val_keys():
        return {u.key for u in iter_units(list_inputs([src], opts), opts, Problems()) if _unit_hash(0, u.key) < 0.2}

    before = val_keys()
    (src / "zz_new.py").write_text("x = 1\n")
    (src / "aa_new.py").write_text("y = 2\n")
    after = val_keys()
    assert before and after - {"zz_new.py", "aa_new.py"} == before


# ---------------------------------------------------------------------------------------------
# bounded memory
# ---------------------------------------------------------------------------------------------

_MEMORY_CHILD = textwrap.dedent("""
    import sys
    from nanochat_ternary.data.stream import PrepareSettings, prepare_stream

    def hwm_kib():  # peak resident set size so far
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1])

    warm, big, tok, out = sys.argv[1:5]
    s = PrepareSettings(shard_tokens=200_000, batch_chars=1 << 18)
    prepare_stream([warm], out + "-warm", s, tokenizer=tok, show_progress=False)  # imports, pools, caches
    before = hwm_kib()
    m = prepare_stream([big], out, s, tokenizer=tok, show_progress=False).meta
    print(before, hwm_kib(), m["train_bytes"] + m["val_bytes"])
""")


def _fast_tokenizer(path: Path) -> Path:
    """A line-level WordLevel tokenizer (~10x faster than byte-level BPE), so a corpus many times the
    memory budget prepares in seconds; the pipeline's memory does not depend on the tokenizer's model."""
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    hf = HF(models.WordLevel(vocab={"<unk>": 0, "<|endoftext|>": 1}, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Split(pattern="\n", behavior="isolated")
    hf.save(str(path))
    return path


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_corpus_larger_than_the_memory_budget(tmp_path):
    line = "".join(f"line {i} of text that is long enough to matter {'x' * (i % 50)}\n" for i in range(1000))
    warm = tmp_path / "warm"  # the same kinds of files as the big corpus, 1/10 of its size
    warm.mkdir()
    (warm / "one-large-file.txt").write_text(line * 40)
    for i in range(30):
        (warm / f"f{i:03d}.txt").write_text(line * 2)
    big = tmp_path / "big"
    big.mkdir()
    (big / "one-large-file.txt").write_text(line * 400)  # 27 MB in one document: read and cut in pieces
    for i in range(300):
        (big / f"f{i:03d}.txt").write_text(line * 2)
    tok = _fast_tokenizer(tmp_path / "tok.json")
    env = {**os.environ, "PYTHONPATH": str(SRC), "MALLOC_ARENA_MAX": "2"}
    r = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(tmp_path / "warm"), str(big), str(tok),
                        str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    before, after, corpus = map(int, r.stdout.split())
    budget_kib = 24 * 1024  # the prepare's growth over its warm-up; the old in-memory prepare grew by ~2.3x the corpus
    assert corpus > 2.5 * budget_kib * 1024
    print(f"peak RSS {before / 1024:.0f} -> {after / 1024:.0f} MiB on a {corpus / 2**20:.0f} MiB corpus")
    assert after - before < budget_kib, f"peak RSS grew by {(after - before) / 1024:.1f} MiB"


# ---------------------------------------------------------------------------------------------
# past one machine: datatrove's pipeline writes, our trainer reads
# ---------------------------------------------------------------------------------------------


def test_datatrove_pipeline_output_trains(tmp_path, tok_file):
    pytest.importorskip("datatrove")
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import ParquetReader

    from nanochat_ternary.data.datatrove_io import finish_dir, in_split, tokenize_pipelines
    from nanochat_ternary.data.tokenizer import load_tokenizer

    src = _corpus(tmp_path / "src", n_files=40)
    texts = [p.read_text() + "# a literal <|endoftext|> is text\n" for p in sorted(src.rglob("*.py"))]
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "pq").mkdir()
    ids = [f"doc-{i}" for i in range(len(texts))]
    pq.write_table(pa.table({"text": texts, "id": ids}), tmp_path / "pq" / "p0.parquet")
    out = tmp_path / "dt"
    pipes = tokenize_pipelines(lambda: ParquetReader(str(tmp_path / "pq")), out, tok_file, val_fraction=0.2)
    for split, steps in pipes.items():
        LocalPipelineExecutor(steps, tasks=1, workers=1, logging_dir=str(tmp_path / f"logs-{split}")).run()
    meta = finish_dir(out, tok_file, val_fraction=0.2)
    val_ids = [i for i in range(len(texts)) if in_split(f"doc-{i}", "val", 0.2)]
    assert meta["n_val_docs"] == len(val_ids) >= 1 and meta["n_docs"] == len(texts)
    data = load_prepared(out)
    tok = load_tokenizer(tok_file)
    # datatrove's tokens are ours: each val document encoded with our tokenizer, then the separator
    expect = np.concatenate([np.r_[tok.encode(texts[i]), tok.eot_id] for i in val_ids])
    np.testing.assert_array_equal(np.asarray(data.val), expect)
    assert meta["val_bytes"] == sum(len(texts[i].encode()) for i in val_ids)
    log = tmp_path / "train.jsonl"
    rc = main(["train", "--set", "dim=64", "--set", "n_layers=2", "--set", "n_heads=2", "--set", "n_kv_heads=1",
               "--batch-size", "4", "--seq-len", "32", "--sample-tokens", "0", "--total-steps", "2",
               "--log-interval", "1", "--eval-interval", "0", "--device", "cpu", "--data-path", str(out),
               "--checkpoint-dir", str(tmp_path / "run"), "--log-file", str(log)])
    assert rc == 0
