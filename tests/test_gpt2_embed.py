"""Tests for nanoternary/gpt2_embed.py, without network: the safetensors reader on tiny files the
test writes by hand (F32, F16, BF16, both spellings of the key, only the tensor's bytes read), the
SVD projection against np.linalg.svd, the .npy cache (rebuilt when broken, optional when its folder
cannot be written, stale temporary files removed), and the offline fallback. tests/test_hub.py runs
the fetch through huggingface_hub's HTTP client against a local server."""
import json
import struct

import fsspec
import numpy as np
import pytest

from nanoternary import gpt2_embed
from nanoternary.gpt2_embed import (
    gram_eigh, hub_offline_reason, load_gpt2_embedding, random_embedding, read_tensor, svd_project,
)


def write_safetensors(path, tensors):
    """The format by hand: u64 little-endian header size, JSON header, raw bytes.

    tensors: {name: (safetensors dtype, array)}; returns {name: (first byte, end)} in the file.
    """
    header, blobs, offset = {"__metadata__": {"format": "np"}}, [], 0
    for name, (dtype, a) in tensors.items():
        if dtype == "BF16":   # top 16 bits of each float32
            raw = (np.asarray(a, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        else:
            raw = np.asarray(a).astype({"F32": "<f4", "F16": "<f2", "F64": "<f8"}[dtype]).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)                       # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    start = 8 + len(h)
    return {n: (start + v["data_offsets"][0], start + v["data_offsets"][1])
            for n, v in header.items() if n != "__metadata__"}


class RecordingFile:
    """A file object that records the byte ranges read through it."""

    def __init__(self, f, log):
        self.f, self.log = f, log

    def seek(self, *a):
        return self.f.seek(*a)

    def read(self, n=-1):
        pos = self.f.tell()
        data = self.f.read(n)
        self.log.append((pos, pos + len(data)))
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


class RecordingFS:
    """An fsspec-like filesystem over the local one whose files record their reads."""

    def __init__(self):
        self.fs, self.reads, self.opened = fsspec.filesystem("file"), [], 0

    def open(self, path, mode="rb", **kwargs):
        self.opened += 1
        return RecordingFile(self.fs.open(path, mode, **kwargs), self.reads)


@pytest.mark.parametrize("key", ["wte.weight", "transformer.wte.weight"])
@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_reader_reads_only_the_tensor(tmp_path, key, dtype):
    rng = np.random.default_rng(0)
    wte = (rng.integers(-64, 64, (11, 6)) / 16).astype(np.float32)  # exact in F16 and BF16 too
    ranges = write_safetensors(tmp_path / "model.safetensors", {
        "h.0.attn.c_attn.weight": ("F32", rng.standard_normal((6, 18))),
        key: (dtype, wte),
        "wpe.weight": ("F32", rng.standard_normal((9, 6)))})
    fs = RecordingFS()
    with fs.open(str(tmp_path / "model.safetensors")) as f:
        got = read_tensor(f, gpt2_embed.WTE_NAMES)
    assert got.shape == (11, 6) and np.array_equal(got.astype(np.float32), wte)
    assert got.dtype == {"F32": np.float32, "F16": np.float16, "BF16": np.float32}[dtype]
    begin, end = ranges[key]
    for other in ("h.0.attn.c_attn.weight", "wpe.weight"):
        ob, oe = ranges[other]
        touched = [(a, b) for a, b in fs.reads if a < oe and b > ob]
        assert not touched, f"read {touched} overlaps the bytes of {other} [{ob}, {oe})"
    assert (begin, end) in fs.reads, "the tensor was not read in one piece"
    # and through the fetch function, as float32 whatever the stored dtype
    W = gpt2_embed.fetch_gpt2_wte(fsspec.filesystem("file"), str(tmp_path / "model.safetensors"))
    assert W.dtype == np.float32 and np.array_equal(W, wte)


def test_reader_errors_are_clear(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"lm_head.weight": ("F32", np.zeros((2, 2)))})
    with open(tmp_path / "a.safetensors", "rb") as f, pytest.raises(KeyError, match="wte.weight"):
        read_tensor(f, gpt2_embed.WTE_NAMES)
    (tmp_path / "b.safetensors").write_bytes(b"\x01\x02")
    with open(tmp_path / "b.safetensors", "rb") as f, pytest.raises(ValueError, match="not a safetensors"):
        read_tensor(f, "wte.weight")
    raw = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "c.safetensors").write_bytes(raw[:-4])
    with open(tmp_path / "c.safetensors", "rb") as f, pytest.raises(ValueError, match="truncated"):
        read_tensor(f, "lm_head.weight")


