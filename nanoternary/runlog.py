"""The run log, OUT/log.jsonl: one JSON object per line, appended as training goes; and its plot.

The log is plain JSON, always: a value that is not a finite number (a diverged loss, no gradient
norm) is written as null, never as NaN or Infinity, which strict JSON parsers reject (plain()).
A line is appended in one write and flushed, but a crash or a full disk can still cut the last one
short, and a file can be damaged or edited by hand. So readers take only the records train.py
could have written: JSON objects with `step`, `tokens`, `train_loss` and `elapsed`, and every known
field of its type (FIELDS: `step` and `tokens` integers, the others numbers, the losses possibly
null). Every other line is skipped, whatever it holds (a cut line, `[1, 2]`, `{"step": "7"}`, a
record without `elapsed`, bytes that are not UTF-8): a damaged log never stops a resume or a plot.
"""
import json
import math
import numbers
import os

from .fileio import atomic_open

REQUIRED = ("step", "tokens", "train_loss", "elapsed")      # in every record train.py writes
# field -> the types a record may hold there
FIELDS = {"step": (int,), "tokens": (int,), "elapsed": (numbers.Real,),
          "train_loss": (numbers.Real, type(None)), "val_loss": (numbers.Real, type(None)),
          "val_bpb": (numbers.Real, type(None)), "lr": (numbers.Real, type(None)),
          "grad_norm": (numbers.Real, type(None)), "tok_per_s": (numbers.Real, type(None))}


def plain(obj):
    """obj with every float that is not finite replaced by None (and NumPy numbers made Python
    ones), for json.dumps(..., allow_nan=False): what every JSON parser reads."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj) if math.isfinite(obj) else None
    return obj


def dumps(obj):
    """One line of plain JSON."""
    return json.dumps(plain(obj), allow_nan=False)


def append(path, rec):
    with open(path, "a") as f:
        f.write(dumps(rec) + "\n")
        f.flush()


def valid(rec):
    """True for a record readers can use: an object whose known fields have their types."""
    if not isinstance(rec, dict) or not all(k in rec for k in REQUIRED):
        return False
    for k, types in FIELDS.items():
        v = rec.get(k)
        if k in rec and (isinstance(v, bool) or not isinstance(v, types)):
            return False
        if isinstance(v, float) and not math.isfinite(v):       # NaN written by an older version
            return False
    return rec["step"] >= 0 and rec["tokens"] >= 0


def read(path):
    """The valid records of a log (valid()), skipping every other line."""
    recs = []
    with open(path, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                continue
            if valid(rec):
                recs.append(rec)
    return recs


def trim(path, step):
    """Keep only the valid records up to `step` (on resume: the checkpoint's step), atomically."""
    if not os.path.exists(path):
        return
    keep = [r for r in read(path) if r["step"] <= step]
    with atomic_open(path, "w") as f:
        f.writelines(dumps(r) + "\n" for r in keep)


def plot(out):
    """OUT/loss.png from OUT/log.jsonl, if matplotlib is installed (an optional extra); its path or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    recs = read(os.path.join(out, "log.jsonl"))
    tr = [(r["elapsed"] / 60, r["train_loss"]) for r in recs if r["train_loss"] is not None]
    va = [(r["elapsed"] / 60, r["val_loss"]) for r in recs if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train (training objective)", alpha=0.6)
    if va:
        ax.plot(*zip(*va), "o-", label="validation NLL")
    ax.set_xlabel("minutes")
    ax.set_ylabel("loss (nats/token)")
    if tr or va:
        ax.legend()
    ax.grid(alpha=0.3)
    path = os.path.join(out, "loss.png")
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
