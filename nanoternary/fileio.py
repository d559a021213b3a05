"""Writing files so that a crash, Ctrl-C or a full disk never leaves half of one where a reader
would trust it: write under a temporary name in the same folder, flush to disk, then rename over
the real name (a rename within a folder is atomic). On failure the temporary file is removed and
the old file, if any, is untouched. Every cache, checkpoint and log rewrite of the project goes
through here.

    with atomic_open("out/latest.npz") as f:      # a file object
        np.savez(f, **arrays)
    with atomic_path("data/x.parquet") as tmp:    # a path, for writers that want one
        pq.write_table(table, tmp)
"""
import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path next to `path`; renamed to `path` when the block succeeds."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:               # to disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """Yields a file object writing to a temporary file; renamed to `path` when the block succeeds."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            yield f
