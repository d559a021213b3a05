"""Text -> GPT-2 token files on disk, made once and checked every time they are opened.

    data = prepare("my-corpus/*.parquet")       # TokenData: .train, .val (uint16 arrays), .meta, .path
    python -m nanoternary.data --data GLOB      # the same from the command line (the CLI is here)

How it is tokenized (FlashLM v3 / GPT-2 conventions, llm.c's file habits):
  - GPT-2 BPE (tokenizer.py), `encode_ordinary`, so a literal "<|endoftext|>" inside a document is
    plain text, and the real separator <|endoftext|> = 50256 after every document.
  - Documents go to train or validation by a seeded coin (P(val) = val_fraction, default 0.05 like
    the reference's 95/5 split), in reading order, so the split is by document and the same for the
    same seed. If the coin leaves one side empty (tiny inputs), the last document moves across.
  - `max_tokens` caps the total (separators included); the document that crosses the cap is cut.
  - Batches of ~1M characters are encoded on all cores (a thread pool over tiktoken, whose Rust
    core releases the GIL) while the previous batch is written out, so the pipeline runs at
    tiktoken's own speed: `python -m nanoternary.data --data GLOB --bench` measures both.
Null or empty texts are skipped and counted.

The cache, data/tokens/<name>-<key>/, where key hashes the sources' bytes (each file's sha256, in
order; never a path or a modification time, so the same bytes are the same cache from any path:
caches.py), the settings (val_fraction, seed, max_tokens), the tokenizer's name and vocabulary hash
(<name> is the first file's name, cut to 40 characters):
    train.bin, val.bin   token ids as uint16 (GPT-2's ids are < 50257 < 2**16), no header
    meta.json            sources, settings, tokenizer name and vocabulary hash, the CRC-32 of
                         each .bin file, and the counts: documents, skipped (null/empty texts),
                         text_tokens, tokens (= text_tokens + one separator per document),
                         {train,val}_{documents,tokens,bytes} with bytes the UTF-8 bytes of the
                         split's texts (for bits per byte)
Each file is written to a temporary name and renamed into place, meta.json last (fileio.py; first
as meta.json.pending, so that complete token files survive a kill just before the end: _build). Every
time the cache is opened it is checked (sizes, CRC-32, ids below the vocabulary: caches.py, with
what the check costs); a cache that fails is never trusted: one line says why and it is rebuilt.
Temporary files left by a process killed outright (kill -9) are removed at the next prepare
(fileio.remove_stale_temps: only those whose process has ended). Caches that can never be used
again (their files changed or gone) are listed by `--caches` and removed by `--remove-stale`.

A cache folder that cannot be written raises DataError naming the folder and what to do; the
command prints it on one line and exits with status 1. docs/robustness.md lists the cases and tests.
"""
import contextlib
import functools
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from .fileio import atomic_path
from .sources import (HUB_DATASET, HUB_MAX_TOKENS, HUB_SHARD, DataError, HubUnreachable, brief, cannot_write,
                      check_file, expand_paths, file_chunks, hub_chunks, hub_offline_reason, python_docs_corpus,
                      write_json)
from .caches import (DTYPE, FORMAT_VERSION, TOKENS_VERSION, TokenData, cache_key, fingerprints, list_caches,  # noqa: F401
                     load_cache, promote_meta, remove_stale, remove_stale_cache_temps, save_fingerprints,
                     scan_tokens, stale_note)
from .config import OneLineParser, number, run_cli, safe_output
from .resources import check_threads
from .tokenizer import get_encoding, vocab_hash

VAL_FRACTION = 0.05              # the reference's 95/5 train/validation split
BATCH_CHARS = 1_000_000          # characters per batch handed to the tokenizer threads (~250k tokens)


# ----------------------------------------------------------------------------------------------
# Tokenizing into the cache.

