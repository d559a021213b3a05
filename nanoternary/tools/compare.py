"""Equal wall clock: named variants of train.py raced on the same data for the same minutes.

    python -m nanoternary.tools.compare --minutes 10 ternary="" float="--no-ternary"
    python -m nanoternary.tools.compare --minutes 10 full="--head full" hier="--head hier" --peer
    python -m nanoternary.tools.compare --minutes 5 --out runs/rec r1="--n-recursions 1" r2="" \\
        r3="--n-recursions 3" -- --eval-interval 100             # after --: flags for every variant

Each NAME="FLAGS" is one run of train.py with those flags (any train.py flags) plus
`--time-budget MINUTES --max-steps 0 --seed SEED --out OUT/NAME --overwrite`, one after the other,
so each has the whole machine, from the same initialisation seed: variants that share an
architecture start from identical weights. --peer also trains the PyTorch peer with the reference
recipe (tools/torch_train_peer.py) for the same minutes on the same data.

The validation losses are exact NLLs (nats/token, never smoothed) on the same validation windows of
the same split, so they compare directly, whatever the head or the training loss. Written:
OUT/summary.json (one entry per variant name: val_loss, the last validation NLL; best_val_loss;
steps; tokens; minutes; flags; the curve), a table on stdout, and with matplotlib OUT/compare.png: validation loss against
minutes and against tokens for all variants. Every run keeps its own folder, with its report.md.

One run per variant: on a shared machine the same run can differ by a few hundredths of a nat from
one sitting to the next (the number of steps it gets in the minutes varies); differences smaller
than that are not findings. docs/experiments.md shows races and how sure each is.
"""
import json
import os
import shlex
import subprocess
import sys

from .. import runlog
from ..config import OneLineParser, number
from .bench import check_peer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "train.py")
PEER = "PyTorch peer"


def parse_variants(items):
    """["name=FLAGS", ...] -> {name: [flag, ...]}, in order; a ValueError names a malformed item."""
    variants = {}
    for item in items:
        name, eq, flags = item.partition("=")
        if not eq or not name or not all(c.isalnum() or c in "-_." for c in name):
            raise ValueError(f"variant {item!r}: write NAME=\"FLAGS\", NAME of letters, digits, - _ . "
                             f"(e.g. float=\"--no-ternary\", or base=\"\" for the defaults)")
        if name in variants or name == PEER:
            raise ValueError(f"variant name {name!r} is given twice")
        variants[name] = shlex.split(flags)
    if not variants:
        raise ValueError("no variants: give at least one NAME=\"FLAGS\" (e.g. base=\"\")")
    return variants


