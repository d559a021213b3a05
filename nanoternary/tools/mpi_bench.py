"""Training over several processes: tokens/s of the step, and the time its sum of the gradients
takes, for 1 process and for N processes on this machine, or for two "machines" joined by a shaped
link; then, from those figures, where adding machines stops paying on a 1 or 10 Gbit/s network.

    python -m nanoternary.tools.mpi_bench                     # 1 process x 2 threads, 2 x 1 (pip install -e ".[mpi]")
    python -m nanoternary.tools.mpi_bench --processes 1,2,4 --json
    python -m nanoternary.tools.mpi_bench --two-hosts         # as root: two namespaces, 10 and 1 Gbit/s

The step is train.py's (fast/step.py's loss_and_grads with comm): each process takes its part of the
global batch (8 x 256 by default, random token ids with GPT-2's rough frequencies), the forward and
backward with the full head on 25% of the positions (train.py's default), the gradients summed over
the processes, then the AdamW update of every parameter. With the tied embedding trained (13.6M
floats, 54 MB to sum) and frozen (its gradient is not computed, 0.7M floats).

--two-hosts builds two hosts (tools/twohosts.py: network namespaces joined by a veth pair, UCX held
to TCP), shapes the link with tc to each --rates, and runs, side by side in one sitting: each host
alone (one process of one thread, its half of the batch: the compute a machine brings), the two
hosts together as train.py ran before the overlap (--grad-wire full, the whole sum after the
backward), and with the head's dE summed during the backward, for each wire (--configs). It prints
tokens/s and the time the step waits for the sum next to the estimate below for P=2, and the bytes the veth
carried per step (proof that the traffic crossed it).

The estimate (docs/mpi.md compares it with the measurements): with P processes on P machines, each
with the measured compute time t_c of its own batch (one machine's whole step without the sum), a
ring Allreduce moves 2(P-1)/P of the buffer in and out of every machine at the TCP rate of the link
(GOODPUT of its rate), so a step takes t_c + 2(P-1)/P * bytes / bandwidth, and the global tokens/s
is P * batch / that. With the overlap, the head's dE (95% of the bytes) travels while the
backward's last part runs (t_ov), so a step takes t_c + max(0, t_dE - t_ov) + t_rest; with the
bfloat16 wire the bytes halve and the conversions (measured) add. Scaling stops paying where the
sum outgrows the compute.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from ..fast import step as fast
from ..fast.dist import WIRES, from_bfloat16, to_bfloat16, world
from ..fast.optim import FastAdamW
from ..fast.threads import set_threads
from ..model import Model, ModelConfig
from .bench import zipf_tokens


def convert_cost(n, repeat=3):
    """Seconds the bfloat16 ring's conversions of n numbers take here: one encoding and about 1.5
    decodings per number (P=2: encode the half sent and the half summed, decode the half received
    for the sum, the half summed and the half that comes back). The best of `repeat`."""
    x, best = np.ones(n, dtype=np.float32), float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        h = to_bfloat16(x)
        t1 = time.perf_counter()
        from_bfloat16(h)
        best = min(best, (t1 - t0) + 1.5 * (time.perf_counter() - t1))
    return best


def worker(batch_size, seq_len, steps, threads, train_embed, loss_frac=0.25, seed=0, wire="full", overlap=True):
    """In every process of the job: time `steps` training steps -> a dict (rank 0's is printed)."""
    comm = world()
    comm.watch(30)
    set_threads(threads)
    model = Model(ModelConfig(), seed=seed)
    opt = FastAdamW(model.params, lr=1e-3)
    rng = np.random.default_rng(seed)
    B, T = batch_size, seq_len
    times, waits, overlaps = [], [], []
    for i in range(steps + 2):                               # 2 warm-up steps
        idx, tgt = zipf_tokens(rng, (B, T)), zipf_tokens(rng, (B, T))
        t0 = time.perf_counter()
        loss, grads = fast.loss_and_grads(model, idx, tgt, loss_frac=loss_frac, rng=rng, train_embed=train_embed,
                                          comm=comm, wire=wire, overlap=overlap)
        opt.step(model.params, grads)
        comm.barrier()                                       # the step ends when every process is done
        if i >= 2:
            times.append(time.perf_counter() - t0)
            waits.append(getattr(comm, "timing", {}).get("wait_s", 0.0))
            overlaps.append(getattr(comm, "timing", {}).get("overlap_s", 0.0))
    n_floats = sum(g.size for g in grads.values())
    step = float(np.median(times))
    convert = convert_cost(n_floats)
    return {"processes": comm.size, "threads": threads, "train_embed": train_embed, "wire": wire,
            "embed_floats": int(model.params["embed.w"].size), "d_model": model.cfg.d_model,
            "bf16_convert_ms": round(1e3 * convert, 1),
            "overlap": overlap and comm.size > 1, "batch_size": B, "seq_len": T, "steps": steps + 2,
            "step_s": round(step, 4), "tokens_per_s": round(B * T / step, 1),
            "allreduce_ms": round(1e3 * float(np.median(waits)), 2),
            "overlap_ms": round(1e3 * float(np.median(overlaps)), 2),
            "allreduce_floats": int(n_floats), "allreduce_mb": round(4 * n_floats / 1e6, 1)}


def interleaved(batch_size, seq_len, rounds, configs, loss_frac=0.25, seed=0):
    """In each process of a job on two hosts, one thread each: rounds of steps that take turns,
    "alone" (each host its half of the batch, nothing summed: the compute a host brings) before each
    configuration (a wire, + for the overlap). Turns of a step each, so that a ratio compares steps
    taken seconds apart (the machine is shared). -> {config: [(step s, alone step s just before,
    wait s, overlap s)]}."""
    comm = world()
    comm.watch(30)
    set_threads(1)
    model = Model(ModelConfig(), seed=seed)
    opt = FastAdamW(model.params, lr=1e-3)
    B, T = batch_size, seq_len
    b0, b1 = B * comm.rank // comm.size, B * (comm.rank + 1) // comm.size
    rng = np.random.default_rng(seed)
    out = {c: [] for c in configs}

    def one_step(config):
        idx, tgt = zipf_tokens(rng, (B, T)), zipf_tokens(rng, (B, T))
        t0 = time.perf_counter()
        comm.timing = {}
        if config is None:    # a host alone with its sequences (the ranks' weights part ways: no matter for time)
            _, grads = fast.loss_and_grads(model, idx[b0:b1], tgt[b0:b1], loss_frac=loss_frac, rng=rng)
        else:
            _, grads = fast.loss_and_grads(model, idx, tgt, loss_frac=loss_frac, rng=rng, comm=comm,
                                           wire=config.rstrip("+"), overlap=config.endswith("+"))
        opt.step(model.params, grads)
        comm.barrier()                                     # the step ends when every process is done
        t = comm.timing
        return time.perf_counter() - t0, t.get("wait_s", 0.0), t.get("overlap_s", 0.0), t.get("dE_wait_s", 0.0)

    for _ in range(2):                                     # warm-up: buffers, thread pools, connections
        for c in configs:
            one_step(None)
            one_step(c)
    for _ in range(rounds):
        for c in configs:
            t_alone = one_step(None)[0]
            t, wait, overlap, dE_wait = one_step(c)
            out[c].append((t, t_alone, wait, overlap, dE_wait))
    n_floats = sum(v.size for v in model.params.values())
    convert = convert_cost(n_floats)
    return {"batch_size": B, "seq_len": T, "floats": int(n_floats), "embed_floats": int(model.params["embed.w"].size),
            "bf16_convert_ms": round(1e3 * convert, 1), "steps": out}


def worker_command(a, threads, batch_size, embed="both", wire="full", overlap=True):
    return [sys.executable, "-m", "nanoternary.tools.mpi_bench", "--worker", "--threads", str(threads),
            "--batch-size", str(batch_size), "--seq-len", str(a.seq_len), "--steps", str(a.steps),
            "--embed", embed, "--wire", wire] + ([] if overlap else ["--no-overlap"])


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


GOODPUT = 0.9      # of a link's rate, what TCP carried through the tc-shaped veth (docs/mpi.md)


def wait_model(way, p, gbit, n, n_dE, n_rest, t_ov, convert_s):
    """Seconds a step waits for the sums beyond its compute, on P machines joined at `gbit` Gbit/s:
    n numbers in all, n_dE of them the head's dE, n_rest summed after the backward when dE went
    during it (t_ov seconds of backward beside it); convert_s: the bfloat16 conversions."""
    bw, ring = GOODPUT * gbit * 1e9 / 8, 2 * (p - 1) / p
    if way == "before":
        return ring * 4 * n / bw
    width = 2 if way == "overlap+bfloat16" else 4
    return (max(0.0, ring * width * n_dE / bw - t_ov) + ring * width * n_rest / bw
            + (convert_s if width == 2 else 0.0))


def estimate(runs, gbits=(1, 10), machines=(2, 4, 8, 16, 32, 64)):
    """tokens/s and efficiency for P machines, each with the measured step of one process (t_c),
    three ways: before (every gradient summed after the backward), with the overlap (the head's dE
    during the backward, the window measured in the run of several processes, else a third of the
    step), and with the overlap and the bfloat16 wire (half the bytes, plus its conversions). A ring
    moves 2(P-1)/P of the bytes in and out of every machine; the lookup's rows are counted at one per
    token of the batch (an upper bound)."""
    one = {r["train_embed"]: r for r in runs if r["processes"] == 1}
    several = {r["train_embed"]: r for r in runs if r["processes"] > 1}
    rows = []
    for embed, r in one.items():
        t_c, tokens, n = r["step_s"], r["batch_size"] * r["seq_len"], r["allreduce_floats"]
        n_dE = r["embed_floats"] if embed else 0
        n_rest = n - n_dE + (tokens * r["d_model"] if embed else 0)
        s = several.get(embed)
        t_ov = t_c * (s["overlap_ms"] / 1e3 / s["step_s"] if s and s["overlap_ms"] else 1 / 3)
        for g in gbits:
            for p in machines:
                for way in ("before", "overlap", "overlap+bfloat16") if embed else ("before",):
                    t_ar = wait_model(way, p, g, n, n_dE, n_rest, t_ov, r["bf16_convert_ms"] / 1e3)
                    rows.append({"train_embed": embed, "gbit_s": g, "machines": p, "way": way,
                                 "t_c": t_c, "wait_s": round(t_ar, 3),
                                 "tokens_per_s": round(p * tokens / (t_c + t_ar)),
                                 "efficiency": round(t_c / (t_c + t_ar), 2)})
    return rows


def two_hosts(a):
    """--two-hosts: at each rate, one job on the two hosts taking turns (interleaved) -> rows."""
    from .twohosts import TwoHosts, why_not
    reason = why_not()
    if reason:
        raise SystemExit(f"error: --two-hosts cannot build two hosts here: {reason}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="mpi_bench-") as base, TwoHosts(base) as hosts:
        for rate in a.rates.split(","):
            hosts.shape(None if rate == "none" else rate)
            print(f"mpi_bench: two hosts, link {rate}: {a.rounds} rounds of {a.configs} ...", file=sys.stderr,
                  flush=True)
            cmd = [sys.executable, "-m", "nanoternary.tools.mpi_bench", "--interleaved", "--batch-size",
                   str(a.batch_size), "--seq-len", str(a.seq_len), "--rounds", str(a.rounds), "--configs", a.configs]
            before = hosts.link_bytes()
            res = hosts.run(hosts.mpiexec(cmd), timeout=3600)
            after = hosts.link_bytes()
            if res.returncode != 0:
                raise RuntimeError(f"two hosts, link {rate}, failed:\n{res.stderr[-3000:]}")
            got = parse(res.stdout)[0]
            tokens = got["batch_size"] * got["seq_len"]
            for config, steps in got["steps"].items():
                t, t_alone, wait, overlap, dE_wait = (np.array(x) for x in zip(*steps))
                r = {"rate": rate, "config": config, "rounds": len(steps), "wire": config.rstrip("+"),
                     "overlap": config.endswith("+"), "batch_size": got["batch_size"], "seq_len": got["seq_len"],
                     "allreduce_floats": got["floats"], "embed_floats": got["embed_floats"],
                     "step_s": float(np.median(t)), "alone_step_s": float(np.median(t_alone)),
                     "tokens_per_s": float(tokens / np.median(t)),
                     "alone_tokens_per_s": float(tokens / 2 / np.median(t_alone)),
                     "efficiency": float(np.median(t_alone / t)),     # (B/t) / (2 * (B/2) / t_alone), step by step
                     "allreduce_ms": float(1e3 * np.median(wait)), "overlap_ms": float(1e3 * np.median(overlap)),
                     "dE_wait_ms": float(1e3 * np.median(dE_wait))}
                r.update(model_two_hosts(r, r["alone_step_s"], rate, got["bf16_convert_ms"] / 1e3))
                rows.append(r)
            n_steps = sum(len(v) for v in got["steps"].values()) * 2 + 4 * len(got["steps"])
            rows.append({"rate": rate, "config": "link", "mb_sent": (after[0] - before[0]) / 1e6,
                         "mb_received": (after[1] - before[1]) / 1e6, "steps": n_steps})
    return rows


def model_two_hosts(r, t_c, rate, convert_s):
    """The estimate for P=2 at this rate (estimate(), wait_model()), from a host's step alone t_c and
    the overlap window measured in the same run. Nothing for an unshaped link."""
    if rate == "none":
        return {}
    tokens = r["batch_size"] * r["seq_len"]
    n, n_dE = r["allreduce_floats"], r["embed_floats"]
    way = "before" if not r["overlap"] else "overlap+bfloat16" if r["wire"] == "bfloat16" else "overlap"
    if way == "before" and r["wire"] == "bfloat16":          # the 16-bit wire alone: half the bytes, converted
        t = wait_model("overlap+bfloat16", 2, float(rate.replace("gbit", "")), n, n_dE, n - n_dE + tokens * 256,
                       0.0, convert_s)
    else:
        t = wait_model(way, 2, float(rate.replace("gbit", "")), n, n_dE, n - n_dE + tokens * 256,
                       r["overlap_ms"] / 1e3, convert_s)
    return {"estimate_tokens_per_s": round(tokens / (t_c + t)), "estimate_efficiency": t_c / (t_c + t),
            "estimate_wait_ms": 1e3 * t}


def print_two_hosts(rows):
    print(f"{'link':>7} {'two hosts':>10} {'tok/s':>7} {'alone x2':>8} {'eff':>5} {'est':>5} {'wait ms':>7} "
          f"{'est ms':>6} {'overlap ms':>10}")
    for r in rows:
        if r["config"] == "link":
            print(f"{r['rate']:>7} the veth carried {r['mb_sent']:,.0f} MB out of host1 and {r['mb_received']:,.0f} MB "
                  f"into it in {r['steps']} steps, {r['steps'] // 2} of them summing gradients")
            continue
        print(f"{r['rate']:>7} {r['config']:>10} {r['tokens_per_s']:>7,.0f} {2 * r['alone_tokens_per_s']:>8,.0f} "
              f"{100 * r['efficiency']:>4.0f}% {100 * r.get('estimate_efficiency', 0):>4.0f}% "
              f"{r['allreduce_ms']:>7.0f} {r.get('estimate_wait_ms', 0):>6.0f} {r['overlap_ms']:>10.0f}")
    print("(medians over the rounds; alone x2: twice the tokens/s of a host alone, in steps taken between "
          "the others; eff: two hosts / alone x2, step by step; est: docs/mpi.md's estimate; wait: the step's "
          "wait for the sums after its backward; overlap: the backward that ran with dE on the wire; "
          "+: with the overlap)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", default="1,2", help="numbers of processes on this machine (default 1,2)")
    ap.add_argument("--batch-size", type=int, default=8, help="global batch (default 8)")
    ap.add_argument("--seq-len", type=int, default=256, help="default 256")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after 2 warm-up steps (default 5)")
    ap.add_argument("--two-hosts", action="store_true", help="two namespace hosts joined by a shaped link (root)")
    ap.add_argument("--rates", default="10gbit,1gbit", help="--two-hosts: link rates, tc's units, or none "
                                                           "(default 10gbit,1gbit)")
    ap.add_argument("--configs", default="full,full+,bfloat16,bfloat16+",
                    help=f"--two-hosts: the steps to run, each a wire ({', '.join(WIRES)}), + for the overlap "
                         f"(default: full,full+,bfloat16,bfloat16+; 'full' is the step before the overlap)")
    ap.add_argument("--wire", default="full", choices=WIRES, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=8, help="--two-hosts: steps of each configuration (default 8)")
    ap.add_argument("--json", action="store_true", help="one JSON object")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--interleaved", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--embed", default="both", choices=("both", "trained", "frozen"), help=argparse.SUPPRESS)
    ap.add_argument("--no-overlap", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        for train_embed in {"both": (True, False), "trained": (True,), "frozen": (False,)}[a.embed]:
            r = worker(a.batch_size, a.seq_len, a.steps, a.threads, train_embed, wire=a.wire,
                       overlap=not a.no_overlap)
            if world().rank == 0:
                print(json.dumps(r), flush=True)
        return
    if a.interleaved:
        r = interleaved(a.batch_size, a.seq_len, a.rounds, a.configs.split(","))
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
    est = estimate(runs)
    if a.json:
        print(json.dumps({"runs": runs, "estimate": est}))
        return
    print(f"{'processes':>9} {'threads':>7} {'embedding':>9} {'tok/s':>8} {'step s':>7} {'wait':>10} {'of step':>7}")
    for r in runs:
        print(f"{r['processes']:>9} {r['threads']:>7} {'trained' if r['train_embed'] else 'frozen':>9} "
              f"{r['tokens_per_s']:>8,.0f} {r['step_s']:>7.3f} {r['allreduce_ms']:>7.1f} ms "
              f"{100 * r['allreduce_ms'] / 1e3 / r['step_s']:>6.1f}%   ({r['allreduce_mb']} MB)")
    print(f"\nestimated for P machines, one process each with this machine's step, a link's TCP at "
          f"{100 * GOODPUT:.0f}% of its rate:")
    for train_embed in (True, False):
        for g in (1, 10):
            for way in ("before", "overlap", "overlap+bfloat16"):
                sel = [e for e in est if (e["train_embed"], e["gbit_s"], e["way"]) == (train_embed, g, way)]
                if sel:
                    print(f"  {g:>2} Gbit/s, embedding {'trained' if train_embed else 'frozen '}, {way:<16}: " +
                          "  ".join(f"P={e['machines']}: {e['tokens_per_s']:,} tok/s ({100 * e['efficiency']:.0f}%)"
                                    for e in sel))


if __name__ == "__main__":
    main()