# ----------------------------------------------------------------------------------------------
# SVD


def test_svd_projection_against_numpy_svd():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((40, 12)) @ np.diag(np.linspace(3, 0.1, 12)) + 0.5  # not centred
    U, S, Vt = np.linalg.svd(W, full_matrices=False)
    k = 5
    P, kept = svd_project(W, k, rows_per_chunk=7)  # several chunks
    assert P.shape == (40, k) and P.dtype == W.dtype
    # P = U_k S_k up to the sign of each column
    assert np.allclose(np.abs(P), np.abs(U[:, :k] * S[:k]), atol=1e-10)
    # the best rank-k approximation: P V_k^T = U_k S_k V_k^T, and P P^T its Gram matrix
    W_k = (U[:, :k] * S[:k]) @ Vt[:k]
    _, Vecs = gram_eigh(W)
    assert np.allclose(P @ Vecs[:, :k].T, W_k, atol=1e-10)
    assert np.allclose(P @ P.T, W_k @ W_k.T, atol=1e-10)
    assert kept == pytest.approx((S[:k] ** 2).sum() / (S ** 2).sum(), rel=1e-12)
    # full rank: exact up to a rotation
    P, kept = svd_project(W, 12)
    assert np.allclose(P @ P.T, W @ W.T, atol=1e-10) and kept == pytest.approx(1.0, abs=1e-12)
    # float32 in, float32 out; more dimensions than W has is an error
    P32, _ = svd_project(W.astype(np.float32), k)
    assert P32.dtype == np.float32 and np.allclose(np.abs(P32), np.abs(U[:, :k] * S[:k]), atol=1e-4)
    with pytest.raises(ValueError, match="at most 12"):
        svd_project(W, 13)


def test_random_embedding():
    E = random_embedding(1000, 64, np.random.default_rng(0), std=0.02)
    assert E.shape == (1000, 64) and E.dtype == np.float32 and abs(E.std() - 0.02) < 1e-3
    assert np.array_equal(E, random_embedding(1000, 64, np.random.default_rng(0)))


# ----------------------------------------------------------------------------------------------
# cache and offline


class NoFS:
    """A filesystem that must not be used."""

    def open(self, *a, **k):
        raise AssertionError("the cache should have been used")


