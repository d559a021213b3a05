"""Tests for nanoternary/data.py: sources, token files, the cache (checksums, temporary files of a
killed run), bad input, batches, the hub; and nanoternary/fileio.py's temporary files.

Every test writes its own small files (parquet through pyarrow, .txt, .jsonl) in tmp_path and uses a
cache folder there too; the hub is a local fsspec filesystem here (tests/test_hub.py runs the hub
paths through huggingface_hub's HTTP client against a local server); no network is used.

    python -m pytest -q tests/test_data.py
"""

import json
import os
import stat
import subprocess
import sys
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.dirfs import DirFileSystem

from nanoternary import data  # noqa: F401
from nanoternary import sources as S
from nanoternary import tokens as D
from nanoternary.data import DataError, get_batch, prepare, val_windows
from nanoternary.fileio import HOST, atomic_open, remove_stale_temps, temp_path
from nanoternary.tokenizer import EOT, get_encoding

WORDS = ("the model reads a token and predicts the next one while ternary weights stay small "
         "café naïve 日本 🙂 42 3.14 — data, text; loss!").split()


def make_docs(n, seed=0, words=(20, 120)):
    """n deterministic documents of a few dozen words each."""
    rng = np.random.default_rng(seed)
    return [f"Document {i}. " + " ".join(rng.choice(WORDS, size=rng.integers(*words)))
            for i in range(n)]


def write_parquet(path, texts, row_group_size=None, **columns):
    table = pa.table({"id": [f"doc{i}" for i in range(len(texts))], "text": texts, **columns})
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def read_docs(tokens):
    """Split a token file back into documents at <|endoftext|>, decoded."""
    enc, docs, start = get_encoding(), [], 0
    ids = np.asarray(tokens).tolist()
    for i, t in enumerate(ids):
        if t == EOT:
            docs.append(enc.decode(ids[start:i]))
            start = i + 1
    if start < len(ids):
        docs.append(enc.decode(ids[start:]))
    return docs


def n_tokens(texts):
    return sum(len(ids) for ids in get_encoding().encode_ordinary_batch(texts))


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


@pytest.fixture
def encode_calls(monkeypatch):
    """Counts the texts handed to the tokenizer (so we can see whether a run re-tokenized)."""
    calls = []
    real = D.encode_batch

    def counting(enc, texts, pool):
        calls.append(len(texts))
        return real(enc, texts, pool)
    monkeypatch.setattr(D, "encode_batch", counting)
    return calls


# ---------------------------------------------------------------------------------------------
# Token files and counts

def test_parquet_to_token_files(tmp_path, cache):
    docs = make_docs(60)
    texts = docs[:20] + [None, ""] + docs[20:]             # a null and an empty text: skipped
    path = write_parquet(tmp_path / "a.parquet", texts, row_group_size=7,
                         url=[f"u{i}" for i in range(len(texts))])
    d = prepare(path, cache_dir=cache, verbose=False, val_fraction=0.2)
    m = d.meta
    assert (m["documents"], m["skipped"]) == (60, 2)
    assert m["text_tokens"] == n_tokens(docs)
    assert m["tokens"] == m["text_tokens"] + 60              # one <|endoftext|> per document
    assert m["train_tokens"] + m["val_tokens"] == m["tokens"]
    assert m["train_documents"] + m["val_documents"] == 60 and m["val_documents"] > 0
    assert (len(d.train), len(d.val)) == (m["train_tokens"], m["val_tokens"])
    assert d.train.dtype == np.uint16 and d.val.dtype == np.uint16
    assert d.train[-1] == EOT and d.val[-1] == EOT
    # split by document: each document is whole in exactly one split, in reading order
    train_docs, val_docs = read_docs(d.train), read_docs(d.val)
    assert sorted(train_docs + val_docs) == sorted(docs)
    assert train_docs == [t for t in docs if t in set(train_docs)]
    # bytes per split = UTF-8 bytes of its documents (for bits per byte)
    assert m["train_bytes"] == sum(len(t.encode()) for t in train_docs)
    assert m["val_bytes"] == sum(len(t.encode()) for t in val_docs)
    assert m["tokenizer"] == "gpt2" and len(m["vocab_sha256"]) == 64 and m["format"] == D.FORMAT_VERSION
    assert m["sources"][0]["bytes"] == os.path.getsize(path)
    assert d.path.startswith(os.path.join(cache, "tokens", "a-"))


