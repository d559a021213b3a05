"""Writing files so that a crash, Ctrl-C or a full disk never leaves half of one where a reader
would trust it: write under a temporary name in the same folder, flush to disk, then rename over
the real name (a rename within a folder is atomic). On failure the temporary file is removed and
the old file, if any, is untouched. Every cache, checkpoint and log rewrite of the project goes
through here.

    with atomic_open("out/latest.npz") as f:      # a file object
        np.savez(f, **arrays)
    with atomic_path("data/x.parquet") as tmp:    # a path, for writers that want one
        pq.write_table(table, tmp)
    remove_stale_temps("out")                     # at start: temporary files of dead writers
    with folder_lock("out", "a training run"):    # one writer per folder, for the block's life (filelock)
        ...

A process killed outright (kill -9, a power cut) cannot remove its temporary file. So the name of
each one says who writes it: `<name>.<host>-<pid>-<random>.tmp`, e.g.
`latest.npz.myhost-4242-1f2e3d4c.tmp`. remove_stale_temps() deletes those of this host whose
process has ended, and never one of a process that still runs (it may be writing it right now).

New files get the usual permissions (0o666 minus the process's umask, as open() gives), not the
0600 of tempfile.mkstemp, so that another user can read a cache or a checkpoint.
"""
import contextlib
import os
import re
import secrets
import socket
import time

import filelock

# The host part of temporary names: letters, digits and '-' only, so a name parses back unambiguously.
HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0])[:40] or "host"
_TEMP_NAME = re.compile(r"\.(?P<host>[A-Za-z0-9-]+)-(?P<pid>[0-9]+)-[0-9a-f]{8}\.tmp$")


def temp_path(path):
    """Create an empty temporary file next to `path`, named for this host and process; return its path."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    while True:
        tmp = f"{path}.{HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:
            # O_EXCL: a new file, never someone else's; mode 0o666 is reduced by the umask, as for open()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:                   # 1 in 4 billion: draw another name
            continue
        os.close(fd)
        return tmp


def _process_exists(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)                           # signal 0: no signal, only the check that pid exists
    except ProcessLookupError:
        return False
    except OSError:                               # PermissionError: it exists, another user's
        return True
    return True


def temp_name_parts(name):
    """(host, pid, its process still runs) of a name temp_path() made, or None for any other name.
    Whether it runs is known on this host only (False for another host's)."""
    m = _TEMP_NAME.search(name)
    if m is None:
        return None
    pid = int(m["pid"])
    return m["host"], pid, m["host"] == HOST and _process_exists(pid)


def remove_stale_temps(folder):
    """Remove the temporary files in `folder` (not in its subfolders) whose writer has ended; return
    their paths. Only names made by temp_path() are considered, only those of this host (a process
    id means nothing on another machine that shares the folder), and a file is kept while its process
    still runs. A process id reused since (after a reboot) merely keeps a stale file a while longer.
    Machines or containers sharing a folder must have different host names. On Windows, where this
    check is not available, nothing is removed."""
    if os.name != "posix":
        return []                                 # os.kill(pid, 0) would terminate the process there
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for name in sorted(names):
        parts = temp_name_parts(name)
        if parts is None or parts[0] != HOST or parts[2]:
            continue
        try:
            os.remove(os.path.join(folder, name))
            removed.append(os.path.join(folder, name))
        except OSError:                           # cleaned up by another process first, or not ours to remove
            pass
    return removed


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path next to `path`; renamed to `path` when the block succeeds."""
    tmp = temp_path(path)
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


class FolderBusy(OSError):
    """Another process holds the folder's lock."""


@contextlib.contextmanager
def folder_lock(folder, what):
    """Hold an exclusive lock on `folder` for the block, so that two processes never write the same
    run folder: `filelock` (the maintained library; the kernel's flock on Linux and macOS, the
    system's file locking on Windows) on `folder`/.lock. The kernel drops such a lock when its
    process ends, however it ends (kill -9 included), so a killed run never blocks the next one.
    Who holds it (`what`, pid, host, start time) is written beside it, in `folder`/.lock.holder, for
    the message the second process gets. Raises FolderBusy, or OSError when the folder cannot be
    written."""
    lock = filelock.FileLock(os.path.join(folder, ".lock"))
    holder = os.path.join(folder, ".lock.holder")
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        try:
            with open(holder) as f:
                who = f.read().strip()
        except OSError:
            who = ""
        raise FolderBusy(f"{folder}/ is in use by {who or 'another process'}: wait for it to end or stop it, "
                         f"or use another folder") from None
    try:
        with open(holder, "w") as f:
            f.write(f"{what} (pid {os.getpid()} on {socket.gethostname()}, since "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(holder)
        lock.release()