def progress_bar(label, enabled=True):
    """tqdm's bar on stderr for building a cache: the share of the input read, the tokens and
    documents so far and the rate,
    `corpus  48%|#########           | 1,702,311 tokens  1,340 documents  2.31M tok/s  eta 00:01`."""
    return tqdm(total=1.0, desc=label, disable=not enabled, bar_format="{desc} {percentage:3.0f}%|{bar:20}|")


def show_progress(bar, fraction, tokens, documents):
    rate = tokens / max(bar.format_dict["elapsed"], 1e-9)
    bar.bar_format = ("{desc} {percentage:3.0f}%|{bar:20}| " + f"{tokens:,} tokens  {documents:,} documents  "
                      f"{rate / 1e6:.2f}M tok/s" + "  eta {remaining}")
    bar.update(min(max(fraction, 0.0), 1.0) - bar.n)        # redraws at most 10 times a second


def encode_one(enc, text):
    """One document's GPT-2 ids as a uint32 array, "<|endoftext|>" in it encoded as plain text.

    The same ids as tiktoken's encode_ordinary, but handed over as a numpy array, never as a list
    of Python ints: making a Python int per token needs the GIL, which would serialize the threads,
    and the list would then have to be converted. This keeps the pipeline at tiktoken's own speed.
    """
    try:
        return enc.encode_to_numpy(text, disallowed_special=())
    except UnicodeEncodeError:              # lone surrogates (from JSON "\ud800"): tiktoken's own fix
        return np.array(enc.encode_ordinary(text), dtype=np.uint32)


def encode_batch(enc, texts, pool):
    """Each text's ids (uint32 arrays), encoded on the pool's threads; tiktoken's Rust core releases
    the GIL, so they run in parallel. Returns at once, an iterator of the results in order, while
    the work goes on in the background. (What tiktoken's encode_ordinary_batch does, with arrays.)"""
    return pool.map(functools.partial(encode_one, enc), texts)


def _text_batches(chunks, batch_chars):
    """Regroup the source's chunks into (texts, skipped, fraction) batches of ~batch_chars
    characters; null and empty texts are dropped here and counted in `skipped`."""
    batch, chars, skipped, fraction = [], 0, 0, 0.0
    for texts, fraction in chunks:
        for text in texts:
            if not text:
                skipped += 1
                continue
            batch.append(text)
            chars += len(text)
            if chars >= batch_chars:
                yield batch, skipped, fraction
                batch, chars, skipped = [], 0, 0
    if batch or skipped:
        yield batch, skipped, fraction


def _encoded_batches(chunks, enc, num_threads):
    """(texts, skipped, fraction, ids) batches. Batch k+1 is read and handed to the encoding
    threads before batch k is given to the caller to write, so reading and writing overlap with
    tiktoken's work instead of adding to it."""
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        pending = None
        for texts, skipped, fraction in _text_batches(chunks, BATCH_CHARS):
            ids = encode_batch(enc, texts, pool)             # starts encoding batch k+1
            if pending is not None:
                yield pending[0], pending[1], pending[2], list(pending[3])   # waits for batch k
            pending = (texts, skipped, fraction, ids)
        if pending is not None:
            yield pending[0], pending[1], pending[2], list(pending[3])


