"""Training over several processes: tokens/s of the step, and the time its sum of the gradients
takes, for 1 process and for N processes on this machine, or for two "machines" joined by a shaped
link; then, from those figures, where adding machines stops paying on a 1 or 10 Gbit/s network.

    python -m nanoternary.tools.mpi_bench                     # 1 process x 2 threads, 2 x 1 (pip install -e ".[mpi]")
    python -m nanoternary.tools.mpi_bench --processes 1,2,4 --json
    python -m nanoternary.tools.mpi_bench --two-hosts         # as root: two namespaces, 10 and 1 Gbit/s

The step is train.py's (fast/dist.py's DataParallel): each process takes its part of the global batch
(8 x 256 by default, random token ids with GPT-2's rough frequencies), fast/step.py's forward and
backward with the full head on 25% of the positions (train.py's default), the gradients summed over
the processes, then the AdamW update of every parameter. With the tied embedding trained (13.6M
floats, 54 MB to sum) and frozen (its gradient is not computed, 0.7M floats).

--two-hosts builds two hosts (tools/twohosts.py: network namespaces joined by a veth pair, UCX held
to TCP), shapes the link with tc to each --rates, and runs, side by side in one sitting: each host
alone (one process of one thread, its half of the batch: the compute a machine brings), the two
hosts together as train.py ran before the overlap (--grad-wire full, the whole sum after the
backward), and with the head's dE summed during the backward in each --wires. It prints tokens/s
and the time the step waits for the sum next to the estimate below for P=2, and the bytes the veth
carried per step (proof that the traffic crossed it).

The estimate: with P processes on P machines, each with the measured compute time t_c of its own
batch (one machine's whole step without the sum), a ring Allreduce moves 2(P-1)/P of the buffer in
and out of every machine, so a step takes t_c + 2(P-1)/P * bytes / bandwidth, and the global
tokens/s is P * batch / that. Scaling stops paying where the sum outgrows the compute. With the
overlap, the head's dE (95% of the bytes) travels while the backward's last part runs, so a step
takes t_c + max(0, t_dE - t_overlap) + t_rest (docs/mpi.md compares both with the measurements).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from ..fast.dist import WIRES, DataParallel, world
from ..fast.optim import FastAdamW
from ..fast.threads import set_threads
from ..model import Model, ModelConfig
from .bench import zipf_tokens


def worker(batch_size, seq_len, steps, threads, train_embed, loss_frac=0.25, seed=0, wire="full", overlap=True):
    """In every process of the job: time `steps` training steps -> a dict (rank 0's is printed)."""
    comm = world()
    comm.watch(30)
    set_threads(threads)
    model = Model(ModelConfig(), seed=seed)
    opt = FastAdamW(model.params, lr=1e-3)
    dp = DataParallel(comm, wire, overlap)
    rng = np.random.default_rng(seed)
    B, T = batch_size, seq_len
    times, waits, overlaps = [], [], []
    for i in range(steps + 2):                               # 2 warm-up steps
        idx, tgt = zipf_tokens(rng, (B, T)), zipf_tokens(rng, (B, T))
        t0 = time.perf_counter()
        rows = model.counted_rows(B * T, loss_frac, rng)
        loss, grads = dp.loss_and_grads(model, [(idx, tgt, rows)], train_embed=train_embed)
        opt.step(model.params, grads)
        comm.barrier()                                       # the step ends when every process is done
        if i >= 2:
            times.append(time.perf_counter() - t0)
            waits.append(dp.timing.get("wait_s", 0.0))
            overlaps.append(dp.timing.get("overlap_s", 0.0))
    n_floats = sum(g.size for g in grads.values())
    step = float(np.median(times))
    return {"processes": comm.size, "threads": threads, "train_embed": train_embed, "wire": wire,
            "overlap": overlap and comm.size > 1, "batch_size": B, "seq_len": T, "steps": steps + 2,
            "step_s": round(step, 4), "tokens_per_s": round(B * T / step, 1),
            "allreduce_ms": round(1e3 * float(np.median(waits)), 2),
            "overlap_ms": round(1e3 * float(np.median(overlaps)), 2),
            "allreduce_floats": int(n_floats), "allreduce_mb": round(4 * n_floats / 1e6, 1)}


def worker_command(a, threads, batch_size, embed="both", wire="full", overlap=True):
    return [sys.executable, "-m", "nanoternary.tools.mpi_bench", "--worker", "--threads", str(threads),
            "--batch-size", str(batch_size), "--seq-len", str(a.seq_len), "--steps", str(a.steps),
            "--embed", embed, "--wires", wire] + ([] if overlap else ["--no-overlap"])


def parse(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def launch(n, args, threads):
    cmd = worker_command(args, threads, args.batch_size)
    if n > 1:
        mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        cmd = [mpiexec if os.path.exists(mpiexec) else "mpiexec", "-n", str(n)] + cmd
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return parse(res.stdout)


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


def two_hosts(a):
    """--two-hosts: each host alone, then both together, at each rate, one sitting (module docstring)."""
    from .twohosts import TwoHosts, why_not
    reason = why_not()
    if reason:
        raise SystemExit(f"error: --two-hosts cannot build two hosts here: {reason}")
    half = a.batch_size // 2
    configs = [("full", False)] + [(w, True) for w in a.wires.split(",")]
    results = []
    with TwoHosts() as hosts:
        for rate in a.rates.split(","):
            hosts.shape(None if rate == "none" else rate)
            for rnd in range(a.rounds):
                print(f"mpi_bench: link {rate}, round {rnd + 1}: each host alone ...", file=sys.stderr, flush=True)
                alone = [hosts.popen(hosts.on(h, worker_command(a, 1, half, "trained")), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for h in ("host1", "host2")]
                outs = [p.communicate() for p in alone]
                if any(p.returncode for p in alone):
                    raise RuntimeError("a host alone failed:\n" + "\n".join(e[-2000:] for _, e in outs))
                one = [parse(o)[0] for o, _ in outs]
                base = {**one[0], "step_s": float(np.mean([r["step_s"] for r in one])),
                        "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in one]))}
                results.append({"rate": rate, "round": rnd, "config": "alone", **base})
                for wire, overlap in configs:
                    name = f"{wire}{' +overlap' if overlap else ''}"
                    print(f"mpi_bench: link {rate}, round {rnd + 1}: two hosts, {name} ...", file=sys.stderr, flush=True)
                    before = hosts.link_bytes()
                    res = hosts.run(hosts.mpiexec(worker_command(a, 1, a.batch_size, "trained", wire, overlap)),
                                    timeout=1200)
                    if res.returncode != 0:
                        raise RuntimeError(f"two hosts, {name}, failed:\n{res.stderr[-3000:]}")
                    after = hosts.link_bytes()
                    r = parse(res.stdout)[0]
                    r.update(rate=rate, round=rnd, config=name, alone_tokens_per_s=base["tokens_per_s"],
                             alone_step_s=base["step_s"],
                             efficiency=round(r["tokens_per_s"] / (2 * base["tokens_per_s"]), 3),
                             link_mb_per_step=round((after[0] - before[0]) / r["steps"] / 1e6, 1))
                    r.update(model_two_hosts(r, base, rate))
                    results.append(r)
    return results


def model_two_hosts(r, base, rate):
    """The estimate for P=2 at this rate (None: the link as fast as the CPUs go), from the host's step
    alone: before (the whole sum after the step) and with the overlap (module docstring)."""
    if rate == "none":
        return {}
    bw = float(rate.replace("gbit", "")) * 1e9 / 8
    width = 2 if r["wire"] != "full" else 4
    total = width * r["allreduce_floats"]
    dE = width * 50257 * 256 if r["train_embed"] else 0
    t_all = total / bw                                       # 2(P-1)/P = 1 at P = 2
    t_c = base["step_s"]
    plain = t_c + t_all
    t = t_c + max(0.0, dE / bw - r["overlap_ms"] / 1e3) + (total - dE) / bw if r["overlap"] else plain
    tokens = r["batch_size"] * r["seq_len"]
    return {"estimate_tokens_per_s": round(tokens / t), "estimate_efficiency": round(t_c / t, 3),
            "estimate_wait_ms": round(1e3 * (t - t_c), 1)}


def print_two_hosts(results):
    print(f"{'link':>7} {'two hosts':>17} {'tok/s':>7} {'alone x2':>8} {'eff':>5} {'est eff':>7} {'wait ms':>7} "
          f"{'est ms':>6} {'overlap':>7} {'MB/step':>7}")
    for r in results:
        if r["config"] == "alone":
            continue
        print(f"{r['rate']:>7} {r['config']:>17} {r['tokens_per_s']:>7,.0f} {2 * r['alone_tokens_per_s']:>8,.0f} "
              f"{100 * r['efficiency']:>4.0f}% {100 * r.get('estimate_efficiency', 0):>6.0f}% "
              f"{r['allreduce_ms']:>7.0f} {r.get('estimate_wait_ms', 0):>6.0f} {r['overlap_ms']:>7.0f} "
              f"{r['link_mb_per_step']:>7.1f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", default="1,2", help="numbers of processes on this machine (default 1,2)")
    ap.add_argument("--batch-size", type=int, default=8, help="global batch (default 8)")
    ap.add_argument("--seq-len", type=int, default=256, help="default 256")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after 2 warm-up steps (default 5)")
    ap.add_argument("--two-hosts", action="store_true", help="two namespace hosts joined by a shaped link (root)")
    ap.add_argument("--rates", default="10gbit,1gbit", help="--two-hosts: link rates, tc's units, or none "
                                                           "(default 10gbit,1gbit)")
    ap.add_argument("--wires", default="full,bfloat16,float16",
                    help=f"--two-hosts: gradient wires with the overlap, of {', '.join(WIRES)} (default: all)")
    ap.add_argument("--rounds", type=int, default=1, help="--two-hosts: every measurement this many times")
    ap.add_argument("--json", action="store_true", help="one JSON object")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--embed", default="both", choices=("both", "trained", "frozen"), help=argparse.SUPPRESS)
    ap.add_argument("--no-overlap", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        for train_embed in {"both": (True, False), "trained": (True,), "frozen": (False,)}[a.embed]:
            r = worker(a.batch_size, a.seq_len, a.steps, a.threads, train_embed, wire=a.wires,
                       overlap=not a.no_overlap)
            if world().rank == 0:
                print(json.dumps(r), flush=True)
        return
    if a.two_hosts:
        results = two_hosts(a)
        if a.json:
            print(json.dumps({"two_hosts": results}))
        else:
            print_two_hosts(results)
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
