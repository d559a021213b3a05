"""The adaptive head's choices, measured: the split of the vocabulary, its speed, and what tying costs.

    python -m nanoternary.tools.adaptive_lab split     # cost per row and the shortlist's share, per split
    python -m nanoternary.tools.adaptive_lab speed     # the head alone against the full head, one core
    python -m nanoternary.tools.adaptive_lab learn     # a small learning test: tied vs untied, the splits
    ... --data 'my-corpus/*.parquet'                   # any text (default: train.py's default data)

docs/heads.md quotes their output. Each subcommand takes the token counts of the data's training
split (the cluster map train.py would make) and targets from its validation split:

split  For each set of cutoffs (d = 256, div 4): the multiply-adds of one row in training,
       d (S + J) + sum_i share_i (d d_i + n_i d_i) (ops/adaptive_head.py), against the full head's
       d V, and the share of the targets the shortlist scores at full width; on the text, and on the
       Zipf prior a model made without data uses (classmap.ClusterMap.default); and the hier head's
       C (K + |S_c|) with its 224 classes made the same ways, for comparison.
speed  The head's forward and backward for 2,048 rows of text on one core (BLAS at one thread), the
       tie included (adaptive_weights, the fused op, adaptive_weight_grads), against the fused full
       head (fast/head.py) on the same rows: best of --repeat timings, taken in turn.
learn  A bigram model small enough to train in a minute, h = RMSNorm(E[x] @ A), with the adaptive
       head on h: E (V, 256) random N(0, 0.02) and A (256, 256), --steps AdamW steps (lr 3e-3) of
       2,048 (input, next token) pairs of the text; the validation NLL (exact, nats/token) of the
       val split's first 32,768 pairs. --untied gives the tail clusters token vectors of their own
       (W_i, initialised as E's) instead of the first d_i columns of E.
"""
import argparse
import json
import time

import numpy as np

from ..classmap import ClassMap, ClusterMap
from ..data import prepare
from ..fast.adaptive_head import adaptive_ce_fused
from ..fast.head import softmax_ce_fused
from ..fast.optim import FastAdamW
from ..fast.threads import blas_threads, default_workers
from ..ops.adaptive_head import adaptive_nll, adaptive_weight_grads, adaptive_weights, tail_widths
from ..ops.embedding import embedding_backward, embedding_forward
from ..ops.norm import rmsnorm_backward, rmsnorm_forward

SPLITS = ((2048, 8192), (4096, 16384), (8192, 32768))
C, DIV = 256, 4


def text(data):
    d = prepare(data, verbose=False)
    counts = np.bincount(np.asarray(d.train), minlength=50257)
    return d, counts


def cost_per_row(cmap, targets):
    """-> (multiply-adds per row in training, the share of targets in the shortlist)."""
    share = np.bincount(cmap.token_cluster[targets], minlength=cmap.n_tails + 1) / targets.size
    d = tail_widths(C, DIV, cmap.n_tails)
    cost = C * (cmap.shortlist_size + cmap.n_tails) + sum(s * (C * di + n * di)
                                                          for s, di, n in zip(share[1:], d, cmap.sizes[1:]))
    return cost, share[0]


