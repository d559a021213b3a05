"""Training-step benchmark: tokens/s, where the time goes, and the bounds to compare with.

    python -m nanoternary.tools.bench                         # every configuration, as a table
    python -m nanoternary.tools.bench --interleave 9          # ... and one step of each in turn, 9 times
    python -m nanoternary.tools.bench --head adaptive --loss-frac 1 --json   # one configuration, JSON
    python -m nanoternary.tools.bench --gemm-bound            # the fused full head against its 3 GEMMs
    python -m nanoternary.tools.bench --peer                  # and the PyTorch peer, same sitting
                                                              # (pip install -e ".[peer]" first)

One step = forward, backward (nanoternary/fast/step.py) and an AdamW update of every parameter,
embedding included, as the PyTorch peer (tools/torch_peer.py) measures it; batch 8 x 256 by default, random
token ids drawn from a Zipf law (so the hierarchical head sees realistic class sizes). Configurations:

    full        the full 50,257-way head on every position (the reference's step)
    full-25%    the full head on a random 25% of positions (the reference's trick)
    hier        the hierarchical two-level head on every position
    adaptive    the adaptive softmax on every position (default split 4096 / 16384 / 50257)
    core        the ternary core alone: embedding frozen, loss on 0.4% of positions (the peer's
                `--frac 0.004 --freeze-emb`)

Every head against its bound: each configuration also counts the FLOPs and the bytes its step must
move, part by part (the core's ops as tools/roofline.py counts them; the head's products and the
arrays it must read and write once; the embedding's backward; AdamW on every trained parameter),
and the table turns them into a bound with the GEMM rate and the memory bandwidth measured in the
same run (roofline.machine, one core): the sum over the parts of max(FLOPs / rate, bytes /
bandwidth), divided by the cores, as roofline does. `bound tok/s` is the batch's tokens over that
time, `of bound` the measured rate's share of it. The head's own FLOPs are those of its products
(2 per multiply-add; the backward twice the forward); its bytes leave out the logits, which a
fused head need not write to memory.

and, in the same run, the fused full head alone (head_s) against the bound set by its three GEMMs:
the plain matrix products of the same shapes ((N,C)@(C,V), (N,V)@(V,C), (V,N)@(N,C)), timed both
with all BLAS threads and split by rows across threads as the head is; the faster of the two is
the bound, and bound / head_s the head's efficiency. Each configuration runs in its own process so
its peak memory (peak_rss_mb) is its own.

With --peer, the PyTorch peer's full step and core step run in turn with ours, --rounds times, and
the ratios are taken round by round: these machines are shared and noisy (the same command can
vary by 30% from one minute to the next), so only figures measured side by side compare. For the
same reason `--rounds R` without --peer runs every configuration in turn R times and prints each
round's ratios (adaptive / full, adaptive / full-25%, hier / core) and the medians; and
`--interleave R` builds every configuration in one process and times one step of each in turn, R
times, so that the steps compared are seconds apart, not minutes: the table's tok/s and ratios
then come from those steps (each configuration's median; the ratios round by round).
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
from ..config import OneLineParser, number
from ..fast.threads import blas_threads, default_workers, run_shards, set_threads, split
from ..model import Model, ModelConfig, head_weights, n_hier_classes
from .roofline import machine, ops

CONFIGS = {
    "full": dict(head="full", loss_frac=1.0, train_embed=True),
    "full-25%": dict(head="full", loss_frac=0.25, train_embed=True),
    "hier": dict(head="hier", loss_frac=1.0, train_embed=True),
    "adaptive": dict(head="adaptive", loss_frac=1.0, train_embed=True),
    "core": dict(head="full", loss_frac=0.004, train_embed=False),
}


def zipf_tokens(rng, shape, V=50257):
    """Token ids with P(id) ~ 1/(id + 10): GPT-2 ids roughly follow frequency."""
    p = 1.0 / (np.arange(V) + 10.0)
    return rng.choice(V, size=shape, p=p / p.sum())


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_step(head="full", loss_frac=1.0, train_embed=True, batch_size=8, seq_len=256, seed=0):
    """-> (step, model, targets): step() runs one training step of the reference model on a fixed
    batch of Zipf-distributed tokens."""
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
    return step, model, tgt


def bench_step(head="full", loss_frac=1.0, train_embed=True, batch_size=8, seq_len=256, steps=5,
               warmup=2, seed=0, threads=None):
    """Time training steps of the reference model: one JSON-able dict."""
    set_threads(threads)
    step, model, tgt = make_step(head, loss_frac, train_embed, batch_size, seq_len, seed)
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
    peak = peak_rss_mb()
    return {
        "head": head, "loss_frac": loss_frac, "train_embed": train_embed,
        "batch_size": batch_size, "seq_len": seq_len, "workers": default_workers(),
        "step_s": round(dt, 4), "step_s_min": round(min(times), 4),
        "tokens_per_s": round(batch_size * seq_len / dt, 1),
        "shares": {k: round(v, 4) for k, v in shares.items()},
        "peak_rss_mb": round(peak, 1),
        "work": step_work(model, tgt, loss_frac, train_embed, default_workers()),
    }


def interleaved(rounds, batch_size=8, seq_len=256, threads=None):
    """Every configuration's step in one process, one step of each in turn, `rounds` times: on a
    loaded machine the steps of one round are seconds apart, so their ratios hold when the machine's
    speed drifts from minute to minute. -> {config: [seconds of each round's step]}."""
    set_threads(threads)
    steps = {name: make_step(c["head"], c["loss_frac"], c["train_embed"], batch_size, seq_len)[0]
             for name, c in CONFIGS.items()}
    for step in steps.values():                # warm up: buffers, numba's compiled loop
        step()
        step()
    times = {name: [] for name in steps}
    for k in range(rounds):
        print(f"bench: interleaved round {k + 1}/{rounds} ...", file=sys.stderr, flush=True)
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return times


def step_work(model, tgt, loss_frac, train_embed, cores):
    """{part: [FLOPs, bytes]} of one training step of bench_step (module docstring): the core's ops
    as tools/roofline.py counts them, the head, the embedding's backward, AdamW. The counted
    positions are drawn as a step draws them."""
    cfg, C, V = model.cfg, model.cfg.d_model, model.cfg.vocab_size
    B, T = tgt.shape
    rows = model.counted_rows(tgt.size, loss_frac, np.random.default_rng(0))
    work = {}
    skip = ("AdamW", "NorMuon", "embedding backward")               # counted below, as this step runs them
    for name, calls, _, flops, nbytes in ops(cfg, B, T, cores):
        if calls and not name.startswith(skip):
            work[f"core: {name}"] = [flops * calls, nbytes * calls]
    y = tgt.reshape(-1) if rows is None else tgt.reshape(-1)[rows]
    n, f = y.size, 4                                                  # rows in the loss, bytes per float
    k = 3 if train_embed else 2                                       # products per level: logits, dh (, dW)
    rw = (2 * n * C + (V * C if train_embed else 0)) * f              # h read, dh and dE written
    if cfg.head == "full":
        work["head"] = [2 * k * n * C * V, rw + V * C * f]             # + E read
    elif cfg.head == "hier":
        cm = model.class_map
        sizes = np.diff(cm.offsets)
        present = np.unique(cm.token_class[y])
        work["head"] = [2 * 3 * n * C * n_hier_classes(cfg) + 2 * k * C * sizes[cm.token_class[y]].sum(),
                        rw + sizes[present].sum() * C * f]             # + the present classes' rows of E
    else:
        W_head, tails, cm = head_weights(model.params, cfg, model.class_map)
        cl = cm.token_cluster[y]
        flops = 2 * k * n * C * W_head.shape[0] + 2 * n * C * cm.n_tails * (k == 2)   # dW of the cluster rows
        nbytes = rw + 2 * W_head.nbytes                               # the gather of W_head: read, write
        for i, (P, W) in enumerate(tails, start=1):
            r = int((cl == i).sum())
            flops += 2 * 3 * r * C * P.shape[0] + 2 * k * r * W.size    # z, dz -> dh, dP; logits, dz (, dW)
            nbytes += 2 * W.nbytes + (2 * P.nbytes if r else 0)        # the gather of W_i; P and dP
        work["head"] = [flops, nbytes]
    if train_embed:                                                   # the lookup's gradient, into dE
        work["embedding backward"] = [B * T * C, 4 * B * T * C * f]
    trained = sum(p.size for k_, p in model.params.items() if train_embed or k_ != "embed.w")
    work["AdamW update"] = [12 * trained, 7 * f * trained]           # read p, g, m, v; write p, m, v
    return {k: [float(fl), float(by)] for k, (fl, by) in work.items()}


def bound_s(work, gemm_gflops, bandwidth_gbs, cores):
    """The time the step's work needs: sum over the parts of max(FLOPs / rate, bytes / bandwidth),
    shared by `cores` cores (rate and bandwidth of one core)."""
    return sum(max(fl / (gemm_gflops * 1e9), by / (bandwidth_gbs * 1e9)) for fl, by in work.values()) / cores


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
    try:
        found = subprocess.run([python, "-c", "import torch"], capture_output=True).returncode == 0
    except OSError:                                # no such interpreter
        found = False
    if not found:
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
    ap.add_argument("--head", choices=["full", "hier", "adaptive"], help="one configuration only (default: all)")
    ap.add_argument("--loss-frac", type=number(float, "(0, 1]"), default=1.0,
                    help="fraction of positions in the loss (default 1.0)")
    ap.add_argument("--freeze-embed", action="store_true", help="no embedding gradient (default: trained)")
    ap.add_argument("--batch-size", type=number(int, "[1, inf)"), default=8, help="default 8")
    ap.add_argument("--seq-len", type=number(int, "[1, inf)"), default=256, help="default 256")
    ap.add_argument("--steps", type=number(int, "[1, inf)"), default=5, help="timed steps after 2 warm-up steps (default 5)")
    ap.add_argument("--threads", type=number(int, "[1, inf)"), default=None, help="batch shards (default: one per core)")
    ap.add_argument("--gemm-bound", action="store_true", help="only the full head against its 3 GEMMs")
    ap.add_argument("--peer", nargs="?", const=sys.executable, metavar="PYTHON",
                    help="also run the PyTorch peer (tools/torch_peer.py), with this python or, without "
                         "PYTHON, this one (pip install -e \".[peer]\")")
    ap.add_argument("--rounds", type=number(int, "[1, inf)"), default=None, help="with --peer: peer and ours in "
                    "turn, this many times (default 3); without: every configuration in turn, this many times "
                    "(default 1)")
    ap.add_argument("--interleave", type=number(int, "[0, inf)"), default=0, metavar="R",
                    help="also time one step of each configuration in turn, R times, in one process, and take "
                         "tok/s and the ratios from those (a loaded machine)")
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
    rounds = []
    for k in range(1 if a.peer else (a.rounds or 1)):              # every configuration in turn, each round
        print(f"bench: round {k + 1}: the machine (one core: GEMM rate, memory bandwidth) ...", file=sys.stderr,
              flush=True)
        with blas_threads(1):
            gemm, bw = machine()
        runs = {}
        for name, c in CONFIGS.items():
            args = ["--head", c["head"], "--loss-frac", str(c["loss_frac"])] + common
            if not c["train_embed"]:
                args.append("--freeze-embed")
            print(f"bench: round {k + 1}: {name} ...", file=sys.stderr, flush=True)
            r = runs[name] = _subprocess_json(args)
            bound = bound_s(r["work"], gemm, bw, r["workers"])
            r["bound_tokens_per_s"] = round(r["batch_size"] * r["seq_len"] / bound, 1)
        print(f"bench: round {k + 1}: full head vs its GEMMs ...", file=sys.stderr, flush=True)
        gemms = _subprocess_json(["--gemm-bound", "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len)])
        rounds.append({"gemm_gflops": round(gemm, 1), "bandwidth_gbs": round(bw, 1), "runs": runs,
                       "head_vs_gemms": gemms,
                       "ratios": {k_: round(runs[x]["tokens_per_s"] / runs[y]["tokens_per_s"], 3)
                                  for k_, (x, y) in RATIOS.items()}})
    if a.interleave:
        times = interleaved(a.interleave, a.batch_size, a.seq_len, a.threads)
        n = a.batch_size * a.seq_len
        ratios = {k: [times[y][i] / times[x][i] for i in range(a.interleave)] for k, (x, y) in RATIOS.items()}
        rounds.append({"interleaved": {name: [round(n / t, 1) for t in ts] for name, ts in times.items()},
                       "ratios": {k: round(_median(v), 3) for k, v in ratios.items()},
                       "ratios_by_round": {k: [round(x, 3) for x in v] for k, v in ratios.items()}})
    peer = None
    if a.peer:
        peer = peer_rounds(a.peer, common, a.batch_size, a.seq_len, a.rounds or 3)
    if a.json:
        print(json.dumps({"rounds": rounds, "peer_tokens_per_s": peer}))
    else:
        print(_table(rounds, peer=peer))


# the targets of the head laboratory (issue 16), as ratios of two configurations' tokens/s
RATIOS = {"adaptive / full": ("adaptive", "full"), "adaptive / full-25%": ("adaptive", "full-25%"),
          "hier / core": ("hier", "core")}
NAMES = ["embedding", "convmixer", "glu", "norms", "head forward", "head backward", "optimizer"]


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def _table(rounds, peer=None):
    """One configuration's run (a list of (name, run)), or the rounds of every configuration."""
    if isinstance(rounds[0], tuple):
        rounds = [{"runs": dict(rounds)}]
    inter = rounds[-1] if "interleaved" in rounds[-1] else None
    rounds = [r for r in rounds if "runs" in r]
    last = rounds[-1]
    lines = []
    if "gemm_gflops" in last:
        gemm = ", ".join(f"{r['gemm_gflops']:.0f}" for r in rounds)
        bw = ", ".join(f"{r['bandwidth_gbs']:.1f}" for r in rounds)
        lines.append(f"machine (one core, measured in each round): GEMM {gemm} GFLOP/s, memory {bw} GB/s")
    lines.append(f"{'config':<10} {'tok/s':>8} {'bound':>8} {'of bound':>8} {'step s':>7} {'mem MB':>7}  "
                 + "  ".join(f"{n:>8.8}" for n in NAMES) + "  other   head")
    for name in last["runs"]:
        rs = [r["runs"][name] for r in rounds]
        tps = _median(inter["interleaved"][name] if inter else [r["tokens_per_s"] for r in rs])
        r = last["runs"][name]
        sh = r["shares"]
        other = 1.0 - sum(sh.get(n, 0.0) for n in NAMES)
        head = sh.get("head forward", 0.0) + sh.get("head backward", 0.0)
        if "bound_tokens_per_s" in r:
            bound = _median([x["bound_tokens_per_s"] for x in rs])
            b = f"{bound:>8,.0f} {100 * tps / bound:>7.0f}%"
        else:
            b = f"{'':>8} {'':>8}"
        lines.append(f"{name:<10} {tps:>8,.0f} {b} {r['step_s']:>7.3f} {r['peak_rss_mb']:>7.0f}  "
                     + "  ".join(f"{100 * sh.get(n, 0.0):>7.1f}%" for n in NAMES)
                     + f"  {100 * other:>5.1f}%  {100 * head:>5.1f}%")
    if len(rounds) > 1:
        by = lambda name: ", ".join(f"{r['runs'][name]['tokens_per_s']:,.0f}" for r in rounds)
        lines.append("tok/s by round: " + "; ".join(f"{name} {by(name)}" for name in last["runs"]))
    if inter:
        by = lambda name: ", ".join(f"{x:,.0f}" for x in inter["interleaved"][name])
        lines.append("tok/s, one step of each in turn (interleaved): " + "; ".join(f"{name} {by(name)}"
                                                                                  for name in inter["interleaved"]))
        for k, xs in inter["ratios_by_round"].items():
            lines.append(f"{k:<20} {', '.join(f'{x:.2f}' for x in xs)} by interleaved round "
                         f"(median {_median(xs):.2f})")
    elif "ratios" in last:
        for k in RATIOS:
            xs = [r["ratios"][k] for r in rounds]
            lines.append(f"{k:<20} {', '.join(f'{x:.2f}' for x in xs)} by round (median {_median(xs):.2f})")
    for r in rounds:
        g = r.get("head_vs_gemms")
        if g:
            lines.append(f"full head alone {g['head_s']:.3f} s vs its 3 GEMMs {g['gemm_bound_s']:.3f} s "
                         f"({g['gemm_gflops']:.0f} GFLOP/s; {g['gemm_blas_threads_s']:.3f} s with BLAS threads, "
                         f"{g['gemm_sharded_s']:.3f} s split by rows): {100 * g['head_efficiency']:.0f}% of the bound")
    if peer:
        for name, p in peer.items():
            lines.append(f"{name:<5} PyTorch peer {', '.join(f'{x:,.0f}' for x in p['peer_tokens_per_s'])} tok/s | "
                         f"ours {', '.join(f'{x:,.0f}' for x in p['ours_tokens_per_s'])} tok/s | "
                         f"ours/peer by round {', '.join(f'{x:.2f}' for x in p['ratios'])} (median {p['median_ratio']:.2f}x)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