def test_split_is_deterministic_by_seed_and_independent_of_batching(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "a.parquet", make_docs(200), row_group_size=50)
    a = prepare(path, cache_dir=str(tmp_path / "c1"), verbose=False, seed=1)
    monkeypatch.setattr(D, "BATCH_CHARS", 500)               # many small batches
    b = prepare(path, cache_dir=str(tmp_path / "c2"), verbose=False, seed=1)
    c = prepare(path, cache_dir=str(tmp_path / "c3"), verbose=False, seed=2)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert not np.array_equal(a.val, c.val)
    assert 0 < a.meta["val_documents"] < 30                  # about 5% of 200


def test_tiny_input_still_gets_a_validation_document(tmp_path, cache):
    path = write_parquet(tmp_path / "a.parquet", make_docs(3))
    d = prepare(path, cache_dir=cache, verbose=False)
    assert (d.meta["train_documents"], d.meta["val_documents"]) == (2, 1)
    assert sorted(read_docs(d.train) + read_docs(d.val)) == sorted(make_docs(3))
    assert d.meta["val_bytes"] == len(read_docs(d.val)[0].encode())


def test_encode_one_is_encode_ordinary():
    enc = get_encoding()
    texts = make_docs(20) + ["a <|endoftext|> b", "\n\n  \t", "lone surrogate \ud800 here", "x"]
    for text in texts:
        ids = D.encode_one(enc, text)
        assert ids.dtype == np.uint32 and ids.tolist() == enc.encode_ordinary(text), text


def test_lone_surrogate_in_jsonl(tmp_path, cache):
    # JSON may escape a lone surrogate; tiktoken encodes it as U+FFFD (3 bytes)
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "bad \\ud800 char"}\n{"text": "fine"}\n')
    d = prepare(str(path), cache_dir=cache, verbose=False, val_fraction=0.5)
    assert sorted(read_docs(d.train) + read_docs(d.val)) == ["bad \ufffd char", "fine"]
    assert d.meta["train_bytes"] + d.meta["val_bytes"] == len("bad \ufffd char".encode()) + 4


def test_txt_and_jsonl_sources(tmp_path, cache):
    docs = make_docs(8)
    (tmp_path / "one.txt").write_text(docs[0] + "\n")                         # one document
    (tmp_path / "many.txt").write_text("<|endoftext|>".join(docs[1:4]) + "<|endoftext|>\n")
    with open(tmp_path / "c.jsonl", "w") as f:
        for t in docs[4:] + [None]:
            f.write(json.dumps({"text": t, "n": 1}) + "\n")
        f.write("\n")                                                         # blank line: ignored
    d = prepare([str(tmp_path / "one.txt"), str(tmp_path / "many.txt"), str(tmp_path / "*.jsonl")],
                cache_dir=cache, verbose=False, val_fraction=0.3)
    assert d.meta["documents"] == 8
    assert d.meta["skipped"] == 2                # the empty piece after the last separator, the null
    assert sorted(read_docs(d.train) + read_docs(d.val)) == sorted([docs[0] + "\n"] + docs[1:])


def test_max_tokens_cuts_exactly_and_is_a_prefix(tmp_path, cache):
    path = write_parquet(tmp_path / "a.parquet", make_docs(100), row_group_size=10)
    full = prepare(path, cache_dir=cache, verbose=False)
    cap = full.meta["tokens"] // 3 + 7
    capped = prepare(path, cache_dir=cache, verbose=False, max_tokens=cap)
    assert capped.path != full.path
    assert capped.meta["tokens"] == len(capped.train) + len(capped.val) == cap
    assert capped.meta["truncated"] and not full.meta["truncated"]
    assert capped.meta["documents"] < full.meta["documents"]
    # the same documents, in the same splits, up to the cut
    assert np.array_equal(capped.train, full.train[:len(capped.train)])
    assert np.array_equal(capped.val, full.val[:len(capped.val)])


# ---------------------------------------------------------------------------------------------
# The cache: reuse, invalidation, interrupted and corrupt writes

def test_cache_is_reused_without_tokenizing(tmp_path, cache, encode_calls):
    path = write_parquet(tmp_path / "a.parquet", make_docs(30))
    first = prepare(path, cache_dir=cache, verbose=False)
    assert not first.cached and sum(encode_calls) == 30
    mtime = os.path.getmtime(os.path.join(first.path, "train.bin"))
    second = prepare(path, cache_dir=cache, verbose=False)
    assert second.cached and second.path == first.path
    assert sum(encode_calls) == 30, "the second prepare should not tokenize again"
    assert os.path.getmtime(os.path.join(second.path, "train.bin")) == mtime
    assert np.array_equal(first.train, second.train) and second.meta == first.meta


