"""The token caches under data/tokens/ (tokens.py writes them): their key, their checks, the
source files' fingerprints, and the list of caches with the command that removes superseded ones.

Every time a cache is opened (load_cache), both .bin files are read once to check their size,
their CRC-32 and that every id is below the vocabulary size: a folder without meta.json, with a
.bin file cut short or overwritten (zeros, 0xFFFF bytes, another cache's file), or made by an
older version without checksums, is never trusted: one line says why and it is rebuilt. Delete a
folder to rebuild it by hand. What the check costs, both files together (scan_tokens: CRC-32 and
the largest id in one pass; files in the page cache, our 2-core VM, best of 7): 2.4 ms for 3.55M
tokens (7.1 MB) and 20.5 ms for 32M tokens (64 MB, FineWeb-Edu's default amount), against 40 ms
for sha256 and 72 ms for blake2b over the same 64 MB. Measured with (and 3_550_969 tokens for the
smaller one):
    python -c "import numpy as np; np.random.default_rng(0).integers(0, 50257, 32_000_000, dtype=np.uint16).tofile('t.bin')"
    python -m timeit -n 1 -r 7 -s "from nanoternary.caches import scan_tokens" "scan_tokens('t.bin')"
A cache not in the page cache costs one read of it from disk.

A cache is named by the bytes it was made from, never by where they were or when they were last
touched: its key (tokens.py) holds the sha256 of each source file, in order. The same bytes give
the same cache, and the same run resumes, whatever path names them and from any working folder;
`touch` changes nothing. Reading a large corpus through sha256 on every start would cost a read of
it each time, so each file's fingerprint is remembered in data/tokens/fingerprints.json together
with what `os.stat` says of it (size, modification time, inode), as git and make do: a file whose
stat is unchanged is not read again, and a touched one is read once.

    python -m nanoternary.data --caches          # every cache: size, state (current or stale), sources
    python -m nanoternary.data --remove-stale    # remove the stale ones

A cache is stale when it can never be used again: a source file is gone or holds other bytes now,
it was made by an older version whose key held the files' modification times, or it is an
incomplete folder that no running process is writing (a build killed outright). A cache of the
same files with other settings (--data-tokens, --val-fraction, --data-seed) is not stale: a run
with those settings uses it.
"""
import contextlib
import hashlib
import json
import os
import shutil
import sys
import zlib
from dataclasses import dataclass

import numpy as np

from .fileio import HOST, atomic_open, remove_stale_temps, temp_name_parts
from .sources import brief
from .tokenizer import get_encoding, vocab_hash

TOKENS_VERSION = 1               # part of the cache key: bump when the tokens written would change
FORMAT_VERSION = 2               # of meta.json; 2 added the checksums (a format-1 cache is rebuilt)
DTYPE = np.uint16                # token ids on disk
FINGERPRINTS = "fingerprints.json"


@dataclass
class TokenData:
    """Token files of one prepared dataset. train, val: uint16 arrays (memory-mapped from disk)."""
    train: np.ndarray
    val: np.ndarray
    meta: dict
    path: str
    cached: bool = False                  # True when loaded from an existing cache

    def __repr__(self):
        return (f"TokenData({self.path!r}, train={len(self.train):,} tokens, "
                f"val={len(self.val):,} tokens, cached={self.cached})")


def cache_key(sources, settings, enc):
    described = {"format": TOKENS_VERSION, "sources": sources, "settings": settings,
                 "tokenizer": enc.name, "vocab_sha256": vocab_hash(enc)}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def _open_tokens(path, n):
    if n == 0:
        return np.zeros(0, DTYPE)       # np.memmap cannot map an empty file
    return np.memmap(path, dtype=DTYPE, mode="r", shape=(n,))