def test_load_builds_then_uses_the_cache_and_rebuilds_a_corrupt_one(tmp_path, capsys):
    rng = np.random.default_rng(2)
    wte = rng.standard_normal((30, 16)).astype(np.float32)
    src = tmp_path / "model.safetensors"
    write_safetensors(src, {"wte.weight": ("F32", wte)})
    cache_dir = tmp_path / "data"
    fs = RecordingFS()
    P = load_gpt2_embedding(8, str(cache_dir), fs=fs, path=str(src), vocab_size=30)
    out = capsys.readouterr().out
    want, kept = svd_project(wte, 8)
    assert P.shape == (30, 8) and P.dtype == np.float32 and np.allclose(P, want)
    assert f"{kept:.1%} of the variance kept" in out and fs.opened == 1
    assert (cache_dir / "gpt2_wte_svd8.npy").exists() and not list(cache_dir.glob("*.tmp"))

    # second call: from the cache, the source not opened
    P2 = load_gpt2_embedding(8, str(cache_dir), fs=NoFS(), path=str(src), vocab_size=30)
    assert np.array_equal(P2, P) and f"{kept:.1%}" in capsys.readouterr().out

    # a corrupt cache (cut short) and one of another shape are rebuilt
    raw = (cache_dir / "gpt2_wte_svd8.npy").read_bytes()
    (cache_dir / "gpt2_wte_svd8.npy").write_bytes(raw[:len(raw) // 2])
    P3 = load_gpt2_embedding(8, str(cache_dir), fs=fs, path=str(src), vocab_size=30)
    assert "unusable" in capsys.readouterr().out and np.array_equal(P3, P) and fs.opened == 2
    np.save(cache_dir / "gpt2_wte_svd8.npy", np.zeros((30, 8)))  # float64: not ours
    P4 = load_gpt2_embedding(8, str(cache_dir), fs=fs, path=str(src), vocab_size=30)
    assert np.array_equal(P4, P) and fs.opened == 3 and "float64" in capsys.readouterr().out

    # target_std rescales the whole matrix (the cache keeps the raw projection)
    P5 = load_gpt2_embedding(8, str(cache_dir), fs=NoFS(), vocab_size=30, target_std=0.02, verbose=False)
    assert P5.std() == pytest.approx(0.02, rel=1e-5) and np.allclose(P5 * (P.std() / 0.02), P, atol=1e-5)
    assert capsys.readouterr().out == ""


def test_offline_returns_none_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_gpt2_embedding(8, str(tmp_path / "data")) is None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no network" in out[0] and "HF_HUB_OFFLINE" in out[0]
    assert not (tmp_path / "data").exists()


def test_offline_probe_is_quick(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # port 9 on this machine's loopback: nothing listens, so the connection is refused at once
    reason = hub_offline_reason("http://127.0.0.1:9", timeout=2.0)
    assert reason is not None and "127.0.0.1" in reason


def test_a_failing_fetch_returns_none(tmp_path, capsys):
    class Broken:
        def open(self, *a, **k):
            raise ConnectionError("connection reset")

    assert load_gpt2_embedding(8, str(tmp_path), fs=Broken(), vocab_size=30) is None
    assert "connection reset" in capsys.readouterr().out


def test_cache_folder_that_cannot_be_written_is_not_fatal(tmp_path, capsys):
    wte = np.random.default_rng(4).standard_normal((30, 16)).astype(np.float32)
    src = tmp_path / "model.safetensors"
    write_safetensors(src, {"wte.weight": ("F32", wte)})
    (tmp_path / "file").write_text("a file where the cache folder should be")
    P = load_gpt2_embedding(8, str(tmp_path / "file" / "data"), fs=RecordingFS(), path=str(src), vocab_size=30)
    assert np.allclose(P, svd_project(wte, 8)[0])                   # the embedding, just not cached
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "not cached (NotADirectoryError" in out


def test_stale_temporary_files_are_removed(tmp_path):
    import subprocess
    import sys

    from nanoternary.fileio import HOST
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache_dir = tmp_path / "data"
    cache_dir.mkdir()
    stale = cache_dir / f"gpt2_wte_svd8.npy.{HOST}-{dead.pid}-0123abcd.tmp"   # a run killed while saving
    stale.write_bytes(b"half")
    wte = np.random.default_rng(5).standard_normal((30, 16)).astype(np.float32)
    write_safetensors(tmp_path / "model.safetensors", {"wte.weight": ("F32", wte)})
    load_gpt2_embedding(8, str(cache_dir), fs=RecordingFS(), path=str(tmp_path / "model.safetensors"),
                        vocab_size=30, verbose=False)
    assert sorted(p.name for p in cache_dir.iterdir()) == ["gpt2_wte_svd8.json", "gpt2_wte_svd8.npy"]
