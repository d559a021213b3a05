"""The checks of a training run against its data and its machine, and the messages that lead out of
a failure: each names the file, the flag, the step, and what to do (run.py calls them).

    preflight(settings, comm)          # before any work: threads and memory (resources.py)
    batch_split_error(cfg, size)       # a global batch that several processes cannot share
    check_splits(data, cfg)            # both splits hold a window of the longest sequence
    write_failure(e, path, step, ...)  # a full disk: the file, the space, what is intact
    suspects(cfg)                      # after a divergence: the settings furthest above their defaults
"""
import contextlib
import dataclasses
import errno
import os

from . import config
from .checkpoint import BEST, LATEST
from .fast.threads import available_cores
from .resources import check_memory, check_threads, human
from .sources import DataError


def brief(paths, limit=120):
    text = ", ".join(map(str, paths)) if isinstance(paths, (list, tuple)) else str(paths)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_splits(data, cfg):
    """Both splits must hold a window of the longest sequence (seq_len + 1 tokens): a DataError that
    names the split, the counts and the flag that helps."""
    T = max(cfg.curriculum or (cfg.seq_len,))
    m = data.meta
    what = ", ".join(str(x.get("path")) for x in m.get("sources", []) if isinstance(x, dict))[:200] or data.path
    if m.get("documents", 2) < 2:
        raise DataError(f"{what} holds {m.get('documents')} document: a run needs at least 2, one of them for "
                        f"validation: add documents (a .txt file splits into documents at <|endoftext|>)")
    for split, tokens, fix in (("validation", len(data.val), "a larger --val-fraction"),
                               ("training", len(data.train), "a smaller --val-fraction")):
        if tokens < T + 1:
            raise DataError(f"the {split} split of {what} has {tokens:,} tokens, fewer than one window of "
                            f"{T + 1:,} (the longest sequence + 1): use a shorter --seq-len"
                            f"{' or --curriculum' if cfg.curriculum else ''}, more data or {fix}")


def write_failure(e, path, step, needed, saved, out):
    """The one line for an OSError while writing `path` at `step`: the file, the error, the space free
    and needed on a full disk, what is intact (the previous checkpoints), and what to do."""
    free = None
    with contextlib.suppress(OSError):
        st = os.statvfs(os.path.dirname(path) or ".")
        free = st.f_bavail * st.f_frsize
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    intact = [f"{out}/{n} (step {s:,})" for n, s in saved.items()] or \
             [f"{out}/{n}" for n in (LATEST, BEST) if os.path.exists(os.path.join(out, n))]
    return (f"cannot write {path} at step {step:,} ({e.strerror or e}"
            + (f"; {human(free)} free" if free is not None else "")
            + (f", the checkpoint needs about {human(needed)}" if full and needed else "") + "); "
            + (f"the previous checkpoint is intact: {', '.join(intact)}" if intact else "no checkpoint was saved yet")
            + ("; free some space" if full else "; make the folder writable")
            + (" and continue with --resume" if intact else " and start again"))


def suspects(cfg):
    """What to change after a divergence: the step-size settings furthest above their defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    far = sorted(((getattr(cfg, k) / defaults[k], k) for k in ("lr_muon", "lr_adam", "weight_decay", "z_loss")
                  if defaults.get(k) and getattr(cfg, k, 0) > 10 * defaults[k]), reverse=True)
    if far:
        return "the likely cause: " + ", ".join(f"{config.flag(k)} {getattr(cfg, k):g} (default {defaults[k]:g})"
                                                for _, k in far) + ": start again with lower values"
    return "lower --lr-muon and --lr-adam (or --warmup longer) and start again"


def preflight(settings_, comm):
    """Before any work: threads and memory against this machine (resources.py). -> settings_."""
    cfg, model_cfg = settings_[0], settings_[1]
    if cfg.threads:
        check_threads(cfg.threads, "--threads")
    workers = 1 if cfg.plain else (cfg.threads or available_cores())
    check_memory(cfg, model_cfg, workers, processes=getattr(comm, "local_size", 1))
    return settings_


def batch_split_error(cfg, size):
    """None, or the one line for a batch that does not split into `size` processes at every length."""
    lengths = cfg.curriculum or (cfg.seq_len,)
    for T in lengths:
        B = max(1, cfg.batch_size * cfg.seq_len // T)
        if B % size:
            start = -(-cfg.batch_size // size) * size                   # the multiples of size from here
            ok = next(b for b in range(start, start + size * max(lengths) * 2 + 1, size)
                      if all(max(1, b * cfg.seq_len // t) % size == 0 for t in lengths))
            return (f"--batch-size {cfg.batch_size} (all processes together) is {B} sequence(s) of {T} tokens"
                    + (" at that curriculum length" if cfg.curriculum else "") + f", which does not split into "
                    f"{size} equal parts, one per process: use --batch-size {ok}" + (" (the smallest that splits at every length)"
                                                                    if cfg.curriculum else ""))
    return None
