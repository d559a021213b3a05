"""The run log, OUT/log.jsonl: one JSON object per line, appended as training goes.

A line is appended in one write and flushed, but a crash or a full disk can still cut the last one
short; readers skip a line that does not parse (only the last can be partial), so a damaged log
never stops a resume or a plot.
"""
import json
import os

from .fileio import atomic_open


def append(path, rec):
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()


def read(path):
    """The records of a log, skipping a cut-short line."""
    recs = []
    with open(path) as f:
        for line in f:
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return recs


def trim(path, step):
    """Keep only the records up to `step` (on resume: the checkpoint's step), atomically."""
    if not os.path.exists(path):
        return
    keep = [r for r in read(path) if r.get("step", 0) <= step]
    with atomic_open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
