"""Where the text comes from: local files, FineWeb-Edu on the Hugging Face hub, or Python's own
documentation. Each source yields chunks (texts, fraction done): lists of documents, and how far the
reading has come (for the progress bar; None when unknown). tokens.py turns them into token files.

  - paths or globs (several allowed, `expand_paths`) of
      .parquet  documents in a string column named `text` (FineWeb-Edu's layout; other columns are
                ignored), read one row group at a time so memory stays bounded;
      .jsonl    one JSON object per line, the document in its `text` field;
      .txt      (also .md, .rst) the whole file is one document, unless it contains
                `<|endoftext|>`, in which case it is split there (each piece stripped of
                surrounding whitespace);
  - FineWeb-Edu `sample-10BT` on the hub (`hub_chunks`), the reference's data. Only the parquet row
    groups needed are read, each saved under data/fineweb-edu/ and reused by later runs: a shard's
    footer, then the `text` column of each needed row group, and no byte more (the remote file is
    opened without fsspec's read-ahead, which would fetch 5 MiB past every read). Beside them,
    shard.json remembers each shard's number of row groups, and shards.json the number of shards
    once the end of the dataset was seen, so a run whose row groups are all saved needs no network.
    When the hub cannot be reached (no network, HF_HUB_OFFLINE=1, an HTTP error, no answer within
    HUB_TIMEOUT) the caller falls back to
  - a corpus built from the documentation that ships with Python itself (`python_docs_corpus`:
    pydoc's topic pages plus the stdlib's docstrings, ~0.7k documents, ~0.6M tokens), saved once
    under data/python-docs/.

Bad input (a missing file, a glob matching nothing, an empty file, a file that is not parquet, a
parquet without `text` or with a damaged data page, ...) raises DataError naming the file, the
problem and what to do. gpt2_embed.py shares the hub helpers (hub_offline_reason, call_with_timeout).
"""
import contextlib
import errno
import fnmatch
import glob
import itertools
import json
import os
import re
import socket
import stat
import sys
import threading
import urllib.parse

import pyarrow as pa
import pyarrow.parquet as pq

from .fileio import atomic_open, atomic_path, remove_stale_temps

HUB_DATASET = "datasets/HuggingFaceFW/fineweb-edu"    # an HfFileSystem path
HUB_SHARD = "sample/10BT/{:03d}_00000.parquet"        # shards 000, 001, ... of sample-10BT
HUB_MAX_TOKENS = 32_000_000      # the reference read 30,000 documents = 32M tokens
HUB_TIMEOUT = 15.0               # seconds to wait for the hub's first answer before going offline


class DataError(ValueError):
    """Bad input data: the message names the file, what is wrong with it, and what to do."""


class HubUnreachable(Exception):
    """The Hugging Face hub cannot be reached (no network, HF_HUB_OFFLINE, a timeout)."""


def brief(e, limit=160):
    """An exception as one short line: its type and the first line of its message. (The hub's HTTP
    errors run over several lines: the status and URL, a blank line, the server's own text.)"""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def cannot_write(e, folder):
    """The DataError for an OSError met while writing a cache under `folder` (permissions, a
    read-only disk, a full disk, a path through a regular file)."""
    what = f"{e.filename}: {e.strerror}" if getattr(e, "filename", None) and e.strerror else brief(e)
    fix = ("free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else
           "use shorter file names" if e.errno == errno.ENAMETOOLONG else
           "make it a folder you can write to")
    return DataError(f"cannot write to the cache folder {folder} ({what}); {fix}, or use another one "
                     f"(--cache-dir of train.py and python -m nanoternary.data, cache_dir= of prepare())")


# ----------------------------------------------------------------------------------------------
# Local sources. Each reader yields chunks (texts, done), texts a list of str or None, and done the
# number of the file's bytes read so far (for the progress bar).