def scan_tokens(path, block=1 << 20):
    """(CRC-32 of the file as 8 hex digits, its largest token id or -1 if empty), in one pass of
    1 MiB reads. CRC-32 detects accidental damage (zeros, 0xFFFF bytes, a foreign file), which is
    what can happen to a cache, at ~2-3 GB/s; nothing here needs a cryptographic hash."""
    crc, top = 0, -1
    with open(path, "rb") as f:
        while chunk := f.read(block):
            crc = zlib.crc32(chunk, crc)
            ids = np.frombuffer(chunk, DTYPE, count=len(chunk) // np.dtype(DTYPE).itemsize)
            if len(ids):
                top = max(top, int(ids.max()))
    return f"{crc:08x}", top


def _cache_problem(folder, meta, key, n_vocab):
    """Why the cache in folder (with this meta.json) cannot be trusted, or None."""
    if meta.get("format") == 1:
        return "it was made by an older version of nanoternary, without checksums"
    if meta.get("format") != FORMAT_VERSION:
        return f"format {meta.get('format')}, expected {FORMAT_VERSION}"
    if key is not None and meta.get("key") != key:
        return f"meta.json is for key {meta.get('key')}, expected {key}"
    for split in ("train", "val"):
        path = os.path.join(folder, f"{split}.bin")
        expected = meta[f"{split}_tokens"] * np.dtype(DTYPE).itemsize
        actual = os.path.getsize(path) if os.path.exists(path) else None
        if actual != expected:
            return (f"{split}.bin has {actual} bytes, meta.json says {expected}"
                    if actual is not None else f"{split}.bin is missing")
    for split in ("train", "val"):
        crc, top = scan_tokens(os.path.join(folder, f"{split}.bin"))
        recorded = meta["crc32"][f"{split}.bin"]
        if crc != recorded:
            return f"{split}.bin does not match its checksum (CRC-32 {crc}, meta.json says {recorded})"
        if top >= n_vocab:
            return f"{split}.bin holds token id {top}, not below the vocabulary size {n_vocab}"
    return None


def load_cache(folder, key=None, n_vocab=None):
    """The TokenData in folder if complete and consistent, else None (with a one-line message on
    stderr if a broken cache was found there). key, when given, must match the one meta.json was
    written for; n_vocab (default: GPT-2's) bounds the token ids.
    Checks: meta.json parses, has our format version and key, each .bin holds exactly the number of
    tokens meta.json says (a truncated file fails this), matches the CRC-32 meta.json records (a
    file overwritten at the same size fails this) and has no id >= n_vocab."""
    meta_path = os.path.join(folder, "meta.json")
    pending = not os.path.exists(meta_path) and os.path.exists(meta_path + ".pending")
    if pending:                             # token files in place, meta.json not yet (_build)
        meta_path += ".pending"
    if not os.path.exists(meta_path):
        if os.path.isdir(folder) and os.listdir(folder):
            print(f"cache {folder} is incomplete (no meta.json, an interrupted run?); rebuilding",
                  file=sys.stderr)
        return None
    n_vocab = get_encoding().n_vocab if n_vocab is None else n_vocab
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        problem = _cache_problem(folder, meta, key, n_vocab)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        problem = f"meta.json is unreadable ({brief(e)})"
    except OSError as e:
        problem = f"it cannot be read ({brief(e)})"
    if problem:
        what = "cannot be trusted" if problem.startswith("it ") else "is corrupt"
        print(f"cache {folder} {what} ({'its build was stopped; ' if pending else ''}{problem}); rebuilding",
              file=sys.stderr)
        return None
    if pending:
        with contextlib.suppress(OSError):  # a read-only folder: trusted all the same, checked each time
            promote_meta(os.path.join(folder, "meta.json"))
        print(f"cache {folder}: completed (its build was stopped after the token files were written)",
              file=sys.stderr)
    train = _open_tokens(os.path.join(folder, "train.bin"), meta["train_tokens"])
    val = _open_tokens(os.path.join(folder, "val.bin"), meta["val_tokens"])
    return TokenData(train, val, meta, folder, cached=True)


def remove_stale_cache_temps(tokens_dir):
    """Temporary files of dead processes (kill -9 during a build) in every folder under tokens_dir."""
    try:
        folders = sorted(os.listdir(tokens_dir))
    except OSError:
        return
    removed = [p for name in folders for p in remove_stale_temps(os.path.join(tokens_dir, name))]
    if removed:
        print(f"removed {len(removed)} temporary file(s) of a killed run under {tokens_dir}", file=sys.stderr)


def promote_meta(meta_path):
    """meta.json.pending -> meta.json. Another process building the same cache at the same time
    (the same bytes) may have renamed it first."""
    try:
        os.replace(meta_path + ".pending", meta_path)
    except FileNotFoundError:
        if not os.path.exists(meta_path):
            raise


# ----------------------------------------------------------------------------------------------
# Fingerprints of the sources, and housekeeping.



def file_sha256(path, block=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(st):
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def _load(tokens_dir):
    try:
        with open(os.path.join(tokens_dir, FINGERPRINTS)) as f:
            memo = json.load(f)
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):                 # absent, damaged: fingerprints are computed again
        return {}


def fingerprints(paths, tokens_dir, save=True):
    """The sha256 of each file's bytes, read from the file only when its stat differs from the one
    remembered (or never seen). -> (the list of digests, the updated memory or None if unchanged).
    With `save`, a changed memory is written back at once (save_fingerprints); prepare() writes it
    only once the cache is made, so that a failed run leaves nothing behind."""
    memo, changed, out = _load(tokens_dir), False, []
    for path in paths:
        real = os.path.realpath(path)
        st = os.stat(real)
        known = memo.get(real)
        if isinstance(known, dict) and known.get("stat") == _stat_key(st) and isinstance(known.get("sha256"), str):
            out.append(known["sha256"])
            continue
        digest = file_sha256(real)
        memo[real] = {"stat": _stat_key(st), "sha256": digest}
        changed = True
        out.append(digest)
    if changed and save:
        save_fingerprints(tokens_dir, memo)
    return out, (memo if changed else None)


def save_fingerprints(tokens_dir, memo):
    """Write the memory of fingerprints, atomically; if it cannot be written (a read-only cache
    folder) the fingerprints are still right, only computed again next time."""
    if memo is None:
        return
    memo = {k: v for k, v in memo.items() if os.path.exists(k)}          # forget files that are gone
    try:
        os.makedirs(tokens_dir, exist_ok=True)
        with atomic_open(os.path.join(tokens_dir, FINGERPRINTS), "w") as f:
            json.dump(memo, f, indent=0)
    except OSError:
        pass


def _folder_bytes(folder):
    total = 0
    for name in os.listdir(folder):
        try:
            total += os.path.getsize(os.path.join(folder, name))
        except OSError:
            pass
    return total


def _being_written(folder):
    """True when a process of this host that still runs has a temporary file in `folder`."""
    for name in os.listdir(folder):
        parts = temp_name_parts(name)
        if parts and (parts[0] != HOST or parts[2]):
            return True
    return False


def cache_state(folder, tokens_dir):
    """("current" | "stale" | "building", why) of the cache folder `folder`."""
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.exists(meta_path):
        if os.path.exists(meta_path + ".pending"):
            return "current", "its build was stopped just before the end; the next use completes it"
        if _being_written(folder):
            return "building", "a running process is writing it"
        return "stale", "incomplete: a build that was stopped"
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        sources = meta["sources"]
        local = [s for s in sources if not str(s["path"]).startswith("hf://")]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return "stale", f"its meta.json is damaged ({type(e).__name__})"
    if any("sha256" not in s for s in local):
        return "stale", "made by an older version (its key held the files' modification times)"
    gone = [s["path"] for s in local if not os.path.isfile(s["path"])]
    if gone:
        return "stale", f"{gone[0]} is gone"
    now, _ = fingerprints([s["path"] for s in local], tokens_dir)
    changed = [s["path"] for s, h in zip(local, now) if h != s["sha256"]]
    if changed:
        return "stale", f"{changed[0]} holds other bytes now"
    return "current", ""


def list_caches(tokens_dir):
    """[{"folder", "bytes", "state", "why", "sources"}] of every cache folder under tokens_dir."""
    try:
        names = sorted(n for n in os.listdir(tokens_dir) if os.path.isdir(os.path.join(tokens_dir, n)))
    except OSError:
        return []
    out = []
    for name in names:
        folder = os.path.join(tokens_dir, name)
        try:
            state, why = cache_state(folder, tokens_dir)
            size = _folder_bytes(folder)
        except OSError as e:                      # removed meanwhile, or unreadable
            state, why, size = "stale", f"cannot be read ({e.strerror or e})", 0
        try:
            with open(os.path.join(folder, "meta.json")) as f:
                sources = [s["path"] for s in json.load(f)["sources"]]
        except (OSError, ValueError, KeyError, TypeError):
            sources = []
        out.append({"folder": folder, "bytes": size, "state": state, "why": why, "sources": sources})
    return out


def remove_stale(tokens_dir):
    """Remove every stale cache folder under tokens_dir; -> the list_caches entries removed."""
    removed = []
    for c in list_caches(tokens_dir):
        if c["state"] == "stale":
            shutil.rmtree(c["folder"], ignore_errors=True)
            removed.append(c)
    return removed


def _cut(text, limit=80):
    return text if len(text) <= limit else "..." + text[-(limit - 3):]


def stale_note(tokens_dir):
    """One line about the stale caches under tokens_dir and the command that removes them, or None."""
    stale = [c for c in list_caches(tokens_dir) if c["state"] == "stale"]
    if not stale:
        return None
    size = sum(c["bytes"] for c in stale)
    return (f"note: {len(stale)} cache(s) under {tokens_dir} ({size / 1e6:,.1f} MB) can never be used again "
            f"({_cut(stale[0]['why'])}...): `python -m nanoternary.data --remove-stale"
            + (f" --cache-dir {os.path.dirname(tokens_dir)}" if os.path.dirname(tokens_dir) != "data" else "")
            + "` removes them")


def same_tokens(saved, meta):
    """True when the data a checkpoint was trained on (its metadata's "data": the cache's key,
    folder and checksums) is the data of the cache `meta` (a meta.json): the same token files, by
    their CRC-32s and lengths. A checkpoint of an older version records only its cache's key and
    folder: that folder's meta.json, if it is still there, gives the checksums."""
    crc = saved.get("crc32")
    if crc is None:
        if saved.get("key") == meta.get("key"):
            return True
        try:
            with open(os.path.join(str(saved.get("path")), "meta.json")) as f:
                old = json.load(f)
            crc, saved = old["crc32"], {"train_tokens": old["train_tokens"]}
        except (OSError, ValueError, KeyError, TypeError):
            return False
    return crc == meta.get("crc32") and saved.get("train_tokens") == meta.get("train_tokens")
