"""Equal wall clock: the full and the hierarchical head, trained from the same initialisation on
the same data for the same time, and (optionally) the PyTorch peer with the reference recipe.

    python -m nanoternary.tools.compare_heads --minutes 20          # train.py's default data
    python -m nanoternary.tools.compare_heads --minutes 20 --peer   # and the PyTorch peer, same
                                                                    # budget, same data (.[peer])

Runs `train.py` once per head (one after the other, so each has the whole machine), in
OUT/full and OUT/hier, with the same seed: the core and the embedding start from identical weights
(the hier head's class vectors are drawn after them). Any other train.py flags after `--` are
passed to both runs. The two validation losses are exact NLLs (nats/token, no smoothing) on the
same validation windows, so they compare directly; the peer (tools/torch_train_peer.py) trains on
the same split and is evaluated on the same kind of windows.

Writes OUT/summary.json and, with matplotlib, OUT/val_loss_vs_time.png.
"""
import argparse
import json
import os
import subprocess
import sys

from .. import runlog
from .bench import check_peer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "train.py")


def val_curve(records):
    return [(r["elapsed"], r["val_loss"]) for r in records if r.get("val_loss") is not None]


def run_ours(head, args, extra):
    out = os.path.join(args.out, head)
    cmd = [sys.executable, TRAIN, "--head", head, "--time-budget", str(args.minutes), "--max-steps", "0",
           "--out", out, "--overwrite", "--seed", str(args.seed)] + sum((["--data", d] for d in args.data or []), []) + extra
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return val_curve(runlog.read(os.path.join(out, "log.jsonl")))


def run_peer(args):
    out = os.path.join(args.out, "peer.jsonl")
    cmd = [args.peer, "-m", "nanoternary.tools.torch_train_peer", "--minutes", str(args.minutes), "--out", out,
           "--seed", str(args.seed)] + sum((["--data", d] for d in args.data or []), [])
    print("$ " + " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT] + os.environ.get("PYTHONPATH", "").split(os.pathsep))}
    subprocess.run(cmd, check=True, env=env)
    return val_curve(runlog.read(out))


def plot(curves, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, pts in curves.items():
        if pts:
            t, v = zip(*pts)
            ax.plot([x / 60 for x in t], v, "o-", ms=3, label=name)
    ax.set_xlabel("minutes of wall clock")
    ax.set_ylabel("validation NLL (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description="Full vs hierarchical head at equal wall clock.")
    ap.add_argument("--data", action="append", help="parquet/jsonl/txt globs (default: train.py's default data)")
    ap.add_argument("--minutes", type=float, default=20.0, help="wall-clock budget per run (default 20)")
    ap.add_argument("--out", default="runs/compare_heads", help="folder for the runs (default runs/compare_heads)")
    ap.add_argument("--seed", type=int, default=0, help="default 0")
    ap.add_argument("--heads", default="full,hier", help="which runs, in order (default full,hier)")
    ap.add_argument("--peer", nargs="?", const=sys.executable, metavar="PYTHON",
                    help="also train the PyTorch peer (tools/torch_train_peer.py), with this python or, "
                         "without PYTHON, this one (pip install -e \".[peer]\")")
    args = ap.parse_args(argv)
    if args.peer:
        check_peer(args.peer)
    os.makedirs(args.out, exist_ok=True)
    curves = {}
    for head in args.heads.split(","):
        curves[f"nanoternary, {head} head"] = run_ours(head, args, extra)
    if args.peer:
        curves["PyTorch peer (reference recipe)"] = run_peer(args)
    summary = {name: {"final_val_loss": pts[-1][1] if pts else None,
                      "best_val_loss": min(v for _, v in pts) if pts else None,
                      "evaluations": len(pts)} for name, pts in curves.items()}
    summary["minutes"] = args.minutes
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    png = plot(curves, os.path.join(args.out, "val_loss_vs_time.png"))
    print(f"\nequal wall clock, {args.minutes:g} minutes each:")
    for name, s in summary.items():
        if isinstance(s, dict):
            if s["final_val_loss"] is None:
                print(f"  {name:<36} no validation loss logged")
            else:
                print(f"  {name:<36} final val loss {s['final_val_loss']:.4f}   best {s['best_val_loss']:.4f}")
    if png:
        print(f"plot: {png}")


if __name__ == "__main__":
    main()