def _write_tokens(chunks, folder, enc, *, val_fraction, seed, max_tokens, num_threads, bar, label, finish=None):
    """Tokenize the chunks into folder/train.bin and folder/val.bin (both renamed into place at the
    end); return the counts for meta.json. finish(counts, {"train.bin": path, "val.bin": path}) is
    called with the complete files under their temporary names, before they are renamed."""
    # uint16 holds every id because every id is <= max_token_value; checked once, for all tokens
    if enc.max_token_value >= 2 ** 16:
        raise DataError(f"tokenizer {enc.name} has ids up to {enc.max_token_value}, too many for uint16")
    eot = np.array([enc.eot_token], dtype=np.uint32)
    rng = np.random.default_rng(seed)       # one coin per document, in reading order
    names = ("train", "val")
    counts = {k: 0 for k in ("documents", "skipped", "text_tokens", "tokens")}
    for split in names:
        counts.update({f"{split}_documents": 0, f"{split}_tokens": 0, f"{split}_bytes": 0})
    counts["truncated"] = False
    last = {}                               # split -> (ids, bytes) of its last document
    # both files under temporary names, renamed into place only if all went well (fileio.atomic_path)
    with atomic_path(os.path.join(folder, "train.bin")) as tmp_train, \
            atomic_path(os.path.join(folder, "val.bin")) as tmp_val:
        with open(tmp_train, "wb") as f_train, open(tmp_val, "wb") as f_val:
            out = {"train": f_train, "val": f_val}
            for texts, skipped, fraction, ids in _encoded_batches(chunks, enc, num_threads):
                counts["skipped"] += skipped
                is_val = (rng.random(len(texts)) < val_fraction).tolist()
                pieces = {"train": [], "val": []}           # arrays to write: doc, eot, doc, eot...
                for text, doc, v in zip(texts, ids, is_val):
                    room = None if max_tokens is None else max_tokens - counts["tokens"]
                    if room == 0:
                        break
                    # the UTF-8 bytes of the text (for bits per byte); surrogatepass counts a lone
                    # surrogate as 3 bytes, like the U+FFFD tiktoken encodes in its place
                    n_bytes = len(text.encode("utf-8", "surrogatepass"))
                    doc_pieces = [doc, eot]                 # <|endoftext|> after every document
                    if room is not None and len(doc) + 1 > room:
                        doc = doc[:room]                    # cut the document at the cap
                        doc_pieces = [doc]
                        n_bytes = len(enc.decode_bytes(doc.tolist()))   # the bytes of what is kept
                        counts["truncated"] = True
                    n_tokens = sum(len(p) for p in doc_pieces)
                    split = names[v]
                    pieces[split] += doc_pieces
                    counts["documents"] += 1
                    counts["text_tokens"] += len(doc)
                    counts["tokens"] += n_tokens
                    counts[f"{split}_documents"] += 1
                    counts[f"{split}_tokens"] += n_tokens
                    counts[f"{split}_bytes"] += n_bytes
                    last[split] = (doc_pieces, n_tokens, n_bytes)
                for split in names:
                    if pieces[split]:
                        out[split].write(np.concatenate(pieces[split]).astype(DTYPE).tobytes())
                if max_tokens is not None:
                    fraction = max(fraction or 0.0, counts["tokens"] / max_tokens)
                show_progress(bar, fraction or 0.0, counts["tokens"], counts["documents"])
                if counts["tokens"] == max_tokens:
                    break
            # Tiny inputs: if the coin left a split empty, move the last document of the other.
            for empty, full in (("val", "train"), ("train", "val")):
                if 0 < val_fraction and counts[f"{empty}_documents"] == 0 and counts[f"{full}_documents"] >= 2:
                    doc_pieces, n_tokens, n_bytes = last[full]
                    out[full].truncate(out[full].tell() - np.dtype(DTYPE).itemsize * n_tokens)
                    out[full].seek(0, os.SEEK_END)
                    out[empty].write(np.concatenate(doc_pieces).astype(DTYPE).tobytes())
                    for key, amount in (("documents", 1), ("tokens", n_tokens), ("bytes", n_bytes)):
                        counts[f"{full}_{key}"] -= amount
                        counts[f"{empty}_{key}"] += amount
        if counts["documents"] == 0:
            raise DataError(f"no documents in {label}: all {counts['skipped']} texts are null or empty")
        show_progress(bar, 1.0, counts["tokens"], counts["documents"])
        if finish is not None:
            finish(counts, {"train.bin": tmp_train, "val.bin": tmp_val})
    return counts