def split(args):
    d, counts = text(args.data)
    y = np.asarray(d.val).astype(np.int64)
    prior = 1.0 / (np.arange(50257) + 10.0)
    rows = []
    for cuts in SPLITS:
        cutoffs = (*cuts, 50257)
        c_text, s_text = cost_per_row(ClusterMap.from_counts(counts, cutoffs), y)
        default = ClusterMap.default(50257, cutoffs)
        share = np.bincount(default.token_cluster, weights=prior, minlength=3) / prior.sum()
        c_prior = C * (cuts[0] + 2) + sum(s * (C * di + n * di) for s, di, n in
                                          zip(share[1:], tail_widths(C, DIV, 2), default.sizes[1:]))
        rows.append({"cutoffs": cutoffs, "text_cost": c_text, "text_shortlist_share": s_text,
                     "prior_cost": c_prior, "prior_shortlist_share": share[0]})
    full = C * 50257
    print(f"data: {d.path} (map from {len(d.train):,} training tokens, shares over {y.size:,} validation targets)")
    print(f"{'cutoffs':<22} {'text: MACs/row':>16} {'shortlist':>10} {'prior: MACs/row':>17} {'shortlist':>10}")
    for r in rows:
        print(f"{str(r['cutoffs']):<22} {r['text_cost'] / 1e6:>9.2f}M ({full / r['text_cost']:>4.1f}x) "
              f"{100 * r['text_shortlist_share']:>9.0f}% {r['prior_cost'] / 1e6:>10.2f}M ({full / r['prior_cost']:>4.1f}x) "
              f"{100 * r['prior_shortlist_share']:>9.0f}%")
    hier_text = ClassMap.from_counts(counts, 224)
    hier_prior = ClassMap.default(50257, 224)
    size = lambda cm: np.diff(cm.offsets)[cm.token_class]                # the class size of every token
    mac_text = C * (224 + size(hier_text)[y].mean())
    mac_prior = C * (224 + (prior * size(hier_prior)).sum() / prior.sum())
    print(f"{'hier head, 224 classes':<22} {mac_text / 1e6:>9.2f}M ({full / mac_text:>4.0f}x) {'':>10} "
          f"{mac_prior / 1e6:>10.2f}M ({full / mac_prior:>4.0f}x)")
    print(f"the full head: {full / 1e6:.2f}M multiply-adds per row")


def speed(args):
    d, counts = text(args.data)
    r = np.random.default_rng(0)
    N = 2048
    start = int(r.integers(0, len(d.val) - N))
    y = np.asarray(d.val[start:start + N]).astype(np.int64)
    h = r.standard_normal((N, C)).astype(np.float32)
    E = r.normal(0, 0.02, (50257, C)).astype(np.float32)

    def adaptive(cmap, cw, projs):
        def run():
            W_head, tails = adaptive_weights(E, cw, projs, cmap)
            _, _, dWh, dt = adaptive_ce_fused(h, W_head, tails, cmap, y, workers=1)
            adaptive_weight_grads(dWh, dt, cmap, E.shape)
        return run
    fns = {"full": lambda: softmax_ce_fused(h, E, y)}
    for cuts in SPLITS:
        cmap = ClusterMap.from_counts(counts, (*cuts, 50257))
        projs = [r.normal(0, C ** -0.5, (di, C)).astype(np.float32) for di in tail_widths(C, DIV, 2)]
        fns[str(cuts)] = adaptive(cmap, r.normal(0, 0.02, (2, C)).astype(np.float32), projs)
    times = {k: [] for k in fns}
    with blas_threads(1):
        for f in fns.values():
            f()
        for _ in range(args.repeat):                  # in turn, so a drift of the machine hits all
            for k, f in fns.items():
                t0 = time.process_time()
                f()
                times[k].append(time.process_time() - t0)
    best = {k: min(v) for k, v in times.items()}
    print(f"data: {d.path}; {N:,} rows, forward and backward, one core, CPU time, best of {args.repeat}")
    for k, t in best.items():
        print(f"{'full head' if k == 'full' else 'adaptive ' + k:<26} {1e3 * t:>8.1f} ms   "
              f"{best['full'] / t:>5.1f}x the full head's speed")