def test_cache_is_rebuilt_when_source_or_settings_change(tmp_path, cache, encode_calls):
    path = write_parquet(tmp_path / "a.parquet", make_docs(30))
    first = prepare(path, cache_dir=cache, verbose=False)
    for settings in ({"seed": 1}, {"val_fraction": 0.2}, {"max_tokens": 500}):
        other = prepare(path, cache_dir=cache, verbose=False, **settings)
        assert not other.cached and other.path != first.path, settings
    n = len(encode_calls)
    write_parquet(path, make_docs(31))                      # the source changes
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = prepare(path, cache_dir=cache, verbose=False)
    assert not changed.cached and len(encode_calls) > n
    assert changed.meta["documents"] == 31


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_write_leaves_nothing_trusted(tmp_path, cache, monkeypatch, error):
    path = write_parquet(tmp_path / "a.parquet", make_docs(50), row_group_size=5)
    monkeypatch.setattr(D, "BATCH_CHARS", 1000)
    real, calls = D.encode_batch, []

    def dies_on_third_batch(enc, texts, pool):
        calls.append(1)
        if len(calls) == 3:
            raise error("interrupted")
        return real(enc, texts, pool)
    monkeypatch.setattr(D, "encode_batch", dies_on_third_batch)
    with pytest.raises(error):
        prepare(path, cache_dir=cache, verbose=False)
    left = [f for _, _, files in os.walk(cache) for f in files]
    assert left == [], f"an interrupted run left {left}"
    monkeypatch.setattr(D, "encode_batch", real)
    d = prepare(path, cache_dir=cache, verbose=False)
    assert not d.cached and d.meta["documents"] == 50


def test_truncated_or_corrupt_cache_is_detected_and_rebuilt(tmp_path, cache, capsys):
    path = write_parquet(tmp_path / "a.parquet", make_docs(30))
    good = prepare(path, cache_dir=cache, verbose=False)
    train = np.array(good.train)
    train_bin, meta_json = (os.path.join(good.path, f) for f in ("train.bin", "meta.json"))
    with open(train_bin, "r+b") as f:
        f.truncate(os.path.getsize(train_bin) - 2)
    d = prepare(path, cache_dir=cache, verbose=False)
    assert not d.cached and np.array_equal(d.train, train)
    assert "is corrupt (train.bin has" in capsys.readouterr().err
    with open(meta_json, "w") as f:
        f.write('{"format": 1, "trai')                       # half a meta.json
    d = prepare(path, cache_dir=cache, verbose=False)
    assert not d.cached and np.array_equal(d.train, train)
    assert "meta.json is unreadable" in capsys.readouterr().err
    with open(meta_json) as f:
        meta = json.load(f)
    for edit, message in (({"train_tokens": meta["train_tokens"] + 1}, "train.bin has"),
                          ({"format": 0}, "format 0, expected"),
                          ({"key": "0123456789abcdef"}, "meta.json is for key 0123456789abcdef")):
        with open(meta_json, "w") as f:
            json.dump({**meta, **edit}, f)                   # a meta.json that does not match
        d = prepare(path, cache_dir=cache, verbose=False)
        assert not d.cached and np.array_equal(d.train, train)
        assert message in capsys.readouterr().err
    os.remove(meta_json)                                     # .bin files without meta.json
    d = prepare(path, cache_dir=cache, verbose=False)
    assert not d.cached and "incomplete (no meta.json" in capsys.readouterr().err
    assert D.load_cache(d.path) is not None


@pytest.mark.parametrize("fill", [b"\x00", b"\xff"])
def test_cache_overwritten_at_the_same_size_is_rebuilt(tmp_path, cache, capsys, fill):
    """Zeros would be trusted as tokens, 0xFFFF would fail far away (in the embedding) naming no file:
    the checksum catches both when the cache is opened."""
    path = write_parquet(tmp_path / "a.parquet", make_docs(30))
    good = prepare(path, cache_dir=cache, verbose=False)
    train = np.array(good.train)
    train_bin = os.path.join(good.path, "train.bin")
    size = os.path.getsize(train_bin)
    del good
    with open(train_bin, "wb") as f:
        f.write(fill * size)
    d = prepare(path, cache_dir=cache, verbose=False)
    err = capsys.readouterr().err
    assert not d.cached and np.array_equal(d.train, train)
    assert err.count("\n") == 1 and "train.bin does not match its checksum" in err and d.path in err
    assert prepare(path, cache_dir=cache, verbose=False).cached        # and the rebuilt one is trusted