def expand_paths(data):
    """Paths or globs (a string or a list of them) -> the list of files, in the order given, each
    once. A path that exists is taken as it is, even if it looks like a glob (`weird[1].parquet`);
    otherwise a pattern is expanded by glob_files (`**` for any depth: bounded, symbolic links
    followed but every folder visited once, so a link loop ends). A file reached twice (two
    patterns, a link, another spelling) is read once: files are compared by what they are
    (os.path.realpath), not by how they were named. Only regular files are data: a named pipe or a
    device would block or never end."""
    patterns = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not patterns:
        raise DataError("no data given: pass one or more paths or globs")
    files, seen = [], set()
    for pattern in map(os.fspath, patterns):
        path = os.path.expanduser(pattern)
        if not pattern:
            raise DataError("an empty path in --data: pass a file, or a glob such as 'corpus/*.parquet'")
        if os.path.lexists(path):
            if os.path.isdir(path):
                raise DataError(f"{pattern}: is a directory; pass a glob such as "
                                f"'{pattern.rstrip('/')}/*.parquet'")
            check_regular(path)
            matches = [path]
        elif glob.has_magic(path):
            matches = glob_files(path)
            if not matches:
                raise DataError(f"{pattern!r} matches no files")
        else:
            raise DataError(f"{pattern}: no such file")
        for p in matches:
            real = os.path.realpath(p)
            if real not in seen:
                seen.add(real)
                files.append(os.path.abspath(p))
    return files


def check_regular(path):
    """A DataError unless `path` is (a link to) a regular file: reading a named pipe waits for a
    writer forever, a device such as /dev/zero never ends."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or brief(e)})") from None
    if not stat.S_ISREG(mode):
        what = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or
                stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise DataError(f"{path}: is {what}, not a file; write the data to a file and pass that")


def glob_files(pattern):
    """The regular files matching `pattern`, sorted; glob.glob's rules (`*`, `?`, `[...]`, `**` for
    any number of folders, names starting with '.' only matched by a pattern starting with '.'),
    but bounded: glob.glob follows a link loop until the path is too long (one loop of `ln -s .
    me` reads each file some 40 times, two loops take forever). Here a folder is entered once per
    `**`, however many links lead to it."""
    drive, rest = os.path.splitdrive(pattern)
    seps = os.sep + (os.altsep or "")
    top = drive + (rest[0] if rest[:1] and rest[0] in seps else "")     # "/" of an absolute pattern
    parts = [p for p in re.split(f"[{re.escape(seps)}]", rest) if p]
    paths = [top]                                     # "" is the current folder
    for i, part in enumerate(parts):
        if part == "**":
            paths = [f for folder in paths for f in _all_folders(folder)]
            if i == len(parts) - 1:                   # a trailing **: every file in those folders
                paths = [os.path.join(f, n) for f in paths for n in _names(f, "*")]
        elif glob.has_magic(part):
            paths = [os.path.join(f, n) for f in paths for n in _names(f, part)]
        else:
            paths = [os.path.join(f, part) for f in paths if os.path.lexists(os.path.join(f, part))]
        if i < len(parts) - 1:
            paths = list(dict.fromkeys(f for f in paths if os.path.isdir(f or os.curdir)))
    return sorted(set(p for p in paths if os.path.isfile(p)))


def _names(folder, pattern):
    """The names in `folder` matching `pattern` (hidden ones only if the pattern starts with '.')."""
    try:
        names = os.listdir(folder or os.curdir)
    except OSError:                                   # not a folder, or not readable: no matches
        return []
    if not pattern.startswith("."):
        names = [n for n in names if not n.startswith(".")]
    return fnmatch.filter(names, pattern)


def _all_folders(top):
    """top and every folder below it (links to folders followed), each real folder once."""
    found, seen, todo = [], set(), [top]
    while todo:
        folder = todo.pop()
        try:
            st = os.stat(folder or os.curdir)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        found.append(folder)
        todo += sorted((os.path.join(folder, n) for n in _names(folder, "*")
                        if os.path.isdir(os.path.join(folder, n))), reverse=True)
    return found


def file_kind(path):
    ext = os.path.splitext(path)[1].lower()
    kinds = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl",
             ".txt": "txt", ".text": "txt", ".md": "txt", ".rst": "txt"}
    if ext not in kinds:
        raise DataError(f"{path}: unsupported file type {ext!r}; use .parquet (with a 'text' column), "
                        f".jsonl (a 'text' field per line) or .txt")
    return kinds[ext]


def open_parquet(path):
    """pq.ParquetFile of a local file, checked: it is parquet and has a string `text` column."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a parquet file ({e})") from None
    check_text_column(pf, path)
    return pf


