"""Training-step benchmark: tokens/s, where the time goes, and the bounds to compare with.

    python -m nanoternary.tools.bench                         # every configuration, as a table
    python -m nanoternary.tools.bench --head full --json      # one configuration, one JSON object
    python -m nanoternary.tools.bench --peer                  # and the PyTorch peer, same sitting
                                                              # (pip install -e ".[peer]" first)

One step = forward, backward (nanoternary/fast/step.py) and an AdamW update of every parameter,
embedding included, as the PyTorch peer (tools/torch_peer.py) measures it; batch 8 x 256 by default, random
token ids drawn from a Zipf law (so the hierarchical head sees realistic class sizes). Configurations:

    full        the full 50,257-way head on every position (the reference's step)
    full-25%    the full head on a random 25% of positions (the reference's trick)
    hier        the hierarchical two-level head on every position
    core        the ternary core alone: embedding frozen, loss on 0.4% of positions (the peer's
                `--frac 0.004 --freeze-emb`)

and, in the same run, the fused full head alone (head_s) against the bound set by its three GEMMs:
the plain matrix products of the same shapes ((N,C)@(C,V), (N,V)@(V,C), (V,N)@(N,C)), timed both
with all BLAS threads and split by rows across threads as the head is; the faster of the two is
the bound, and bound / head_s the head's efficiency. Each configuration runs in its own process so
its peak memory (peak_rss_mb) is its own.

With --peer, the PyTorch peer's full step and core step run in turn with ours, --rounds times, and
the ratios are taken round by round: these machines are shared and noisy (the same command can
vary by 30% from one minute to the next), so only figures measured side by side compare.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from ..fast import profile
from ..fast import step as fast
from ..fast.optim import FastAdamW
from ..fast.threads import default_workers, run_shards, set_threads, split
from ..config import OneLineParser, number
from ..model import Model, ModelConfig

CONFIGS = {
    "full": dict(head="full", loss_frac=1.0, train_embed=True),
    "full-25%": dict(head="full", loss_frac=0.25, train_embed=True),
    "hier": dict(head="hier", loss_frac=1.0, train_embed=True),
    "core": dict(head="full", loss_frac=0.004, train_embed=False),
}


def zipf_tokens(rng, shape, V=50257):
    """Token ids with P(id) ~ 1/(id + 10): GPT-2 ids roughly follow frequency."""
    p = 1.0 / (np.arange(V) + 10.0)
    return rng.choice(V, size=shape, p=p / p.sum())


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_step(head="full", loss_frac=1.0, train_embed=True, batch_size=8, seq_len=256, steps=5,
               warmup=2, seed=0, threads=None):
    """Time training steps of the reference model: one JSON-able dict."""
    set_threads(threads)
    model = Model(ModelConfig(head=head), seed=seed)
    rng = np.random.default_rng(seed)
    idx = zipf_tokens(rng, (batch_size, seq_len))
    tgt = zipf_tokens(rng, (batch_size, seq_len))
    opt = FastAdamW(model.params, lr=1e-3)

    def step():
        loss, grads = fast.loss_and_grads(model, idx, tgt, loss_frac=loss_frac, rng=rng, train_embed=train_embed)
        with profile.section("optimizer"):
            opt.step(model.params, grads)
        return loss

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    with profile.attached():                  # shares from separate, profiled steps
        for _ in range(2):
            step()
        shares = profile.shares()
    dt = float(np.median(times))
    return {
        "head": head, "loss_frac": loss_frac, "train_embed": train_embed,
        "batch_size": batch_size, "seq_len": seq_len, "workers": default_workers(),
        "step_s": round(dt, 4), "step_s_min": round(min(times), 4),
        "tokens_per_s": round(batch_size * seq_len / dt, 1),
        "shares": {k: round(v, 4) for k, v in shares.items()},
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def bench_head(batch_size=8, seq_len=256, repeat=5, seed=0):
    """The full head alone (fused, sharded as in training) against its three GEMMs."""
    from ..fast.head import softmax_ce_fused
    model = Model(ModelConfig(), seed=seed)
    rng = np.random.default_rng(seed)
    N, C = batch_size * seq_len, model.cfg.d_model
    E = model.params["embed.w"]
    h = rng.standard_normal((N, C)).astype(np.float32)
    y = zipf_tokens(rng, N)
    shards = [(a * seq_len, b * seq_len) for a, b in split(batch_size, default_workers())]

    def head():
        run_shards(lambda a, b: softmax_ce_fused(h[a:b], E, y[a:b], denom=N), shards)

    L = np.empty((N, E.shape[0]), dtype=np.float32)
    dh, dE = np.empty_like(h), np.empty_like(E)

    def gemms():                               # the same three products, nothing else,
        np.matmul(h, E.T, out=L)               # each with all BLAS threads
        np.matmul(L, E, out=dh)
        np.matmul(L.T, h, out=dE)

    def gemms_sharded():                       # or split by rows across threads, as the head is
        def piece(a, b):
            La = h[a:b] @ E.T
            La @ E
            La.T @ h[a:b]
        run_shards(piece, shards)

    fs = [gemms, gemms_sharded, head]
    ts = [[] for _ in fs]
    for f in fs:
        f()                                    # warm up
    for _ in range(repeat):                    # in turn, so a drift of the machine hits all three
        for f, t in zip(fs, ts):
            t0 = time.perf_counter()
            f()
            t.append(time.perf_counter() - t0)
    g1, g2, hd = (min(t) for t in ts)
    g = min(g1, g2)                            # the bound: the faster way to run the three GEMMs
    return {"gemm_bound_s": round(g, 4), "gemm_blas_threads_s": round(g1, 4), "gemm_sharded_s": round(g2, 4),
            "head_s": round(hd, 4), "head_efficiency": round(g / hd, 3),
            "gemm_gflops": round(3 * 2 * N * C * E.shape[0] / g / 1e9, 1)}


def check_peer(python):
    """Exit with one line when `python` cannot import torch (the peer needs it)."""
    if subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0:
        sys.exit(f"error: the PyTorch peer needs torch in {python}: pip install -e \".[peer]\" (or pass "
                 f"--peer PYTHON of an environment that has it)")


def run_peer(python, batch_size, seq_len, name):
    """tokens/s of the PyTorch peer (tools/torch_peer.py), "full" head or "core" only, parsed from its
    output. `python` may be another interpreter (a venv with torch): it finds this package by PYTHONPATH."""
    extra = {"full": [], "core": ["--frac", "0.004", "--freeze-emb"]}[name]
    cmd = [python, "-m", "nanoternary.tools.torch_peer", "bench", "--B", str(batch_size), "--T", str(seq_len)] + extra
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root] + os.environ.get("PYTHONPATH", "").split(os.pathsep))}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"peer failed: {' '.join(cmd)}\n{res.stderr[-2000:]}")
    return float(res.stdout.strip().split()[-1])


def peer_rounds(python, common, batch_size, seq_len, rounds):
    """Ours and the peer in turn, `rounds` times, for the full head and the core: per-round ratios
    hold even when the machine's speed drifts between rounds."""
    out = {}
    for name in ("full", "core"):
        ours_args = ["--head", "full"] + common + (["--loss-frac", "0.004", "--freeze-embed"] if name == "core" else [])
        pairs = []
        for r in range(rounds):
            print(f"bench: round {r + 1}/{rounds}: {name}, PyTorch peer then ours ...", file=sys.stderr, flush=True)
            p = run_peer(python, batch_size, seq_len, name)
            o = _subprocess_json(ours_args)["tokens_per_s"]
            pairs.append((p, o))
        ratios = sorted(o / p for p, o in pairs)
        out[name] = {"peer_tokens_per_s": [p for p, _ in pairs], "ours_tokens_per_s": [o for _, o in pairs],
                     "ratios": [round(o / p, 3) for p, o in pairs], "median_ratio": round(ratios[len(ratios) // 2], 3)}
    return out


def _subprocess_json(args):
    res = subprocess.run([sys.executable, "-m", "nanoternary.tools.bench", "--json"] + args,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"bench {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout)


def main(argv=None):
    ap = OneLineParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head", choices=["full", "hier"], help="one configuration only (default: all)")
    ap.add_argument("--loss-frac", type=number(float, "(0, 1]"), default=1.0, help="fraction of positions in the loss (default 1.0)")
    ap.add_argument("--freeze-embed", action="store_true", help="no embedding gradient (default: trained)")
    ap.add_argument("--batch-size", type=number(int, "[1, inf)"), default=8, help="default 8")
    ap.add_argument("--seq-len", type=number(int, "[1, inf)"), default=256, help="default 256")
    ap.add_argument("--steps", type=number(int, "[1, inf)"), default=5, help="timed steps after 2 warm-up steps (default 5)")
    ap.add_argument("--threads", type=number(int, "[1, inf)"), default=None, help="batch shards (default: one per core)")
    ap.add_argument("--gemm-bound", action="store_true", help="only the full head against its 3 GEMMs")
    ap.add_argument("--peer", nargs="?", const=sys.executable, metavar="PYTHON",
                    help="also run the PyTorch peer (tools/torch_peer.py), with this python or, without "
                         "PYTHON, this one (pip install -e \".[peer]\")")
    ap.add_argument("--rounds", type=number(int, "[1, inf)"), default=3, help="peer and ours in turn, this many times (default 3)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args(argv)
    if a.peer:
        check_peer(a.peer)
    shape = dict(batch_size=a.batch_size, seq_len=a.seq_len)

    if a.gemm_bound:
        print(json.dumps(bench_head(**shape)))
        return
    if a.head:
        r = bench_step(a.head, a.loss_frac, not a.freeze_embed, steps=a.steps, threads=a.threads, **shape)
        print(json.dumps(r) if a.json else _table([(a.head, r)]))
        return

    common = ["--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len), "--steps", str(a.steps)]
    if a.threads:
        common += ["--threads", str(a.threads)]
    runs = []
    for name, c in CONFIGS.items():
        args = ["--head", c["head"], "--loss-frac", str(c["loss_frac"])] + common
        if not c["train_embed"]:
            args.append("--freeze-embed")
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        runs.append((name, _subprocess_json(args)))
    print("bench: full head vs its GEMMs ...", file=sys.stderr, flush=True)
    bound = _subprocess_json(["--gemm-bound", "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len)])
    peer = None
    if a.peer:
        peer = peer_rounds(a.peer, common, a.batch_size, a.seq_len, a.rounds)
    if a.json:
        print(json.dumps({"runs": dict(runs), "head_vs_gemms": bound, "peer_tokens_per_s": peer}))
    else:
        print(_table(runs, bound, peer))


def _table(runs, bound=None, peer=None):
    names = ["embedding", "convmixer", "glu", "norms", "head forward", "head backward", "optimizer"]
    lines = [f"{'config':<10} {'tok/s':>8} {'step s':>7} {'mem MB':>7}  " + "  ".join(f"{n:>8.8}" for n in names) + "  other"]
    for name, r in runs:
        sh = r["shares"]
        other = 1.0 - sum(sh.get(n, 0.0) for n in names)
        lines.append(f"{name:<10} {r['tokens_per_s']:>8,.0f} {r['step_s']:>7.3f} {r['peak_rss_mb']:>7.0f}  "
                     + "  ".join(f"{100 * sh.get(n, 0.0):>7.1f}%" for n in names) + f"  {100 * other:.1f}%")
    if bound:
        lines.append(f"full head alone {bound['head_s']:.3f} s vs its 3 GEMMs {bound['gemm_bound_s']:.3f} s "
                     f"({bound['gemm_gflops']:.0f} GFLOP/s; {bound['gemm_blas_threads_s']:.3f} s with BLAS threads, "
                     f"{bound['gemm_sharded_s']:.3f} s split by rows): {100 * bound['head_efficiency']:.0f}% of the bound")
    if peer:
        for name, p in peer.items():
            lines.append(f"{name:<5} PyTorch peer {', '.join(f'{x:,.0f}' for x in p['peer_tokens_per_s'])} tok/s | "
                         f"ours {', '.join(f'{x:,.0f}' for x in p['ours_tokens_per_s'])} tok/s | "
                         f"ours/peer by round {', '.join(f'{x:.2f}' for x in p['ratios'])} (median {p['median_ratio']:.2f}x)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
