"""The ternary core against its roofline: every op of the training step, timed alone, against the
time its FLOPs and its memory traffic need at this machine's measured GEMM rate and memory
bandwidth (both measured in the same run, on one core).

    python -m nanoternary.tools.roofline                  # a markdown table (docs/roofline.md is one)
    python -m nanoternary.tools.roofline --json

The step runs one shard of the batch per core (fast/step.py), so each op of the core is timed at the
shape of one shard (batch 8 x 256 on 2 cores: 4 x 256 = 1,024 rows) with single-threaded BLAS, as
the step runs it, best of several calls; the ops that run once per step (the head, the embedding's
backward, the optimizers) at their own shape, on one core too. `calls` is how often a step runs it,
all shards together; `ms/step` = calls x time is its CPU time in one step, and the total over the
ops, divided by the cores, is about the step's wall time. The bound of an op is max(FLOPs / GEMM rate,
bytes / bandwidth): FLOPs count 2 per multiply-add of the products (and one per element for
elementwise work, which memory bounds anyway), bytes the arrays the op must read and write once.
`gap` = measured / bound: where the time goes beyond what the work needs.
"""
import argparse
import json
import time

import numpy as np

from ..fast.optim import FastAdamW
from ..fast.step import embedding_backward_sorted
from ..fast.threads import blas_threads, set_threads
from ..model import Model, ModelConfig, quantize
from ..optim import NorMuon, split_params
from ..ops.conv import conv1d_backward, conv1d_forward
from ..ops.embedding import embedding_forward
from ..ops.gates import relu2_glu_backward, relu2_glu_forward, sigmoid_gate_backward, sigmoid_gate_forward
from ..ops.norm import rmsnorm_backward, rmsnorm_forward
from ..ops.ternary import ternary_linear_backward, ternary_linear_forward


def best(fn, repeat=7, min_time=0.05):
    """Seconds per call: the best of `repeat` timings, each of as many calls as fill min_time."""
    fn()
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t0 >= min_time or n >= 1 << 12:
            break
        n *= 2
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n)
    return min(times)


def machine(size=1536):
    """(GEMM GFLOP/s, memory GB/s) of one core: a large float32 product, and a + b -> c on arrays
    far larger than the caches."""
    r = np.random.default_rng(0)
    A, B = r.standard_normal((size, size), dtype=np.float32), r.standard_normal((size, size), dtype=np.float32)
    out = np.empty_like(A)
    gemm = 2 * size ** 3 / best(lambda: np.matmul(A, B, out=out), repeat=5) / 1e9
    n = 1 << 24                                               # 64 MB per array
    a, b, c = np.ones(n, np.float32), np.ones(n, np.float32), np.empty(n, np.float32)
    bw = 3 * 4 * n / best(lambda: np.add(a, b, out=c), repeat=5) / 1e9
    return gemm, bw