def test_cache_ids_are_checked_against_the_vocabulary(tmp_path, cache, capsys):
    path = write_parquet(tmp_path / "a.parquet", make_docs(30))
    good = prepare(path, cache_dir=cache, verbose=False)
    val_bin, meta_json = os.path.join(good.path, "val.bin"), os.path.join(good.path, "meta.json")
    with open(val_bin, "r+b") as f:
        f.write(np.array([65535], np.uint16).tobytes())               # one id out of range ...
    meta = json.load(open(meta_json))
    meta["crc32"]["val.bin"] = D.scan_tokens(val_bin)[0]               # ... and a checksum that agrees
    with open(meta_json, "w") as f:
        json.dump(meta, f)
    assert D.load_cache(good.path) is None
    assert "val.bin holds token id 65535, not below the vocabulary size 50257" in capsys.readouterr().err
    assert D.scan_tokens(os.path.join(good.path, "train.bin"))[1] == EOT   # the largest id of real tokens


def test_cache_of_an_older_version_is_rebuilt(tmp_path, cache, capsys):
    path = write_parquet(tmp_path / "a.parquet", make_docs(30))
    good = prepare(path, cache_dir=cache, verbose=False)
    meta_json = os.path.join(good.path, "meta.json")
    meta = json.load(open(meta_json))
    assert set(meta["crc32"]) == {"train.bin", "val.bin"}
    del meta["crc32"]
    with open(meta_json, "w") as f:
        json.dump({**meta, "format": 1}, f)                            # as version 1 wrote it
    d = prepare(path, cache_dir=cache, verbose=False)
    assert not d.cached and d.path == good.path
    assert "cannot be trusted (it was made by an older version of nanoternary, without checksums)" in \
        capsys.readouterr().err


def test_cache_files_have_the_usual_permissions(tmp_path, cache):
    old = os.umask(0o022)
    try:
        d = prepare(write_parquet(tmp_path / "a.parquet", make_docs(10)), cache_dir=cache, verbose=False)
        os.umask(0o002)
        with atomic_open(str(tmp_path / "x.bin")) as f:
            f.write(b"x")
    finally:
        os.umask(old)
    for name in ("train.bin", "val.bin", "meta.json"):                 # not tempfile.mkstemp's 0600
        assert stat.S_IMODE(os.stat(os.path.join(d.path, name)).st_mode) == 0o644, name
    assert stat.S_IMODE(os.stat(tmp_path / "x.bin").st_mode) == 0o664


# ---------------------------------------------------------------------------------------------
# Temporary files of a process killed with kill -9

def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_remove_stale_temps_only_of_dead_writers(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            f"a.bin.{HOST}-{dead_pid()}-0123abcd.tmp": True,             # its writer has ended
            f"b.bin.{HOST}-{sleeper.pid}-0123abcd.tmp": False,           # its writer still runs
            f"c.bin.{HOST}-{os.getpid()}-0123abcd.tmp": False,           # ours
            f"d.bin.other-host-{dead_pid()}-0123abcd.tmp": False,        # another machine's pid means nothing here
            "notes.2024.tmp": False, "e.bin.tmp": False, "train.bin": False,   # not made by fileio
        }
        for name in names:
            (tmp_path / name).write_bytes(b"x")
        removed = remove_stale_temps(str(tmp_path))
        assert sorted(os.path.basename(p) for p in removed) == [n for n, gone in names.items() if gone]
        assert sorted(os.listdir(tmp_path)) == sorted(n for n, gone in names.items() if not gone)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_stale_temps(str(tmp_path / "missing")) == []
    tmp = temp_path(str(tmp_path / "x.npz"))
    assert os.path.basename(tmp).startswith(f"x.npz.{HOST}-{os.getpid()}-") and tmp.endswith(".tmp")


KILLED_WRITER = """
import sys, time
from nanoternary import tokens as D
real, calls = D.encode_batch, []
def stall(enc, texts, pool):                     # the third batch never comes: we are killed first
    calls.append(1)
    if len(calls) == 3:
        open(sys.argv[1], "w").close()
        time.sleep(60)
    return real(enc, texts, pool)
D.encode_batch, D.BATCH_CHARS = stall, 1000
D.prepare(sys.argv[2], cache_dir=sys.argv[3], verbose=False, num_threads=1)
"""