def _build(folder, key, chunks, *, source, sources, settings, enc, num_threads, verbose, label, stats=None):
    """Tokenize into `folder` and return its TokenData. meta.json is what makes a folder trusted, so
    it is written last; but the token files, the long part of the work, are complete before it.
    So their meta.json is written first as meta.json.pending, with their checksums, while they are
    still under temporary names; then they are renamed into place, then meta.json.pending is renamed
    to meta.json. A process killed between the two renames (kill -9, a power cut) leaves complete
    token files and their pending meta.json, which load_cache checks and completes: nothing is
    tokenized twice."""
    meta_path = os.path.join(folder, "meta.json")
    start = time.time()

    def finish(counts, temps):                      # the token files are complete, not yet in place
        seconds = time.time() - start
        crc32 = {name: scan_tokens(tmp)[0] for name, tmp in temps.items()}
        meta = {"format": FORMAT_VERSION, "key": key, "source": source, "sources": sources, **settings,
                "tokenizer": enc.name, "n_vocab": enc.n_vocab, "vocab_sha256": vocab_hash(enc),
                "eot": enc.eot_token, "dtype": np.dtype(DTYPE).name, "crc32": crc32, **counts,
                "seconds": round(seconds, 3), "tokens_per_s": round(counts["tokens"] / max(seconds, 1e-9)),
                **(stats or {})}
        write_json(meta_path + ".pending", meta)

    try:
        os.makedirs(folder, exist_ok=True)
        for stale in (meta_path, meta_path + ".pending"):
            if os.path.exists(stale):
                os.remove(stale)            # from here on the folder is untrusted until the end
        try:
            with progress_bar(label, verbose) as bar:
                _write_tokens(chunks, folder, enc, num_threads=num_threads, bar=bar, finish=finish,
                              label=", ".join(s["path"] for s in sources), **settings)
        except BaseException:
            with contextlib.suppress(OSError):
                if not os.listdir(folder):
                    os.rmdir(folder)        # leave no empty folder behind either
            raise
        promote_meta(meta_path)                 # last: from now on the folder is trusted
    except OSError as e:                    # the sources' read errors are DataError or HubUnreachable by now
        raise cannot_write(e, os.path.dirname(os.path.dirname(folder))) from None
    data = load_cache(folder, key, enc.n_vocab)
    if data is None:
        raise RuntimeError(f"{folder}: the cache just written does not check out")
    data.cached = False
    if data.meta["val_documents"] == 0 and settings["val_fraction"] > 0:
        print(f"note: only {data.meta['documents']} document(s), so the validation split is empty",
              file=sys.stderr)
    note = stale_note(os.path.dirname(folder))
    if note:
        print(note, file=sys.stderr)
    return data


def _check_settings(val_fraction, max_tokens):
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"max_tokens must be positive, got {max_tokens}")