def bigram(counts, cutoffs, untied, steps, tokens, val, seed=0):
    """The learning test of the module docstring -> validation NLL."""
    cmap = ClusterMap.from_counts(counts, cutoffs)
    r = np.random.default_rng(seed)
    d = tail_widths(C, DIV, cmap.n_tails)
    p = {"E": r.normal(0, 0.02, (50257, C)), "A": r.normal(0, C ** -0.5, (C, C)),
         "cw": r.normal(0, 0.02, (cmap.n_tails, C))}
    p.update({f"P{i}": r.normal(0, C ** -0.5, (di, C)) for i, di in enumerate(d, 1)})
    if untied:
        p.update({f"W{i}": p["E"][cmap.members(i), :di].copy() for i, di in enumerate(d, 1)})
    p = {k: v.astype(np.float32) for k, v in p.items()}
    g_ones = np.ones(C, np.float32)
    opt = FastAdamW(p, lr=3e-3, weight_decay=0.0)
    n = cmap.n_tails

    def head(p):
        W_head, tails = adaptive_weights(p["E"], p["cw"], [p[f"P{i}"] for i in range(1, n + 1)], cmap)
        if untied:
            tails = [(P, p[f"W{i}"]) for i, (P, _) in enumerate(tails, 1)]
        return W_head, tails

    def hidden(p, x):
        e, c_e = embedding_forward(x, p["E"])
        u = e @ p["A"]
        hh, c_n = rmsnorm_forward(u, g_ones)
        return hh, (c_e, e, c_n)

    for step in range(steps):
        i = r.integers(0, len(tokens) - 2049)
        x, y = tokens[i:i + 2048].astype(np.int64), tokens[i + 1:i + 2049].astype(np.int64)
        hh, (c_e, e, c_n) = hidden(p, x)
        W_head, tails = head(p)
        _, dh, dWh, dt = adaptive_ce_fused(hh, W_head, tails, cmap, y, workers=default_workers())
        dE, dcw, dP = adaptive_weight_grads(dWh, dt if not untied else [(dP, dW[:, :0]) for dP, dW in dt],
                                            cmap, p["E"].shape)          # untied: no tail columns of E
        du, _ = rmsnorm_backward(dh, c_n)
        grads = {"E": dE + embedding_backward(du @ p["A"].T, c_e), "A": e.T @ du, "cw": dcw,
                 **{f"P{i}": g for i, g in enumerate(dP, 1)}}
        if untied:
            grads.update({f"W{i}": dW for i, (_, dW) in enumerate(dt, 1)})
        opt.step(p, grads)
    W_head, tails = head(p)
    xv, yv = val[:-1].astype(np.int64), val[1:].astype(np.int64)
    return float(np.mean([adaptive_nll(hidden(p, xv[i:i + 4096])[0], W_head, tails, cmap, yv[i:i + 4096]).mean()
                          for i in range(0, xv.size, 4096)]))


def learn(args):
    d, counts = text(args.data)
    tokens, val = np.asarray(d.train), np.asarray(d.val[:32769])
    runs = [((4096, 16384, 50257), False), ((2048, 8192, 50257), False), ((8192, 32768, 50257), False),
            ((4096, 16384, 50257), True)]
    if args.only:
        runs = [r for r in runs if str(r[0][0]) == args.only.split(",")[0] and r[1] == ("untied" in args.only)]
    print(f"data: {d.path}; {args.steps} AdamW steps of 2,048 pairs; validation NLL over {val.size - 1:,} pairs; "
          f"seed {args.seed}")
    out = []
    for cutoffs, untied in runs:
        t0 = time.time()
        nll = bigram(counts, cutoffs, untied, args.steps, tokens, val, args.seed)
        out.append({"cutoffs": cutoffs, "untied": untied, "val_nll": round(nll, 4)})
        print(f"{str(cutoffs):<22} {'untied W_i' if untied else 'tied':<11} val NLL {nll:.4f}  ({time.time() - t0:.0f} s)",
              flush=True)
    if args.json:
        print(json.dumps(out))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m nanoternary.tools.adaptive_lab", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("split", "speed", "learn"))
    ap.add_argument("--data", action="append", default=None, metavar="GLOB",
                    help="text files (default: train.py's default data)")
    ap.add_argument("--repeat", type=int, default=5, help="speed: timings per head (default 5)")
    ap.add_argument("--steps", type=int, default=600, help="learn: AdamW steps per run (default 600)")
    ap.add_argument("--seed", type=int, default=0, help="learn: the initial weights and the batches (default 0)")
    ap.add_argument("--only", default=None, metavar="S[,untied]", help="learn: only the run of shortlist S "
                    "(2048, 4096 or 8192), tied unless ',untied' follows")
    ap.add_argument("--json", action="store_true", help="learn: also one JSON line")
    args = ap.parse_args(argv)
    {"split": split, "speed": speed, "learn": learn}[args.what](args)


if __name__ == "__main__":
    main()
