"""Training over several processes: tokens/s of the step, and the time its Allreduce of the gradient
takes, for 1 process and for N processes on this machine; then, from those figures, where adding
machines stops paying on a 1 or 10 Gbit/s network.

    python -m nanoternary.tools.mpi_bench                     # 1 process x 2 threads, 2 x 1 (pip install -e ".[mpi]")
    python -m nanoternary.tools.mpi_bench --processes 1,2,4 --json

The step is train.py's: each process takes its part of the global batch (8 x 256 by default, random
token ids with GPT-2's rough frequencies), fast/step.py's forward and backward with the full head on
25% of the positions (train.py's default), one Allreduce of all gradients in one buffer
(fast/dist.py's GradBuffer), then the AdamW update of every parameter. Twice: with the tied
embedding trained (13.6M floats, 54 MB to sum) and frozen (its gradient is not computed, 0.7M floats).

The estimate: with P processes on P machines, each with the measured compute time t_c of its own
batch (one machine's whole step without the Allreduce), a ring Allreduce moves 2(P-1)/P of the
buffer in and out of every machine, so a step takes t_c + 2(P-1)/P * bytes / bandwidth, and the
global tokens/s is P * batch / that. Scaling stops paying where the Allreduce outgrows the compute.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from ..fast import step as fast
from ..fast.dist import GradBuffer, world
from ..fast.optim import FastAdamW
from ..fast.threads import set_threads
from ..model import Model, ModelConfig
from .bench import zipf_tokens


def worker(batch_size, seq_len, steps, threads, train_embed, loss_frac=0.25, seed=0):
    """In every process of the job: time `steps` training steps -> a dict (rank 0's is printed)."""
    comm = world()
    set_threads(threads)
    model = Model(ModelConfig(), seed=seed)
    opt = FastAdamW(model.params, lr=1e-3)
    rng = np.random.default_rng(seed)
    B, T = batch_size, seq_len
    b0, b1 = B * comm.rank // comm.size, B * (comm.rank + 1) // comm.size
    buf, times, reduce_times = None, [], []
    for i in range(steps + 2):                               # 2 warm-up steps
        idx, tgt = zipf_tokens(rng, (B, T)), zipf_tokens(rng, (B, T))
        t0 = time.perf_counter()
        rows = model.counted_rows(B * T, loss_frac, rng)
        mine = rows[(rows >= b0 * T) & (rows < b1 * T)] - b0 * T
        loss, grads = fast.part_loss_and_grads(model, idx[b0:b1], tgt[b0:b1], mine, rows.size,
                                               train_embed=train_embed)
        t1 = time.perf_counter()
        if comm.size > 1:
            buf = buf or GradBuffer(grads)
            grads, _ = buf.allreduce(comm, grads, [loss])
        t2 = time.perf_counter()
        opt.step(model.params, grads)
        comm.barrier()                                       # the step ends when every process is done
        if i >= 2:
            times.append(time.perf_counter() - t0)
            reduce_times.append(t2 - t1)
    n_floats = sum(g.size for g in grads.values())
    step = float(np.median(times))
    return {"processes": comm.size, "threads": threads, "train_embed": train_embed,
            "batch_size": B, "seq_len": T, "step_s": round(step, 4), "tokens_per_s": round(B * T / step, 1),
            "allreduce_ms": round(1e3 * float(np.median(reduce_times)), 2),
            "allreduce_floats": int(n_floats), "allreduce_mb": round(4 * n_floats / 1e6, 1)}


def launch(n, args, threads):
    cmd = [sys.executable, "-m", "nanoternary.tools.mpi_bench", "--worker", "--threads", str(threads),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
    if n > 1:
        mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        cmd = [mpiexec if os.path.exists(mpiexec) else "mpiexec", "-n", str(n)] + cmd
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def estimate(one_process, gbits=(1, 10), machines=(2, 4, 8, 16, 32, 64)):
    """tokens/s and efficiency for P machines from one machine's step (module docstring)."""
    rows = []
    for r in one_process:
        t_c, tokens = r["step_s"], r["batch_size"] * r["seq_len"]
        nbytes = 4 * r["allreduce_floats"]
        for g in gbits:
            for p in machines:
                t_ar = 2 * (p - 1) / p * nbytes / (g * 1e9 / 8)
                rows.append({"train_embed": r["train_embed"], "gbit_s": g, "machines": p,
                             "allreduce_s": round(t_ar, 3), "tokens_per_s": round(p * tokens / (t_c + t_ar)),
                             "efficiency": round(t_c / (t_c + t_ar), 2)})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", default="1,2", help="numbers of processes on this machine (default 1,2)")
    ap.add_argument("--batch-size", type=int, default=8, help="global batch (default 8)")
    ap.add_argument("--seq-len", type=int, default=256, help="default 256")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after 2 warm-up steps (default 5)")
    ap.add_argument("--json", action="store_true", help="one JSON object")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        for train_embed in (True, False):
            r = worker(a.batch_size, a.seq_len, a.steps, a.threads, train_embed)
            if world().rank == 0:
                print(json.dumps(r), flush=True)
        return
    cores = os.cpu_count() or 1
    runs = []
    for n in (int(x) for x in a.processes.split(",")):
        print(f"mpi_bench: {n} process(es) x {max(1, cores // n)} thread(s) ...", file=sys.stderr, flush=True)
        runs += launch(n, a, max(1, cores // n))
    est = estimate([r for r in runs if r["processes"] == 1])
    if a.json:
        print(json.dumps({"runs": runs, "estimate": est}))
        return
    print(f"{'processes':>9} {'threads':>7} {'embedding':>9} {'tok/s':>8} {'step s':>7} {'allreduce':>10} {'of step':>7}")
    for r in runs:
        print(f"{r['processes']:>9} {r['threads']:>7} {'trained' if r['train_embed'] else 'frozen':>9} "
              f"{r['tokens_per_s']:>8,.0f} {r['step_s']:>7.3f} {r['allreduce_ms']:>7.1f} ms "
              f"{100 * r['allreduce_ms'] / 1e3 / r['step_s']:>6.1f}%   ({r['allreduce_mb']} MB)")
    print("\nestimated for P machines, one process each with this machine's step:")
    for train_embed in (True, False):
        for g in (1, 10):
            sel = [e for e in est if e["train_embed"] == train_embed and e["gbit_s"] == g]
            print(f"  {g:>2} Gbit/s, embedding {'trained' if train_embed else 'frozen '}: " + "  ".join(
                f"P={e['machines']}: {e['tokens_per_s']:,} tok/s ({100 * e['efficiency']:.0f}%)" for e in sel))


if __name__ == "__main__":
    main()
