"""The run log, OUT/log.jsonl: one JSON object per line, appended as training goes; and its plot.

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


def plot(out):
    """OUT/loss.png from OUT/log.jsonl, if matplotlib is installed (an optional extra); its path or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    recs = read(os.path.join(out, "log.jsonl"))
    tr = [(r["elapsed"] / 60, r["train_loss"]) for r in recs if "train_loss" in r]
    va = [(r["elapsed"] / 60, r["val_loss"]) for r in recs if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train (training objective)", alpha=0.6)
    if va:
        ax.plot(*zip(*va), "o-", label="validation NLL")
    ax.set_xlabel("minutes")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    path = os.path.join(out, "loss.png")
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