def test_kill_9_during_a_build_leaves_temps_that_the_next_run_removes(tmp_path, cache, capsys):
    path = write_parquet(tmp_path / "a.parquet", make_docs(50), row_group_size=5)
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(D.__file__)))}
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(ready), path, cache], env=env)
    try:
        for _ in range(1500):                                            # up to 30 s for the imports
            if ready.exists() or writer.poll() is not None:
                break
            time.sleep(0.02)
        assert ready.exists(), "the writer did not start"
        tokens_dir = os.path.join(cache, "tokens")
        (folder,) = os.listdir(tokens_dir)
        temps = sorted(f for f in os.listdir(os.path.join(tokens_dir, folder)) if f.endswith(".tmp"))
        assert [t.split(".")[0] for t in temps] == ["train", "val"] and f"-{writer.pid}-" in temps[0]
        assert remove_stale_temps(os.path.join(tokens_dir, folder)) == []   # a live writer's: kept
    finally:
        writer.kill()                                                    # SIGKILL: no clean-up runs
        writer.wait()
    assert sorted(f for f in os.listdir(os.path.join(tokens_dir, folder)) if f.endswith(".tmp")) == temps
    d = prepare(path, cache_dir=cache, verbose=False)
    assert "removed 2 temporary file(s) of a killed run" in capsys.readouterr().err
    assert d.meta["documents"] == 50 and d.path == os.path.join(tokens_dir, folder)
    assert not [f for _, _, files in os.walk(cache) for f in files if f.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error naming the file

def bad_inputs(tmp_path):
    no_text = write_parquet(tmp_path / "no_text.parquet", ["x"])
    pq.write_table(pa.table({"id": ["a"], "body": ["x"], "url": ["u"]}), no_text)
    int_text = tmp_path / "int_text.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), int_text)
    (tmp_path / "fake.parquet").write_text("this is not parquet, just text " * 10)
    (tmp_path / "empty.parquet").write_bytes(b"")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "oops"\n')
    (tmp_path / "notext.jsonl").write_text('{"body": "x", "id": 1}\n')
    (tmp_path / "data.csv").write_text("text\nhello\n")
    (tmp_path / "nulls.parquet").write_bytes(b"")
    write_parquet(tmp_path / "nulls.parquet", [None, "", None])
    (tmp_path / "folder").mkdir()
    return {
        str(no_text): r"no_text.parquet: no 'text' column \(its columns: id, body, url\)",
        str(int_text): r"int_text.parquet: column 'text' holds int64, not strings",
        str(tmp_path / "fake.parquet"): r"fake.parquet: not a parquet file \(.*magic bytes",
        str(tmp_path / "empty.parquet"): r"empty.parquet: the file is empty \(0 bytes\)",
        str(tmp_path / "empty.txt"): r"empty.txt: the file is empty",
        str(tmp_path / "nothing*.parquet"): r"'.*nothing\*.parquet' matches no files",
        str(tmp_path / "missing.parquet"): r"missing.parquet: no such file",
        str(tmp_path / "folder"): r"folder: is a directory; pass a glob such as '.*folder/\*.parquet'",
        str(tmp_path / "bad.jsonl"): r"bad.jsonl:2: not valid JSON",
        str(tmp_path / "notext.jsonl"): r"notext.jsonl:1: no 'text' field \(fields: body, id\)",
        str(tmp_path / "data.csv"): r"data.csv: unsupported file type '.csv'",
        str(tmp_path / "nulls.parquet"): r"no documents in .*nulls.parquet: all 3 texts are null or empty",
    }


def test_bad_inputs_raise_clear_errors(tmp_path, cache):
    for path, message in bad_inputs(tmp_path).items():
        with pytest.raises(DataError, match=message):
            prepare(path, cache_dir=cache, verbose=False)
    assert not any(files for _, _, files in os.walk(cache)), "a failed run left files behind"


def test_bad_file_among_good_ones_fails_before_tokenizing(tmp_path, cache, encode_calls):
    good = write_parquet(tmp_path / "good.parquet", make_docs(5))
    (tmp_path / "zz.parquet").write_text("garbage")
    with pytest.raises(DataError, match="zz.parquet: not a parquet file"):
        prepare(str(tmp_path / "*.parquet"), cache_dir=cache, verbose=False)
    assert encode_calls == [] and good


def test_command_line_prints_one_line_errors(tmp_path, cache, capsys):
    for path, message in bad_inputs(tmp_path).items():
        assert D.main(["--data", path, "--cache-dir", cache, "--quiet"]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and err.startswith("error: "), err
        assert "Traceback" not in err


def test_command_line_json_and_table(tmp_path, cache, capsys):
    docs = make_docs(40)
    write_parquet(tmp_path / "a-1.parquet", docs[:25])
    write_parquet(tmp_path / "a-2.parquet", docs[25:])
    assert D.main(["--data", str(tmp_path / "a-*.parquet"), "--cache-dir", cache, "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)                                 # exactly one JSON object on stdout
    assert report["documents"] == 40
    assert report["text_tokens"] == n_tokens(docs) and report["tokens"] == report["text_tokens"] + 40
    assert report["train_tokens"] + report["val_tokens"] == report["tokens"]
    assert {"train_documents", "val_documents", "train_bytes", "val_bytes", "skipped", "path"} <= set(report)
    assert len(report["sources"]) == 2 and "100%" in err     # the progress bar went to stderr
    assert D.main(["--data", str(tmp_path / "a-*.parquet"), "--cache-dir", cache]) == 0
    out, _ = capsys.readouterr()
    assert "(cached)" in out and f"{report['tokens']:,}" in out and "train" in out and "val" in out


def corrupt_data_page(path, group):
    """Overwrite 32 bytes in the middle of the `text` data page of a row group, keeping the footer."""
    col = pq.ParquetFile(path).metadata.row_group(group).column(0)
    assert col.path_in_schema == "text" and col.compression == "SNAPPY"
    middle = col.data_page_offset + col.total_compressed_size // 2
    with open(path, "r+b") as f:
        f.seek(middle)
        f.write(b"\xff" * 32)


def test_parquet_with_a_corrupt_data_page(tmp_path, cache, capsys):
    path = str(tmp_path / "damaged.parquet")
    pq.write_table(pa.table({"text": make_docs(40), "id": [str(i) for i in range(40)]}), path,
                   row_group_size=20, compression="snappy", use_dictionary=False)
    corrupt_data_page(path, 1)
    with pytest.raises(OSError, match="Corrupt snappy compressed data"):    # what pyarrow says
        pq.ParquetFile(path).read_row_group(1, columns=["text"])
    message = r"damaged.parquet: row group 1 of 2 cannot be read \(OSError: Corrupt snappy compressed data.*the file is damaged"
    with pytest.raises(DataError, match=message):
        prepare(path, cache_dir=cache, verbose=False)
    assert not any(files for _, _, files in os.walk(cache)), "a failed run left files behind"
    assert D.main(["--data", path, "--cache-dir", cache, "--quiet"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and path in err


def test_cache_folder_that_cannot_be_written(tmp_path, capsys):
    """A path through a regular file: makedirs fails for root too (chmod does not stop root)."""
    path = write_parquet(tmp_path / "a.parquet", make_docs(5))
    (tmp_path / "file").write_text("not a folder")
    cache = str(tmp_path / "file" / "cache")
    message = r"cannot write to the cache folder .*file/cache \(.*file/cache.*: Not a directory\); .*--cache-dir"
    with pytest.raises(DataError, match=message):
        prepare(path, cache_dir=cache, verbose=False)
    assert D.main(["--data", path, "--cache-dir", cache, "--quiet"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "cannot write to the cache folder" in err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes through chmod")
def test_cache_folder_without_write_permission(tmp_path, capsys):
    path = write_parquet(tmp_path / "a.parquet", make_docs(5))
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o555)
    try:
        with pytest.raises(DataError, match=r"cannot write to the cache folder .*Permission denied"):
            prepare(path, cache_dir=str(cache), verbose=False)
    finally:
        cache.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# Batches

def test_get_batch_shapes_shift_and_determinism():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(tokens, 4, 16, np.random.default_rng(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == np.int64
    assert np.array_equal(x[:, 1:], y[:, :-1])              # y is x shifted by one token
    assert np.array_equal(y, x + 1)                          # ... the next token, here x + 1
    x2, y2 = get_batch(tokens, 4, 16, np.random.default_rng(0))
    x3, _ = get_batch(tokens, 4, 16, np.random.default_rng(1))
    assert np.array_equal(x, x2) and np.array_equal(y, y2) and not np.array_equal(x, x3)
    # every window fits, including the very last one
    x, y = get_batch(np.arange(17, dtype=np.uint16), 8, 16, np.random.default_rng(0))
    assert (x[:, 0] == 0).all() and (y[:, -1] == 16).all()
    with pytest.raises(ValueError, match="fewer than one window"):
        get_batch(np.arange(16, dtype=np.uint16), 1, 16, np.random.default_rng(0))


def test_get_batch_on_prepared_memmap(tmp_path, cache):
    d = prepare(write_parquet(tmp_path / "a.parquet", make_docs(30)), cache_dir=cache, verbose=False)
    assert isinstance(d.train, np.memmap)
    x, y = get_batch(d.train, 2, 32, np.random.default_rng(0))
    assert x.shape == (2, 32) and x.max() <= EOT and np.array_equal(x[:, 1:], y[:, :-1])


def test_val_windows_fixed_and_non_overlapping():
    tokens = np.arange(10_000, dtype=np.uint16)
    batches = val_windows(tokens, 4, 32, n_batches=5, seed=0)
    assert len(batches) == 5 and all(x.shape == y.shape == (4, 32) for x, y in batches)
    assert all(np.array_equal(y, x + 1) for x, y in batches)
    starts = np.concatenate([x[:, 0] for x, _ in batches])
    assert len(set(starts.tolist())) == 20 and (starts % 32 == 0).all()   # distinct, aligned: no overlap
    again = val_windows(tokens, 4, 32, n_batches=5, seed=0)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(batches, again))
    # a short split: all of its 10 windows, in 2 equal batches of 4 (2 left out), or 1 batch of 3
    short = val_windows(np.arange(321, dtype=np.uint16), 4, 32, n_batches=5)
    assert [x.shape for x, _ in short] == [(4, 32), (4, 32)]
    assert [x.shape for x, _ in val_windows(np.arange(100, dtype=np.uint16), 4, 32, 5)] == [(3, 32)]
    with pytest.raises(ValueError, match="validation split has 32 tokens, fewer than one window"):
        val_windows(np.arange(32, dtype=np.uint16), 4, 32, 5)


# ---------------------------------------------------------------------------------------------
# The hub (a local fsspec filesystem standing in for it) and the offline fallback

@pytest.fixture
def hub(tmp_path):
    """A fake FineWeb-Edu: shard 000 with 10 row groups of 10 documents, shard 001 with 3."""
    root = tmp_path / "hub"
    folder = root / S.HUB_DATASET / "sample" / "10BT"
    folder.mkdir(parents=True)
    docs = make_docs(130, seed=5)
    write_parquet(folder / "000_00000.parquet", docs[:100], row_group_size=10,
                  score=[3.0] * 100)
    write_parquet(folder / "001_00000.parquet", docs[100:], row_group_size=10, score=[3.0] * 30)
    return DirFileSystem(path=str(root), fs=fsspec.filesystem("file")), docs


def cached_row_groups(cache):
    folder = os.path.join(cache, "fineweb-edu", "sample", "10BT")
    return sorted(os.path.relpath(os.path.join(d, f), folder)
                  for d, _, files in os.walk(folder) for f in files if f.startswith("rg"))


def test_hub_reads_only_the_row_groups_it_needs(hub, cache, monkeypatch):
    fs, docs = hub
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # One document per tokenizer batch, so the pipeline reads ahead by just one document. (Real
    # batches are ~1M characters, ~250 documents, and a FineWeb-Edu row group holds ~1,000.)
    monkeypatch.setattr(D, "BATCH_CHARS", 1)
    cap = n_tokens(docs[:25]) + 25                           # the first 25 documents, 3 row groups
    d = prepare(cache_dir=cache, verbose=False, max_tokens=cap, hub_fs=fs)
    assert d.meta["source"] == "fineweb-edu" and d.meta["tokens"] == cap
    assert d.meta["documents"] == 25 and not d.meta["truncated"]
    assert d.meta["row_groups_downloaded"] == 3 < 10
    assert cached_row_groups(cache) == [f"000_00000/rg{g:05d}.parquet" for g in range(3)]
    assert pq.read_table(os.path.join(cache, "fineweb-edu/sample/10BT/000_00000/rg00000.parquet")).column_names == ["text"]
    assert sorted(read_docs(d.train) + read_docs(d.val)) == sorted(docs[:25])

    # more tokens: the 3 cached row groups are read locally, the rest (into shard 001) downloaded
    opened = []
    real_open = fs.open
    monkeypatch.setattr(fs, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    d = prepare(cache_dir=cache, verbose=False, max_tokens=n_tokens(docs[:115]) + 115, hub_fs=fs)
    assert d.meta["documents"] == 115 and d.meta["row_groups_downloaded"] == 12 - 3
    assert opened == [f"{S.HUB_DATASET}/sample/10BT/000_00000.parquet",
                      f"{S.HUB_DATASET}/sample/10BT/001_00000.parquet"]

    # all of it: stops after the last shard (002 does not exist)
    d = prepare(cache_dir=cache, verbose=False, max_tokens=10**9, hub_fs=fs)
    assert d.meta["documents"] == 130 and not d.meta["truncated"]
    assert len(cached_row_groups(cache)) == 13


def test_hub_cache_reused_without_touching_the_hub(hub, cache, monkeypatch):
    fs, docs = hub
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(D, "BATCH_CHARS", 1)
    first = prepare(cache_dir=cache, verbose=False, max_tokens=2000, hub_fs=fs)
    assert 0 < first.meta["row_groups_downloaded"] < 10

    class NoHub:
        def __getattr__(self, name):
            raise AssertionError("the hub was contacted although everything was cached")
    again = prepare(cache_dir=cache, verbose=False, max_tokens=2000, hub_fs=NoHub())
    assert again.cached and again.path == first.path
    # another seed: new token files, from the row groups cached as text, still without the hub
    other = prepare(cache_dir=cache, verbose=False, max_tokens=2000, seed=3, hub_fs=NoHub())
    assert not other.cached and other.meta["tokens"] == 2000
    assert other.meta["source"] == "fineweb-edu" and other.meta["row_groups_downloaded"] == 0
    assert sorted(read_docs(other.train) + read_docs(other.val)) == sorted(read_docs(first.train) + read_docs(first.val))


class UnreachableHub:
    def __init__(self, error):
        self.error = error

    def open(self, path, mode="rb", **kwargs):
        raise self.error


@pytest.mark.parametrize("how", ["connect-error", "HF_HUB_OFFLINE", "timeout"])
def test_offline_falls_back_to_python_docs(tmp_path, cache, monkeypatch, capsys, how):
    import json as json_module
    small_stdlib = os.path.dirname(json_module.__file__)     # json/'s docstrings keep the test fast
    real = D.python_docs_corpus
    monkeypatch.setattr(D, "python_docs_corpus", lambda c, v: real(c, v, stdlib=small_stdlib))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    if how == "connect-error":
        fs = UnreachableHub(ConnectionError("[Errno -2] Name or service not known"))
    elif how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        fs = UnreachableHub(AssertionError("HF_HUB_OFFLINE should stop us before any request"))
    else:
        class SlowHub:
            def open(self, path, mode="rb", **kwargs):
                time.sleep(60)                  # a hub that hangs: we must give up long before
        monkeypatch.setattr(S, "HUB_TIMEOUT", 0.2)
        fs = SlowHub()
    start = time.time()
    d = prepare(cache_dir=cache, verbose=False, hub_fs=fs)
    assert time.time() - start < 30                  # did not wait for the hanging hub (60 s)
    err = capsys.readouterr().err
    notice = [line for line in err.splitlines() if "cannot be reached" in line]
    assert len(notice) == 1 and "Python's own documentation" in notice[0] and "--data" in notice[0]
    assert {"connect-error": "Name or service not known", "HF_HUB_OFFLINE": "HF_HUB_OFFLINE is set",
            "timeout": "no answer within"}[how] in notice[0]
    assert d.meta["source"] == "python-docs" and d.meta["val_documents"] > 0
    text = "".join(read_docs(d.train) + read_docs(d.val))
    from pydoc_data.topics import topics
    assert topics["assert"].strip()[:60] in text              # pydoc's topic pages ...
    assert "JSON (JavaScript Object Notation)" in text         # ... and the stdlib's docstrings
    assert d.meta["documents"] == len(topics) + len(
        pq.read_table(d.meta["sources"][0]["path"]).column("url").to_pylist()) - len(topics)
    assert cached_row_groups(cache) == []                      # nothing half-downloaded


def test_hub_missing_dataset_is_an_error(tmp_path, cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    fs = DirFileSystem(path=str(tmp_path), fs=fsspec.filesystem("file"))   # no dataset there
    with pytest.raises(DataError, match="000_00000.parquet not found"):
        prepare(cache_dir=cache, verbose=False, hub_fs=fs)
