"""The loss of any checkpoint on any text: validation NLL (nats per token) and bits per byte.

    python -m nanoternary.evaluate --checkpoint out --data 'other-text/*.parquet'
    python -m nanoternary.evaluate --checkpoint runs/a/best.npz --data book.txt --tokens 0 --json
    python -m nanoternary.evaluate --checkpoint out/model-packed.npz --data notes.jsonl

Two runs trained on different data (or with different heads, tokenizers' splits, sequence lengths)
compare on text neither of them saw: the same windows of the same tokens, scored by each model's
exact next-token distribution. The text is tokenized and cached as for training (data.prepare,
with no validation split unless --split asks for one), then cut into non-overlapping windows of
--seq-len + 1 tokens, drawn with --seed; every position of a window is scored, the first ones with
less context than the rest, as in training's validation. Bits per byte divide the NLL in bits by
the text's UTF-8 bytes per token, so they compare across tokenizations too.

Full checkpoints (train.py's) and packed ones (`python -m nanoternary.generate export`) alike: both
go through pack.as_weights, the quantized ternary matrices and the float tensors, and the model's own
body_forward; the full head's NLL is computed in row chunks (fast/head.py) so the (N, V) logits are
never held.
"""
import json
import math
import sys

import numpy as np

from .checkpoint import CheckpointError, resolve
from .config import OneLineParser, number, run_cli, safe_output
from .data import DataError, prepare, val_windows
from .fast.head import nll_fused
from .model import body_forward
from .ops.embedding import embedding_forward
from .ops.hier_head import hier_nll
from .pack import load_weights
from .resources import check_generation


def nll(weights, idx, targets):
    # idx, targets (B,T) -> (B,T) float64: -log p(target), from InferenceWeights (pack.py)
    cfg, p = weights.cfg, {k: np.asarray(v, dtype=weights.dtype) for k, v in weights.params.items()}
    q = {k: (wt.astype(weights.dtype), s) for k, (wt, s) in weights.ternary.items()}
    h, _ = body_forward(embedding_forward(idx, p["embed.w"])[0], p, q, cfg)
    y = targets.reshape(-1)
    if cfg.head == "full":
        out = nll_fused(h, p["embed.w"], y)
    else:
        out = hier_nll(h, p["embed.w"], p["head.class_w"], weights.class_map, y)
    return out.reshape(targets.shape)


def evaluate(checkpoint, data, tokens=131072, seq_len=256, split="all", seed=0, batch_size=8, verbose=True):
    """-> dict: nll (nats/token), bits_per_byte, tokens scored, and what was scored with what."""
    w = load_weights(resolve(checkpoint))
    check_generation(w.cfg, w.dtype.itemsize, min(batch_size, max(1, tokens // seq_len) if tokens else batch_size)
                     * seq_len, f"scoring windows of {seq_len:,} tokens (--seq-len)")
    d = prepare(data, val_fraction=0.0 if split == "all" else 0.05, verbose=verbose)
    if split == "all":
        text, n_bytes, n_tokens = d.train, d.meta["train_bytes"], d.meta["train_tokens"]
    else:
        text, n_bytes, n_tokens = d.val, d.meta["val_bytes"], d.meta["val_tokens"]
    if len(text) < seq_len + 1:
        raise DataError(f"{d.path}: its {split} text has {len(text):,} tokens, fewer than one window of "
                        f"{seq_len + 1}: give more text or a smaller --seq-len")
    if text.size and int(np.max(text)) >= w.cfg.vocab_size:
        raise DataError(f"{d.path} has token ids beyond this model's vocabulary of {w.cfg.vocab_size}")
    n_windows = (len(text) - 1) // seq_len if not tokens else max(1, min(tokens // seq_len, (len(text) - 1) // seq_len))
    windows = val_windows(text, min(batch_size, n_windows), seq_len, max(1, n_windows // batch_size), seed=seed)
    total, count = 0.0, 0
    for x, y in windows:
        out = nll(w, x, y)
        total, count = total + float(out.sum()), count + out.size
    value = total / count
    step = w.meta.get("step", w.meta.get("source", {}).get("step"))
    return {"checkpoint": w.path, "kind": w.kind, "step": step, "head": w.cfg.head, "data": d.path,
            "split": split, "tokens": count, "windows": sum(x.shape[0] for x, _ in windows), "seq_len": seq_len,
            "nll": round(value, 6), "bits_per_byte": round(value / math.log(2) / (n_bytes / max(n_tokens, 1)), 6)}


def main(argv=None):
    ap = OneLineParser(prog="python -m nanoternary.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="out", help="a checkpoint file (full or packed) or a run folder "
                    "(its latest.npz) (default: out)")
    ap.add_argument("--data", action="append", required=True, metavar="GLOB",
                    help="parquet (column 'text'), jsonl or txt files; repeatable")
    ap.add_argument("--tokens", type=number(int, "[0, inf)"), default=131072, help="tokens to score, 0: all of the text (default: 131072)")
    ap.add_argument("--seq-len", type=number(int, "[1, inf)"), default=256, help="tokens per window (default: 256)")
    ap.add_argument("--split", choices=("all", "val"), default="all",
                    help="all of the text (default), or the 5%% validation split train.py would hold out")
    ap.add_argument("--seed", type=number(int, "[0, inf)"), default=0, help="which windows (default: 0)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    safe_output()
    for name in ("tokens", "seq_len", "seed"):
        if getattr(args, name) < (0 if name != "seq_len" else 1):
            ap.error(f"--{name.replace('_', '-')} must be {'positive' if name == 'seq_len' else 'at least 0'}")
    try:
        r = evaluate(args.checkpoint, args.data, args.tokens, args.seq_len, args.split, args.seed,
                     verbose=not args.json)
    except (CheckpointError, DataError, ValueError) as e:   # ValueError: resources' memory check
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['checkpoint']} ({r['kind']}, step {r['step']}, head {r['head']}) on {r['data']} ({r['split']}): "
              f"NLL {r['nll']:.4f} nats/token, {r['bits_per_byte']:.4f} bits/byte over {r['tokens']:,} tokens "
              f"({r['windows']} windows of {r['seq_len']})")
    return 0


if __name__ == "__main__":
    run_cli(main)