def run_variant(name, flags, args, common):
    out = os.path.join(args.out, name)
    cmd = ([sys.executable, TRAIN] + sum((["--data", d] for d in args.data or []), []) + common + flags
           + ["--time-budget", str(args.minutes), "--max-steps", "0", "--seed", str(args.seed), "--out", out,
              "--overwrite"])
    print(f"\n== {name}: $ {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
    res = subprocess.run(cmd)
    if res.returncode not in (0, 130, 143):
        print(f"compare: {name} failed (exit status {res.returncode}); its folder {out}/ says more",
              file=sys.stderr)
    path = os.path.join(out, "log.jsonl")
    return runlog.read(path) if os.path.exists(path) else []


def run_peer(args):
    out = os.path.join(args.out, "peer.jsonl")
    cmd = [args.peer, "-m", "nanoternary.tools.torch_train_peer", "--minutes", str(args.minutes), "--out", out,
           "--seed", str(args.seed)] + sum((["--data", d] for d in args.data or []), [])
    print(f"\n== {PEER}: $ {' '.join(cmd)}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT] + os.environ.get("PYTHONPATH", "").split(os.pathsep))}
    subprocess.run(cmd, check=True, env=env)
    return runlog.read(out)


def summarize(records, flags):
    vals = [r for r in records if r.get("val_loss") is not None]
    last = records[-1] if records else {}
    return {"val_loss": vals[-1]["val_loss"] if vals else None,
            "best_val_loss": min(r["val_loss"] for r in vals) if vals else None,
            "steps": last.get("step", 0), "tokens": last.get("tokens", 0),
            "minutes": round(last.get("elapsed", 0.0) / 60, 2), "evaluations": len(vals), "flags": flags,
            "curve": [(r["elapsed"], r["tokens"], r["val_loss"]) for r in vals]}


def plot(summary, path):
    """Validation loss against minutes and against tokens, one line per variant; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, s in summary.items():
        if s["curve"]:
            t, n, v = zip(*s["curve"])
            axes[0].plot([x / 60 for x in t], v, "o-", ms=3, label=name)
            axes[1].plot([x / 1e6 for x in n], v, "o-", ms=3, label=name)
    late = [v for s in summary.values() for (_, n, v) in s["curve"]       # leave out evaluations in a run's
            if n > 0.05 * max(m for _, m, _ in s["curve"])]                # first 5% (10.8 nats at step 1),
    if late:                                                               # which would flatten the rest
        pad = 0.05 * (max(late) - min(late) + 0.1)
        axes[0].set_ylim(min(late) - pad, max(late) + pad)
    axes[0].set_xlabel("minutes of wall clock")
    axes[1].set_xlabel("training tokens (millions)")
    axes[0].set_ylabel("validation NLL (nats/token)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def table(summary, minutes):
    lines = [f"equal wall clock, {minutes:g} minutes each:",
             f"  {'variant':<20} {'val NLL':>8} {'best':>8} {'steps':>7} {'tokens':>11}  flags"]
    for name, s in summary.items():
        v = "-" if s["val_loss"] is None else f"{s['val_loss']:.4f}"
        b = "-" if s["best_val_loss"] is None else f"{s['best_val_loss']:.4f}"
        lines.append(f"  {name:<20} {v:>8} {b:>8} {s['steps']:>7,} {s['tokens']:>11,}  {' '.join(s['flags'])}")
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    common = []
    if "--" in argv:
        i = argv.index("--")
        argv, common = argv[:i], argv[i + 1:]
    ap = OneLineParser(prog="python -m nanoternary.tools.compare", description=__doc__.split("\n\n")[0],
                                 epilog="Example: python -m nanoternary.tools.compare --minutes 10 "
                                        "ternary=\"\" float=\"--no-ternary\"")
    ap.add_argument("variants", nargs="*", metavar='NAME="FLAGS"', help="a variant: its name and its train.py flags")
    ap.add_argument("--minutes", type=number(float, "(0, inf)"), default=10.0, help="wall clock per variant (default 10)")
    ap.add_argument("--data", action="append", help="parquet/jsonl/txt globs (default: train.py's default data)")
    ap.add_argument("--out", default="runs/compare", help="folder for the runs (default runs/compare)")
    ap.add_argument("--seed", type=number(int, "[0, inf)"), default=0, help="the initialisation and batches of every variant (default 0)")
    ap.add_argument("--peer", nargs="?", const=sys.executable, metavar="PYTHON",
                    help="also train the PyTorch peer (tools/torch_train_peer.py), with this python or, "
                         "without PYTHON, this one (pip install -e \".[peer]\")")
    args = ap.parse_args(argv)
    if args.peer and "=" in args.peer and not os.path.exists(args.peer):   # `--peer full="..."`: a variant,
        args.variants.insert(0, args.peer)                                  # not an interpreter
        args.peer = sys.executable
    try:
        variants = parse_variants(args.variants)
        if not args.minutes > 0:
            raise ValueError(f"--minutes must be positive, got {args.minutes}")
    except ValueError as e:
        ap.error(str(e))
    if args.peer:
        check_peer(args.peer)
    os.makedirs(args.out, exist_ok=True)
    summary = {name: summarize(run_variant(name, flags, args, common), common + flags)
               for name, flags in variants.items()}
    if args.peer:
        summary[PEER] = summarize(run_peer(args), ["(the reference recipe: tools/torch_train_peer.py)"])
    with open(os.path.join(args.out, "summary.json"), "w") as f:           # name -> its figures
        json.dump({name: {**s, "budget_minutes": args.minutes, "seed": args.seed, "data": args.data}
                   for name, s in summary.items()}, f, indent=1)
    print("\n" + table(summary, args.minutes))
    png = plot(summary, os.path.join(args.out, "compare.png"))
    print(f"summary: {os.path.join(args.out, 'summary.json')}" + (f" | plot: {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
