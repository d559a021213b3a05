"""Data for training: token files on disk -> random (inputs, targets) batches.

    from nanoternary.data import prepare, get_batch, val_windows
    data = prepare("my-corpus/*.parquet")              # TokenData: .train, .val (uint16), .meta, .path
    x, y = get_batch(data.train, 8, 256, np.random.default_rng(0))   # (8, 256) int64, y = x shifted by 1
    windows = val_windows(data.val, 8, 256, n_batches=20)             # a fixed evaluation set

    python -m nanoternary.data                                   # FineWeb-Edu (or, offline, Python's docs)
    python -m nanoternary.data --data 'my-corpus/*.parquet' --json     # one JSON object
    python -m nanoternary.data --data book.txt --data 'notes/*.jsonl' --val-fraction 0.1

A language model learns to predict the next token. The training text is one long row of GPT-2
token ids, every document followed by <|endoftext|> (50256), kept on disk as uint16 (train.bin,
and val.bin for the documents held out); `data.train` and `data.val` are those files, memory-mapped.
A batch is B windows of T + 1 consecutive tokens from random places: the inputs are the first T,
the targets the last T, so at every position the target is the token that comes next. Validation
uses a fixed set of windows that do not overlap, the same at every evaluation, so the losses of a
run (and of runs on the same data) compare.

Where the files come from: `prepare()` (tokens.py) tokenizes the text once, from your files, from
FineWeb-Edu, or offline from Python's own documentation (sources.py), caches the token files under
data/tokens/, and checks them every time they are opened.
"""

import numpy as np

from .config import run_cli
from .sources import DataError  # noqa: F401  (raised by prepare: bad input)
from .tokens import TokenData, main, prepare  # noqa: F401


def get_batch(tokens, batch_size, seq_len, rng):
    """batch_size random windows of seq_len + 1 tokens -> inputs x and targets y, both (B, T) int64,
    with y[b, t] = x[b, t + 1] (the next token). Deterministic for the state of rng."""
    if len(tokens) < seq_len + 1:
        raise ValueError(f"{len(tokens):,} tokens are fewer than one window of seq_len + 1 = {seq_len + 1}")
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)          # (B,)
    window = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)  # (B, T+1)
    return np.ascontiguousarray(window[:, :-1]), np.ascontiguousarray(window[:, 1:])


def val_windows(tokens, batch_size, seq_len, n_batches, seed=0):
    """A fixed evaluation set: a list of n_batches (x, y) batches of non-overlapping windows, drawn
    with `seed`. If the split holds fewer than batch_size * n_batches windows, all of them are used,
    in as many full batches as they fill (or one smaller batch), so every batch has the same size
    and a plain mean of per-batch losses is the mean over windows."""
    # window i is tokens[i*T : i*T + T + 1]: its inputs and targets overlap no other window's
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"the validation split has {len(tokens):,} tokens, fewer than one window of "
                         f"seq_len + 1 = {seq_len + 1}; use more data, a larger val_fraction or a shorter seq_len")
    wanted = batch_size * n_batches
    if n_windows < wanted:
        n_batches = max(1, n_windows // batch_size)
        batch_size = min(batch_size, n_windows)
        wanted = batch_size * n_batches
    chosen = np.sort(np.random.default_rng(seed).choice(n_windows, size=wanted, replace=False))
    batches = []
    for b in range(n_batches):
        starts = chosen[b * batch_size:(b + 1) * batch_size] * seq_len
        window = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)
        batches.append((np.ascontiguousarray(window[:, :-1]), np.ascontiguousarray(window[:, 1:])))
    return batches


if __name__ == "__main__":
    run_cli(main)