def prepare(data=None, *, max_tokens=None, val_fraction=VAL_FRACTION, seed=0, cache_dir="data",
            verbose=True, num_threads=None, hub_fs=None):
    """Tokenize `data` into cache_dir/tokens/ (or reuse the cache) and return its TokenData.

    data: None for FineWeb-Edu (falling back to Python's documentation when offline), or a path
    or glob, or a list of them (.parquet with a `text` column, .jsonl, .txt).
    max_tokens: cap on the total tokens, separators included (None: all of the files; for
    FineWeb-Edu, HUB_MAX_TOKENS). val_fraction, seed: the split (see the top of this file).
    cache_dir: where data/ is. verbose: show the progress bar (notices such as the offline one and
    a rebuilt cache are printed regardless, on stderr). num_threads: for tiktoken (default: all
    cores). hub_fs: the fsspec filesystem holding FineWeb-Edu (default: HfFileSystem(); the tests
    pass a local one). Raises DataError on bad input.
    """
    _check_settings(val_fraction, max_tokens)
    enc = get_encoding()
    num_threads = num_threads or os.cpu_count() or 1
    tokens_dir = os.path.join(cache_dir, "tokens")
    remove_stale_cache_temps(tokens_dir)
    if data is None:
        settings = {"val_fraction": val_fraction, "seed": seed,
                    "max_tokens": HUB_MAX_TOKENS if max_tokens is None else max_tokens}
        sources = [{"path": f"hf://{HUB_DATASET}/{HUB_SHARD.format(0).replace('000', '*')}"}]
        key = cache_key(sources, settings, enc)
        folder = os.path.join(tokens_dir, f"fineweb-edu-{key}")
        cached = load_cache(folder, key, enc.n_vocab)
        if cached is not None:
            return cached
        if hub_fs is None and not hub_offline_reason(probe=False):
            from huggingface_hub import HfFileSystem
            hub_fs = HfFileSystem()
        stats = {"row_groups_downloaded": 0}
        try:
            return _build(folder, key, hub_chunks(hub_fs, os.path.join(cache_dir, "fineweb-edu"), stats),
                          source="fineweb-edu", sources=sources, settings=settings, enc=enc,
                          num_threads=num_threads, verbose=verbose, label="fineweb-edu", stats=stats)
        except HubUnreachable as e:
            print(f"FineWeb-Edu cannot be reached ({e}); using Python's own documentation instead "
                  f"(pass --data to use your own files)", file=sys.stderr, flush=True)
            corpus = python_docs_corpus(cache_dir, verbose)
            return _prepare_files([corpus], "python-docs", max_tokens, val_fraction, seed, tokens_dir,
                                  enc, num_threads, verbose)
    return _prepare_files(expand_paths(data), "files", max_tokens, val_fraction, seed, tokens_dir,
                          enc, num_threads, verbose)


def _folders_of_key(tokens_dir, key, preferred):
    """The cache folders for `key` (any name; `preferred` first)."""
    try:
        names = sorted(n for n in os.listdir(tokens_dir) if n.endswith("-" + key))
    except OSError:
        names = []
    others = [os.path.join(tokens_dir, n) for n in names if os.path.join(tokens_dir, n) != preferred]
    return [preferred] + others


def _prepare_files(files, source, max_tokens, val_fraction, seed, tokens_dir, enc, num_threads, verbose):
    files = [os.path.abspath(p) for p in files]
    for path in files:
        check_file(path)
    try:
        hashes, memo = fingerprints(files, tokens_dir, save=False)
    except OSError as e:
        raise DataError(f"cannot read {getattr(e, 'filename', None) or files[0]} ({e.strerror or brief(e)})") from None
    # the key holds what the files contain, in order, not where they are or when they were touched
    # (caches.py): the same bytes by another path, or touched, are the same data
    settings = {"val_fraction": val_fraction, "seed": seed, "max_tokens": max_tokens}
    key = cache_key([{"sha256": h, "bytes": os.path.getsize(p)} for p, h in zip(files, hashes)], settings, enc)
    sources = [{"path": p, "bytes": os.path.getsize(p), "sha256": h} for p, h in zip(files, hashes)]
    name = source if source != "files" else "".join(     # a readable prefix, short enough for any file system
        c if c.isalnum() or c in "-_." else "_" for c in os.path.splitext(os.path.basename(files[0]))[0])[:40]
    folder = os.path.join(tokens_dir, f"{name}-{key}")
    data = None
    for other in _folders_of_key(tokens_dir, key, folder):     # the same bytes under another file name
        data = load_cache(other, key, enc.n_vocab)
        if data is not None:
            break
    if data is None:
        data = _build(folder, key, file_chunks(files), source=source, sources=sources, settings=settings,
                      enc=enc, num_threads=num_threads, verbose=verbose, label=name)
    save_fingerprints(tokens_dir, memo)     # once the cache is there: a failed run leaves nothing
    return data


# ----------------------------------------------------------------------------------------------
# Benchmark: is the pipeline as fast as tiktoken itself?