def is_text_type(t):
    """Strings in any of Arrow's layouts: string, large_string, string_view, and a dictionary of
    them (what pandas writes for a categorical column)."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    return (pa.types.is_string(t) or pa.types.is_large_string(t)
            or getattr(pa.types, "is_string_view", lambda _: False)(t))


def check_text_column(pf, name):
    schema = pf.schema_arrow
    if "text" not in schema.names:
        raise DataError(f"{name}: no 'text' column (its columns: {', '.join(schema.names)}); "
                        f"the documents must be in a string column named 'text', as in FineWeb-Edu")
    text_type = schema.field("text").type
    if not is_text_type(text_type):
        raise DataError(f"{name}: column 'text' holds {text_type}, not strings")


def check_file(path):
    """Fail early, before any tokenizing, on a file we could not read."""
    kind = file_kind(path)
    check_regular(path)
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or brief(e)}); check its permissions") from None
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: the file is empty (0 bytes)")
    if kind == "parquet":
        open_parquet(path)
    return kind


def read_parquet(path):
    # nanochat's way: one row group at a time, only the `text` column
    pf = open_parquet(path)
    size, n = os.path.getsize(path), pf.num_row_groups
    for i in range(n):
        try:
            texts = pf.read_row_group(i, columns=["text"]).column("text").to_pylist()
        except (pa.ArrowException, OSError) as e:   # a damaged page: "Corrupt snappy compressed data", ...
            raise DataError(f"{path}: row group {i} of {n} cannot be read ({brief(e)}); the file is damaged: "
                            f"download or write it again, or leave it out of --data") from None
        yield texts, size * (i + 1) // n


def read_jsonl(path, lines_per_chunk=1000):
    texts, done = [], 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            done += len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or "text" not in record:
                what = f"fields: {', '.join(record)}" if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{path}:{lineno}: no 'text' field ({what}); each line must be an "
                                f"object with the document in 'text'")
            if record["text"] is not None and not isinstance(record["text"], str):
                raise DataError(f"{path}:{lineno}: 'text' is a {type(record['text']).__name__}, not a string")
            texts.append(record["text"])
            if len(texts) == lines_per_chunk:
                yield texts, done
                texts = []
    yield texts, done


def read_txt(path):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if "<|endoftext|>" in text:
        yield [piece.strip() for piece in text.split("<|endoftext|>")], os.path.getsize(path)
    else:
        yield [text], os.path.getsize(path)


def file_chunks(files):
    """All files' chunks in order, as (texts, fraction of all the files' bytes read so far)."""
    total = sum(os.path.getsize(p) for p in files)
    readers = {"parquet": read_parquet, "jsonl": read_jsonl, "txt": read_txt}
    before = 0
    for path in files:
        try:
            for texts, done in readers[file_kind(path)](path):
                yield texts, (before + done) / total
        except OSError as e:                # a disk error half-way: name the file, as for bad input
            raise DataError(f"{path}: cannot be read ({e.strerror or brief(e)})") from None
        before += os.path.getsize(path)


# ----------------------------------------------------------------------------------------------
# The default source: FineWeb-Edu on the Hugging Face hub, read one row group at a time.

def call_with_timeout(fn, seconds):
    """fn() in a helper thread; HubUnreachable if it has not answered within `seconds`.

    A firewall that drops packets, or a server that accepts the connection and then says nothing,
    would otherwise leave us waiting on the HTTP client's retries (some of huggingface_hub's
    requests, such as a folder's listing, have no timeout at all). The helper thread is left to
    finish on its own; it only reads, so it cannot leave anything half-written behind.
    """
    result = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: B036 -- handed back to the caller below
            result["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise HubUnreachable(f"no answer within {seconds:g} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def hub_offline_reason(endpoint=None, timeout=3.0, probe=True):
    """None if the hub looks reachable, else a short reason. Never waits more than `timeout` s.

    HF_HUB_OFFLINE=1 (huggingface_hub's own switch) answers at once. Otherwise, with `probe`, one
    TCP connection to the endpoint's host (the hub, or HF_ENDPOINT's mirror), made in a thread so
    that a DNS lookup that hangs (the usual way of no network) cannot stall the run: huggingface_hub
    would retry for much longer. Without `probe` only the switch is read (the data reader then lets
    its first request find out, bounded by HUB_TIMEOUT)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    if not probe:
        return None
    if endpoint is None:
        from huggingface_hub import constants
        if getattr(constants, "HF_HUB_OFFLINE", False):
            return "HF_HUB_OFFLINE is set"
        endpoint = constants.ENDPOINT
    url = urllib.parse.urlparse(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        call_with_timeout(lambda: socket.create_connection((host, port), timeout=timeout).close(), timeout)
    except HubUnreachable:
        return f"no answer from {host} in {timeout:g} s"
    except OSError as e:
        return f"cannot reach {host}: {e.strerror or e}"
    return None


def write_json(path, obj):
    """A small JSON file, written atomically (fileio.atomic_open)."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=1)


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _read_count(path, name):
    """The integer `name` of the small JSON file at path, or None if the file is absent or not ours."""
    try:
        value = _read_json(path)[name]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and value >= 0 else None


def _open_remote_parquet(fs, path):
    """(file, pq.ParquetFile) of a parquet file on the hub, or None if there is no such file.

    Reads just the footer (the schema and where each row group lies), not the data. The file is
    opened without read-ahead (cache_type="none"): each read pyarrow makes is one HTTP range request
    for exactly those bytes, where fsspec's default cache would fetch a 5 MiB block each time.
    (block_size=0 would not do: HfFileSystem then gives a stream, which cannot seek.)
    """
    reason = hub_offline_reason(probe=False)
    if reason:
        raise HubUnreachable(reason)

    def open_():
        f = fs.open(path, "rb", cache_type="none")
        try:
            return f, pq.ParquetFile(f)
        except BaseException:
            f.close()
            raise
    try:
        f, pf = call_with_timeout(open_, HUB_TIMEOUT)
    except FileNotFoundError:
        return None
    except pa.ArrowInvalid as e:
        raise DataError(f"hf://{path}: not a parquet file ({brief(e)})") from None
    except HubUnreachable:
        raise
    except Exception as e:                  # ConnectError, OfflineModeIsEnabled, HTTP errors, ...
        raise HubUnreachable(brief(e)) from e
    check_text_column(pf, f"hf://{path}")
    return f, pf


def _read_local_row_group(path):
    """The texts of a row group saved by an earlier run, or None (with a message, the file removed)
    if it cannot be read: it is then fetched again."""
    try:
        return pq.read_table(path, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError) as e:
        print(f"{path} is damaged ({brief(e)}); fetching it again", file=sys.stderr)
        with contextlib.suppress(OSError):
            os.remove(path)
        return None


def hub_chunks(fs, text_cache, stats):
    """FineWeb-Edu's documents, shard after shard, row group after row group, as (texts, None).

    fs is an fsspec filesystem holding HUB_DATASET (huggingface_hub.HfFileSystem in real use; some
    tests pass a local one). Row group g of shard s is saved as
    text_cache/sample/10BT/{s:03d}_00000/rg{g:05d}.parquet (just the `text` column) and read from
    there next time. The remote shard is only opened when a row group is missing locally, and then
    pyarrow fetches just that row group's `text` column (HTTP range requests), not the 2 GB file.
    What the local copy needs in order to be used without the hub is written beside it: each
    shard's row group count (shard.json in the shard's folder) and, once a shard past the last was
    asked for and not found, the number of shards (text_cache/sample/10BT/shards.json), so that an
    offline run also knows where the data ends. stats["row_groups_downloaded"] counts the row
    groups fetched.
    """
    root = os.path.join(text_cache, os.path.dirname(HUB_SHARD))
    shards_path = os.path.join(root, "shards.json")
    n_shards = _read_count(shards_path, "shards")
    remove_stale_temps(root)
    for shard in itertools.count():
        if n_shards is not None and shard >= n_shards:
            return                                            # the end of the data, seen before
        remote_path = f"{HUB_DATASET}/{HUB_SHARD.format(shard)}"
        local_dir = os.path.join(root, f"{shard:03d}_00000")
        info_path = os.path.join(local_dir, "shard.json")    # remembers the shard's row group count
        n_groups = _read_count(info_path, "row_groups")
        remove_stale_temps(local_dir)
        with contextlib.ExitStack() as stack:
            remote = None                                     # opened when first needed
            group = 0
            while n_groups is None or group < n_groups:
                local = os.path.join(local_dir, f"rg{group:05d}.parquet")
                texts = _read_local_row_group(local) if os.path.exists(local) else None
                if texts is not None:                         # downloaded by an earlier run
                    yield texts, None
                    group += 1
                    continue
                if remote is None:
                    opened = _open_remote_parquet(fs, remote_path)
                    if opened is None:                        # no such shard
                        if shard == 0:
                            raise DataError(f"hf://{remote_path} not found: has the dataset moved?")
                        write_json(shards_path, {"shards": shard})
                        return                                # past the last shard: all read
                    stack.callback(opened[0].close)
                    remote = opened[1]
                    n_groups = remote.num_row_groups
                    write_json(info_path, {"row_groups": n_groups})
                    if group >= n_groups:
                        break
                try:                                          # huggingface_hub retries and times out here
                    table = remote.read_row_group(group, columns=["text"])
                except Exception as e:
                    raise HubUnreachable(f"reading row group {group} of {remote_path}: {brief(e)}") from e
                with atomic_path(local) as tmp:
                    pq.write_table(table, tmp)
                stats["row_groups_downloaded"] += 1
                yield table.column("text").to_pylist(), None
                group += 1


# ----------------------------------------------------------------------------------------------
# The offline fallback: documentation text that ships with every Python installation.

def python_docs_corpus(cache_dir="data", verbose=True, stdlib=None):
    """Build (once) and return the path of a parquet of Python's own documentation text.

    Documents: each of pydoc's topic pages (pydoc_data.topics: the language reference sections
    `help()` shows), then for each stdlib module its docstring followed by the docstrings of its
    public classes and functions. Sources are parsed with `ast`, never imported. stdlib: the
    folder of modules to read (default: the whole standard library; the tests pass a small one).
    """
    import ast
    import platform
    import sysconfig

    path = os.path.join(cache_dir, "python-docs", f"python-{platform.python_version()}.parquet")
    if os.path.exists(path):
        try:
            pq.read_table(path, columns=["text"])             # all of it: ~2 MB, a few ms
            return path
        except (pa.ArrowException, OSError) as e:
            print(f"{path} is damaged ({brief(e)}); building it again", file=sys.stderr)
    remove_stale_temps(os.path.dirname(path))
    if verbose:
        print(f"building the Python documentation corpus {path} (once, about 10 s)", file=sys.stderr)
    from pydoc_data.topics import topics
    texts = [topics[name] for name in sorted(topics)]
    urls = [f"pydoc:topics/{name}" for name in sorted(topics)]
    stdlib = stdlib or sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    for folder, subfolders, names in os.walk(stdlib):
        subfolders[:] = sorted(d for d in subfolders if d not in skip)
        for name in sorted(n for n in names if n.endswith(".py")):
            source = os.path.join(folder, name)
            try:
                with open(source, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            parts = [ast.get_docstring(tree) or ""]
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    doc = ast.get_docstring(node)
                    if doc and not node.name.startswith("_"):
                        parts.append(f"{node.name}\n\n{doc}")
            text = "\n\n".join(p for p in parts if p)
            if text:
                texts.append(text)
                urls.append("stdlib:" + os.path.relpath(source, stdlib))
    table = pa.table({"text": texts, "url": urls})
    try:
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
    except OSError as e:
        raise cannot_write(e, os.path.dirname(path)) from None
    return path
