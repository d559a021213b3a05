"""The training step on every core: `Model.loss_and_grads`, fast. Same arguments, same results.

    from nanoternary.fast import step
    loss, grads = step.loss_and_grads(model, idx, targets, loss_frac=0.25)   # as model.loss_and_grads
    nll = step.nll(model, idx, targets)                                     # as model.nll
    step.loss_and_grads(model, idx, targets, comm=dist.world())             # under mpiexec: several processes

The model's own `forward` / `backward` run straight through in one thread. Here the same functions
(the embedding lookup, model.body_forward, model.body_backward) run in three parallel phases, one
thread per core (threads.py), with a head that never holds the (N, V) logits:

    1. the lookup and body_forward of each shard of the batch (a shard = B / cores sequences)
    2. the head over all N rows: the full head split by rows (fast/head.py, chunked, shift-free
       softmax), the hierarchical head split by classes (fast/hier_head.py), the adaptive head split
       by rows (fast/adaptive_head.py)
    3. body_backward of each shard; the shards' weight gradients add up (data parallelism), and the
       embedding's backward runs once over the whole batch, into the head's dE (the tied sum)

With `comm` (dist.py) of several processes, each takes its own sequences of the batch, and the
processes' losses and gradients are summed: the same numbers again, on several machines. The head's
dE (95% of the numbers) is final first, so it goes on the wire while step 3 runs; the lookup's
gradient, final last, goes with the core's as the rows of the batch's distinct tokens.
tests/test_fast.py proves it equal to the plain step, for every head and every training option.
"""
import numpy as np

from .. import model as M
from ..ops.adaptive_head import adaptive_weight_grads
from ..ops.embedding import embedding_forward
from .adaptive_head import adaptive_ce_fused, adaptive_nll_fused
from .head import DEFAULT_CHUNK, max_row_norm, nll_fused, softmax_ce_fused
from .hier_head import hier_ce_fused
from .profile import section
from .threads import add_into, default_workers, run_shards, split


def loss_and_grads(model, idx, targets, *, label_smoothing=0.0, z_loss=0.0, loss_frac=1.0, rng=None,
                   train_embed=True, workers=None, chunk=DEFAULT_CHUNK, comm=None, wire="full", overlap=True):
    """model.loss_and_grads(idx, targets, ...) on `workers` cores (default: threads.default_workers),
    and with `comm` (dist.world()) on every process of the job, the gradients crossing between them
    as `wire` says (dist.py). train_embed=False also skips the head's third GEMM (dE). overlap: the
    head's dE goes on the wire as soon as it is final, while the rest of the backward runs (False:
    everything after the backward, as before; for benchmarks)."""
    idx, targets = np.asarray(idx), np.asarray(targets)
    rows = model.counted_rows(targets.size, loss_frac, rng)          # of the whole batch
    opts = dict(label_smoothing=label_smoothing, z_loss=z_loss, train_embed=train_embed, workers=workers,
                chunk=chunk)
    if comm is None or comm.size == 1:
        return part_loss_and_grads(model, idx, targets, rows, None, **opts)
    B, T = targets.shape                                             # this process's sequences b0 .. b1-1
    b0, b1 = B * comm.rank // comm.size, B * (comm.rank + 1) // comm.size
    mine = None if rows is None else rows[(rows >= b0 * T) & (rows < b1 * T)] - b0 * T
    denom = targets.size if rows is None else rows.size
    if not (train_embed and overlap):
        loss, grads = part_loss_and_grads(model, idx[b0:b1], targets[b0:b1], mine, denom, **opts)
        return comm.sum_grads(loss, grads, wire)                     # one Allreduce
    loss, grads, dx = part_loss_and_grads(model, idx[b0:b1], targets[b0:b1], mine, denom, **opts,
                                          head_done=lambda g: comm.send_early(g["embed.w"], wire))
    tokens = np.unique(idx)                   # the lookup's gradient: the rows of the whole batch's tokens
    grads["embed.w"] = embedding_backward_sorted(dx, np.searchsorted(tokens, idx[b0:b1]),
                                                 np.zeros((tokens.size, dx.shape[-1]), dx.dtype))
    return comm.sum_grads(loss, grads, wire, tokens)                 # the rest, and dE's rows added


def part_loss_and_grads(model, idx, targets, rows, denom, *, label_smoothing=0.0, z_loss=0.0, train_embed=True,
                        workers=None, chunk=DEFAULT_CHUNK, head_done=None):
    """The step for a part of a larger batch (dist.py: one process's rows of the global batch):
    the loss summed over the counted positions `rows` of this part (None: all) divided by `denom`,
    the count of the whole batch, and its gradients. The parts' results add up to the whole's.
    head_done(grads_head), if given, is called as soon as the head's gradients are final (dist.py
    sends the head's dE while the backward goes on); the embedding's lookup gradient is then left
    to the caller: -> (loss, grads, dx), dx (B,T,C) the gradient at the lookup's output."""
    idx, targets = model.check_ids(idx), np.asarray(targets)
    B, T = targets.shape
    shards = split(B, workers or default_workers())
    p, cfg = model.params, model.cfg
    q = M.quantize(p, cfg)                                               # once for every shard

    # 1. forward, one shard of the batch per core
    def forward(b0, b1):
        with section("embedding"):
            x, _ = embedding_forward(idx[b0:b1], p["embed.w"])
        return M.body_forward(x, p, q, cfg)
    fwd = run_shards(forward, shards)
    h = np.concatenate([h_s for h_s, _ in fwd])                          # (N, C)
    # 2. the head over all N rows: the loss, dh, and the gradients of the head's weights
    loss, dh, grads_head = _head(model, h, targets.reshape(-1), rows, denom, label_smoothing, z_loss,
                                 train_embed, [(a * T, b * T) for a, b in shards], chunk)
    if head_done is not None:
        head_done(grads_head)

    # 3. backward, one shard per core
    def backward(i, b0, b1):
        return M.body_backward(dh[b0 * T:b1 * T], fwd[i][1], p, cfg)
    results = run_shards(backward, [(i, b0, b1) for i, (b0, b1) in enumerate(shards)])
    grads = results[0][1]
    with section("shard sum"):
        for _, grads_s in results[1:]:                  # data parallel: sum the shards
            for k in grads:
                grads[k] += grads_s[k]
    grads.update(grads_head)
    if train_embed:                                     # tied: the head's dE plus the lookup's
        dx = np.concatenate([dx_s for dx_s, _ in results])
        if head_done is not None:
            return float(loss), grads, dx
        with section("embedding"):
            embedding_backward_sorted(dx, idx, grads["embed.w"])
    return float(loss), grads