def benchmark(data, num_threads=None, repeat=5):
    """Tokens/s of the whole pipeline (files -> token files in a fresh temporary cache, as prepare
    does it) against tiktoken alone on the same texts, already in memory: its encode_ordinary_batch
    (lists of ints) and the encode_one arrays the pipeline uses, each in one call on all texts.
    All count text tokens (separators excluded); best of `repeat` interleaved runs each, since
    other processes on a small machine make single timings noisy. Also tokens per CPU second (all
    threads), which other processes disturb less: it shows what the pipeline adds to tiktoken."""
    import tempfile

    enc = get_encoding()
    vocab_hash(enc)                         # one-off costs, outside the timings
    num_threads = num_threads or os.cpu_count() or 1
    texts = [t for chunk, _ in file_chunks(expand_paths(data)) for t in chunk if t]
    seconds = {"pipeline": [], "tiktoken_lists": [], "tiktoken_arrays": []}
    cpu = {name: [] for name in seconds}    # CPU seconds of all threads: robust to other processes

    def timed(name, fn):
        wall, cpu_start = time.perf_counter(), time.process_time()
        out = fn()
        seconds[name].append(time.perf_counter() - wall)
        cpu[name].append(time.process_time() - cpu_start)
        return out

    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            meta = timed("pipeline", lambda: prepare(data, cache_dir=tmp, verbose=False,
                                                     num_threads=num_threads).meta)
        n_lists = timed("tiktoken_lists", lambda: sum(
            map(len, enc.encode_ordinary_batch(texts, num_threads=num_threads))))
        with ThreadPoolExecutor(num_threads) as pool:
            n_arrays = timed("tiktoken_arrays", lambda: sum(map(len, encode_batch(enc, texts, pool))))
    assert n_lists == n_arrays == meta["text_tokens"], (n_lists, n_arrays, meta["text_tokens"])
    result = {"documents": meta["documents"], "text_tokens": n_lists, "threads": num_threads,
              "cpus": os.cpu_count(), "repeat": repeat}
    for name in seconds:
        result[f"{name}_tokens_per_s"] = round(n_lists / min(seconds[name]))
    for name in seconds:
        result[f"{name}_tokens_per_cpu_s"] = round(n_lists / min(cpu[name]))
    return result


# ----------------------------------------------------------------------------------------------
# Command line.

def summary(data):
    """The human-readable table the command prints."""
    m = data.meta
    how = "cached" if data.cached else f"built in {m['seconds']:.1f} s, {m['tokens_per_s'] / 1e6:.2f}M tokens/s"
    rows = [f"{data.path} ({how})",
            f"{'':8}{'documents':>12}{'tokens':>14}{'bytes':>16}"]
    for split in ("train", "val"):
        rows.append(f"{split:8}{m[split + '_documents']:>12,}{m[split + '_tokens']:>14,}{m[split + '_bytes']:>16,}")
    rows.append(f"{'total':8}{m['documents']:>12,}{m['tokens']:>14,}{m['train_bytes'] + m['val_bytes']:>16,}")
    rows.append(f"tokens = {m['text_tokens']:,} text tokens + {m['tokens'] - m['text_tokens']:,} <|endoftext|>; "
                f"{m['skipped']:,} null or empty texts skipped" + ("; last document cut at max_tokens" if m["truncated"] else ""))
    return "\n".join(rows)