def ops(cfg, batch_size, T, cores, dtype=np.float32):
    """[(name, calls per step, fn, flops, bytes)]: the core's ops at one shard's shape (B = the
    batch / cores sequences of T), and the once-a-step ops at theirs."""
    r = np.random.default_rng(1)
    C, H, G, K = cfg.d_model, cfg.glu_hidden, cfg.conv_groups, cfg.kernel_size
    B = batch_size // cores
    rows = B * T
    f = 4                                                     # bytes per float32
    model = Model(cfg, seed=0, dtype=dtype)
    q = quantize(model.params, cfg)
    x3 = r.standard_normal((B, T, C)).astype(dtype)
    nc = rows * C * f                                         # one (N, C) array, in bytes
    nh = rows * H * f
    g = model.params["block.norm_mix.g"]
    _, c_norm = rmsnorm_forward(x3, g)
    out = [("rmsnorm forward", 11, lambda: rmsnorm_forward(x3, g), 4 * rows * C, 3 * nc),
           ("rmsnorm backward", 11, lambda: rmsnorm_backward(x3, c_norm), 8 * rows * C, 4 * nc)]
    n_layers = len(cfg.dilations) * cfg.n_recursions
    for D in sorted(set(cfg.dilations)):
        w = model.params["block.mix.conv0.gate.w"]
        _, c_conv = conv1d_forward(x3, w, D, G)
        calls = 2 * cfg.n_recursions * list(cfg.dilations).count(D)     # gate and value
        flops = 2 * rows * C * (C // G) * K
        out += [(f"conv forward (D={D})", calls, lambda w=w, D=D: conv1d_forward(x3, w, D, G), flops, 3 * nc),
                (f"conv backward (D={D})", calls, lambda c=c_conv: conv1d_backward(x3, c), 2 * flops, 4 * nc)]
    _, c_sig = sigmoid_gate_forward(x3, x3)
    out += [("sigmoid gate forward", n_layers, lambda: sigmoid_gate_forward(x3, x3), 5 * rows * C, 4 * nc),
            ("sigmoid gate backward", n_layers, lambda: sigmoid_gate_backward(x3, c_sig), 6 * rows * C, 5 * nc)]
    for name, (I, O) in (("mix.out", (C, C)), ("glu.gate / glu.up", (C, H)), ("glu.down", (H, C))):
        key = {"mix.out": "block.mix.out.w", "glu.gate / glu.up": "block.glu.gate.w", "glu.down": "block.glu.down.w"}[name]
        wt, s = q[key]
        xi = r.standard_normal((rows, I)).astype(dtype)
        dy = r.standard_normal((rows, O)).astype(dtype)
        _, c_lin = ternary_linear_forward(xi, wt, s)
        calls = cfg.n_recursions * (2 if "/" in name else 1)
        flops = 2 * rows * I * O
        out += [(f"ternary {name} forward", calls, lambda xi=xi, wt=wt, s=s: ternary_linear_forward(xi, wt, s),
                 flops, (rows * I + I * O + rows * O) * f),
                (f"ternary {name} backward", calls, lambda dy=dy, c=c_lin: ternary_linear_backward(dy, c),
                 2 * flops, (2 * rows * O + 2 * rows * I + 2 * I * O) * f)]
    a = r.standard_normal((rows, H)).astype(dtype)
    _, c_glu = relu2_glu_forward(a, a)
    out += [("relu^2 glu forward", cfg.n_recursions, lambda: relu2_glu_forward(a, a), 3 * rows * H, 4 * nh),
            ("relu^2 glu backward", cfg.n_recursions, lambda: relu2_glu_backward(a, c_glu), 6 * rows * H, 5 * nh),
            ("residual adds (x + m, ...)", 8 * cfg.n_recursions, lambda: x3 + x3, rows * C, 3 * nc),
            ("quantize (4 matrices)", 1, lambda: quantize(model.params, cfg),
             3 * sum(model.params[k].size for k in q), 3 * f * sum(model.params[k].size for k in q))]
    idx = r.integers(0, cfg.vocab_size, (B, T))
    E = model.params["embed.w"]
    out.append(("embedding forward", 1, lambda: embedding_forward(idx, E), 0, 2 * nc))
    out = [(name, calls * cores, fn, flops, nbytes) for name, calls, fn, flops, nbytes in out]   # every shard
    # once a step, for the whole batch
    idx_all = r.integers(0, cfg.vocab_size, (batch_size, T))
    dx_all = r.standard_normal((batch_size, T, C)).astype(dtype)
    dE = np.zeros_like(E)
    out.append(("embedding backward (sorted, into 50257 x 256)", 1,
                lambda: embedding_backward_sorted(dx_all, idx_all, dE), cores * rows * C, cores * 4 * nc))
    grads = {k: r.standard_normal(v.shape).astype(dtype) for k, v in model.params.items()}
    muon_names, adam_names = split_params(model.params)
    params = {k: v.copy() for k, v in model.params.items()}
    adam = FastAdamW({k: params[k] for k in adam_names}, lr=1e-3)
    emb, rest = {"embed.w": grads["embed.w"]}, {k: grads[k] for k in adam_names if k != "embed.w"}
    muon = NorMuon({k: params[k] for k in muon_names})
    n_rest = sum(params[k].size for k in rest)
    ns_flops = sum(5 * 2 * min(params[k].shape) ** 2 * (2 * max(params[k].shape) + min(params[k].shape))
                   for k in muon_names)
    out += [("AdamW update, embedding (12.9M)", 1, lambda: adam.step(params, emb), 12 * E.size, 7 * E.nbytes),
            ("AdamW update, embedding, as without numba (NumPy pieces; not in the step)", 0,
             lambda: _numpy_adamw(adam, params, emb), 12 * E.size, 7 * E.nbytes),
            ("AdamW update, the rest", 1, lambda: adam.step(params, rest), 12 * n_rest, 7 * 4 * n_rest),
            ("NorMuon update (4 matrices, Newton-Schulz)", 1, lambda: muon.step(params, grads), ns_flops,
             8 * sum(params[k].nbytes for k in muon_names)),
            ("shard sum of the core's gradients", cores - 1,
             lambda: [np.add(grads[k], params[k], out=params[k].copy()) for k in muon_names + adam_names
                      if k != "embed.w"],
             n_rest + sum(params[k].size for k in muon_names), 3 * 4 * (n_rest + sum(params[k].size for k in muon_names)))]
    return out


def _numpy_adamw(adam, params, grads):
    """FastAdamW's step as it runs without numba: 13 NumPy passes over cache-sized pieces (for the
    before/after comparison; `calls` 0: not part of the step)."""
    from ..fast import optim as fast_optim
    loop, fast_optim._adamw_loop = fast_optim._adamw_loop, None
    try:
        adam.step(params, grads)
    finally:
        fast_optim._adamw_loop = loop


def table(cfg, batch_size, seq_len, cores):
    rows = batch_size * seq_len // cores
    lines = []
    set_threads(1)                                            # one core: one worker, BLAS at one thread
    with blas_threads(1):
        gemm, bw = machine()
        for name, calls, fn, flops, nbytes in ops(cfg, batch_size, seq_len, cores):
            t = best(fn)
            bound = max(flops / (gemm * 1e9), nbytes / (bw * 1e9))
            k = calls or 1                            # calls 0: a comparison, shown per call, not summed
            lines.append({"op": name, "calls": calls, "ms_per_call": 1e3 * t, "ms_per_step": 1e3 * t * calls,
                          "gflop": flops * k / 1e9, "mb": nbytes * k / 1e6,
                          "bound_ms": 1e3 * bound * k, "gap": t / bound if bound else float("inf")})
    set_threads(None)
    return {"gemm_gflops": gemm, "bandwidth_gbs": bw, "rows_per_shard": rows, "cores": cores, "ops": lines}


def markdown(res):
    out = [f"One core: GEMM {res['gemm_gflops']:.0f} GFLOP/s, memory {res['bandwidth_gbs']:.1f} GB/s; "
           f"one shard = {res['rows_per_shard']:,} rows, {res['cores']} shards.", "",
           "| op | calls | ms/call | ms/step | GFLOP | MB moved | bound ms | gap |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    tot = {"ms_per_step": 0.0, "gflop": 0.0, "mb": 0.0, "bound_ms": 0.0}
    for r in sorted(res["ops"], key=lambda r: -r["ms_per_step"]):
        out.append(f"| {r['op']} | {r['calls']} | {r['ms_per_call']:.3f} | {r['ms_per_step']:.1f} | "
                   f"{r['gflop']:.3f} | {r['mb']:.0f} | {r['bound_ms']:.1f} | {r['gap']:.1f}x |")
        for k in tot:
            tot[k] += r[k] if r["calls"] else 0.0
    out.append(f"| **the step without the head, CPU time** | | | **{tot['ms_per_step']:.1f}** | {tot['gflop']:.2f} | "
               f"{tot['mb']:.0f} | **{tot['bound_ms']:.1f}** | {tot['ms_per_step'] / tot['bound_ms']:.1f}x |")
    out.append(f"| ... per core (wall time, if the cores share it evenly) | | | {tot['ms_per_step'] / res['cores']:.1f} | "
               f"| | {tot['bound_ms'] / res['cores']:.1f} | |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=8, help="default 8")
    ap.add_argument("--seq-len", type=int, default=256, help="default 256")
    ap.add_argument("--cores", type=int, default=2, help="shards the batch is cut into (default 2)")
    ap.add_argument("--json", action="store_true", help="one JSON object")
    a = ap.parse_args(argv)
    res = table(ModelConfig(), a.batch_size, a.seq_len, a.cores)
    print(json.dumps(res) if a.json else markdown(res))


if __name__ == "__main__":
    main()