def embedding_backward_sorted(dx, idx, dE):
    # dx (B,T,C), idx (B,T) -> dE (V,C) += the rows of dx, each at its token's row
    """ops.embedding.embedding_backward, without np.add.at (one scattered add per row): the rows
    sorted by token, the rows of each token summed by one np.add.reduceat, then one add per
    distinct token, split between the cores (distinct tokens: disjoint rows of dE)."""
    flat, d = idx.reshape(-1), dx.reshape(-1, dx.shape[-1])
    order = np.argsort(flat, kind="stable")
    tokens = flat[order]
    starts = np.flatnonzero(np.concatenate(([True], tokens[1:] != tokens[:-1])))
    uniq = tokens[starts]
    bounds = np.concatenate((starts, [tokens.size]))

    def add(lo, hi):                                    # the distinct tokens lo .. hi-1
        sums = np.add.reduceat(d[order[bounds[lo]:bounds[hi]]], bounds[lo:hi] - bounds[lo], axis=0)
        dE[uniq[lo:hi]] += sums
    run_shards(add, split(uniq.size, default_workers()))
    return dE


def _head(model, h, targets, rows, denom, label_smoothing, z_loss, train_embed, pieces, chunk):
    # h (N,C), targets (N,) -> loss, dh (N,C), {"embed.w": dE, and the head's own weights' gradients}
    E = model.params["embed.w"]
    denom = denom or (h.shape[0] if rows is None else rows.size)
    if model.cfg.head == "adaptive":
        with section("head forward"):
            W_head, tails, cmap = M.head_weights(model.params, model.cfg, model.class_map)     # tied to E
        loss, dh, dW_head, dtails = adaptive_ce_fused(h, W_head, tails, cmap, targets, rows, label_smoothing,
                                                      z_loss, need_dW=train_embed, denom=denom,
                                                      workers=len(pieces), chunk=chunk)
        grads = {"head.cluster_w": dW_head[cmap.shortlist_size:],
                 **{f"head.proj{i}.w": dP for i, (dP, _) in enumerate(dtails, 1)}}
        if train_embed:                                 # the tie, reversed: dE from the shortlist and tails
            with section("head backward"):
                grads["embed.w"] = adaptive_weight_grads(dW_head, dtails, cmap, E.shape)[0]
        return loss, dh, grads
    if model.cfg.head == "hier":
        loss, dh, dE, dWc = hier_ce_fused(h, E, model.params["head.class_w"], model.class_map, targets, rows,
                                          label_smoothing, z_loss, need_dE=train_embed, denom=denom,
                                          workers=len(pieces))
        return loss, dh, {"head.class_w": dWc, **({"embed.w": dE} if train_embed else {})}

    e_norm = max_row_norm(E) if denom > model.cfg.d_model else None      # for the shift-free softmax

    def piece(a, b):                                    # the full head, split by rows
        r = None if rows is None else rows[(rows >= a) & (rows < b)] - a
        return softmax_ce_fused(h[a:b], E, targets[a:b], r, label_smoothing, z_loss, chunk,
                                need_dE=train_embed, denom=denom, e_norm=e_norm)
    parts = run_shards(piece, pieces)
    loss = sum(p[0] for p in parts)
    dh = np.concatenate([p[1] for p in parts])
    if not train_embed:
        return loss, dh, {}
    dE = parts[0][2]
    with section("shard sum"):
        for p in parts[1:]:
            add_into(dE, p[2])
    return loss, dh, {"embed.w": dE}


def nll(model, idx, targets, workers=None, chunk=DEFAULT_CHUNK):
    # idx, targets (B,T) -> (B,T) float64: model.nll, one shard per core, the full and adaptive heads chunked
    idx, targets = model.check_ids(idx), np.asarray(targets)
    if model.cfg.head == "adaptive":
        W_head, tails, cmap = M.head_weights(model.params, model.cfg, model.class_map)    # once, for every shard

    def shard(b0, b1):
        if model.cfg.head == "hier":            # the plain nll: no large logits to avoid
            return model.nll(idx[b0:b1], targets[b0:b1])
        h, y = model.hidden(idx[b0:b1]), targets[b0:b1].reshape(-1)
        if model.cfg.head == "adaptive":
            return adaptive_nll_fused(h, W_head, tails, cmap, y, chunk).reshape(b1 - b0, -1)
        return nll_fused(h, model.params["embed.w"], y, chunk).reshape(b1 - b0, -1)
    return np.concatenate(run_shards(shard, split(targets.shape[0], workers or default_workers())))


def loss(model, idx, targets, workers=None):
    """model.loss: mean NLL in nats per token, every position, no smoothing."""
    return float(nll(model, idx, targets, workers).mean())