def main(argv=None):
    parser = OneLineParser(
        prog="python -m nanoternary.data",
        description="Tokenize text into GPT-2 token files under data/tokens/ (reused when unchanged) "
                    "and print document and token counts for train and validation.")
    parser.add_argument("--data", action="append", metavar="GLOB",
                        help="a path or glob of .parquet (column 'text'), .jsonl or .txt files; repeat for more "
                             "(default: FineWeb-Edu sample-10BT, or Python's documentation when offline)")
    parser.add_argument("--max-tokens", type=number(int, "[1, inf)"), metavar="N", default=None,
                        help=f"cap on tokens, separators included (default: all; FineWeb-Edu: {HUB_MAX_TOKENS:,})")
    parser.add_argument("--val-fraction", type=number(float, "[0, 1)"), metavar="F", default=VAL_FRACTION,
                        help=f"share of documents held out for validation (default: {VAL_FRACTION})")
    parser.add_argument("--seed", type=number(int, "[0, inf)"), metavar="S", default=0,
                        help="seed of the train/validation split (default: 0)")
    parser.add_argument("--cache-dir", metavar="DIR", default="data", help="where caches go (default: data)")
    parser.add_argument("--threads", type=number(int, "[1, inf)"), metavar="N", default=None,
                        help="tokenizer threads (default: all cores)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--bench", action="store_true",
                        help="time the pipeline against tiktoken alone on --data (nothing is cached)")
    parser.add_argument("--caches", action="store_true",
                        help="list the caches under --cache-dir: size, state (current or stale) and sources")
    parser.add_argument("--remove-stale", action="store_true",
                        help="remove the caches that can never be used again (their files changed or gone, "
                             "an older version's, a stopped build)")
    args = parser.parse_args(argv)
    safe_output()
    if args.threads is not None:
        try:
            check_threads(args.threads, "--threads")
        except ValueError as e:
            parser.error(str(e))
    tokens_dir = os.path.join(args.cache_dir, "tokens")
    if args.caches or args.remove_stale:
        caches = remove_stale(tokens_dir) if args.remove_stale else list_caches(tokens_dir)
        if args.json:
            print(json.dumps(caches))
            return 0
        for c in caches:
            print(f"{'removed ' if args.remove_stale else ''}{c['folder']}  {c['bytes'] / 1e6:,.1f} MB  {c['state']}"
                  + (f" ({c['why']})" if c["why"] else "") + (f"  {', '.join(c['sources'])}" if c["sources"] else ""))
        total = sum(c["bytes"] for c in caches)
        print(f"{'removed' if args.remove_stale else 'in all:'} {len(caches)} cache(s), {total / 1e6:,.1f} MB"
              + ("" if args.remove_stale or not any(c["state"] == "stale" for c in caches) else
                 "; --remove-stale removes the stale ones"))
        return 0
    try:
        if args.bench:
            if not args.data:
                parser.error("--bench needs --data")
            result = benchmark(args.data, num_threads=args.threads)
            print(json.dumps(result) if args.json else
                  f"{result['text_tokens']:,} tokens, {result['threads']} threads, best of {result['repeat']}: "
                  f"pipeline {result['pipeline_tokens_per_s'] / 1e6:.2f}M tokens/s; tiktoken alone "
                  f"{result['tiktoken_lists_tokens_per_s'] / 1e6:.2f}M tokens/s (encode_ordinary_batch), "
                  f"{result['tiktoken_arrays_tokens_per_s'] / 1e6:.2f}M tokens/s (encode_to_numpy); per CPU "
                  f"second: {result['pipeline_tokens_per_cpu_s'] / 1e6:.2f}M, "
                  f"{result['tiktoken_lists_tokens_per_cpu_s'] / 1e6:.2f}M, "
                  f"{result['tiktoken_arrays_tokens_per_cpu_s'] / 1e6:.2f}M")
            return 0
        data = prepare(args.data, max_tokens=args.max_tokens, val_fraction=args.val_fraction, seed=args.seed,
                       cache_dir=args.cache_dir, verbose=not args.quiet, num_threads=args.threads)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; nothing half-written was kept", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory while tokenizing; use --threads 1 (fewer batches in flight) or free memory",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"path": data.path, "cached": data.cached, **data.meta}))
    else:
        print(summary(data))
    return 0


if __name__ == "__main__":
    run_cli(main)
