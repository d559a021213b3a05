"""The hierarchical head, fused and split between the cores: the same loss and gradients as
ops/hier_head.py's plain pair (hier_ce_forward / hier_ce_backward).

The plain pair runs the class level, then one token-level softmax per class present in the batch.
Here the token level's classes are split between threads (each class's rows and tokens belong to one
thread, so the threads write disjoint rows of dh and dE), and each level's softmax and gradient are
computed in place in its logits buffer (`_level_grad`) instead of as separate arrays.
"""
import numpy as np

from .profile import section
from .threads import run_shards


def _softmax_rows(L):
    # L (n,m) logits -> (p, lse): softmax in place in L, log-sum-exp per row (float64)
    m = L.max(axis=1)
    L -= m[:, None]
    np.exp(L, out=L)
    s = L.sum(axis=1)
    L /= s[:, None]
    return L, m.astype(np.float64) + np.log(s.astype(np.float64))


def _level_grad(L, pick, eps, z, scale):
    # L (n,m) logits -> loss per row, and L overwritten with dloss/dlogits * scale
    n, m = L.shape
    ar = np.arange(n)
    ly = L[ar, pick].astype(np.float64)
    mean_l = L.mean(axis=1, dtype=np.float64) if eps else 0.0
    p, lse = _softmax_rows(L)
    loss = (1.0 - eps) * (lse - ly) + eps * (lse - mean_l) + z * lse * lse
    p *= ((1.0 + 2.0 * z * lse) * scale).astype(p.dtype)[:, None]
    p[ar, pick] -= (1.0 - eps) * scale
    if eps:
        p -= eps * scale / m
    return loss, p


def hier_ce_fused(h, E, Wc, cmap, targets, rows=None, label_smoothing=0.0, z_loss=0.0, need_dE=True,
                  denom=None, workers=1):
    # h (N,C), E (V,C), Wc (n_classes,C), targets (N,) -> loss, dh (N,C), dE (V,C) or None, dWc
    """Mean loss over the counted rows and its gradients, in one pass (module docstring).

    `denom`: the mean's denominator, as in head.softmax_ce_fused. `workers`: the token level is
    split by classes between that many threads (threads.run_shards); each class's rows and tokens
    belong to it alone, so the workers write disjoint rows of dh and dE."""
    eps, z = float(label_smoothing), float(z_loss)
    hs, ys = (h, targets) if rows is None else (h[rows], targets[rows])
    scale = 1.0 / (denom if denom is not None else max(hs.shape[0], 1))
    cls = cmap.token_class[ys]
    # class level: one small softmax over n_classes for every row
    with section("head forward"):
        A = hs @ Wc.T
        loss_a, dA = _level_grad(A, cls, eps, z, scale)
    with section("head backward"):
        dhs = dA @ Wc
        dWc = dA.T @ hs
    # token level: rows grouped by the class of their target; one GEMM per class present
    by_class = np.argsort(cls, kind="stable")
    present, starts, counts = np.unique(cls[by_class], return_index=True, return_counts=True)
    dE = None
    if need_dE:
        dE = np.empty_like(E)                        # each present class's rows are written once below
        dE[~np.isin(cmap.token_class, present)] = 0.0

    def token_level(lo, hi):                         # the present classes lo .. hi-1
        loss = 0.0
        for c, s0, k in zip(present[lo:hi], starts[lo:hi], counts[lo:hi]):
            r = by_class[s0:s0 + k]                  # rows whose target is in class c
            toks = cmap.members(c)                   # S_c
            with section("head forward"):
                Ec = E[toks]                         # (|S_c|, C)
                hb = hs[r]
                Bl = hb @ Ec.T                       # (k, |S_c|) token logits within the class
                loss_b, dB = _level_grad(Bl, cmap.position[ys[r]], eps, z, scale)
                loss += loss_b.sum()
            with section("head backward"):
                dhs[r] += dB @ Ec
                if need_dE:
                    dE[toks] = dB.T @ hb             # the only rows of dE class c touches
        return loss

    # split the classes so that each worker gets about the same work (~ (rows + 2) * class size)
    cost = np.cumsum((counts + 2) * np.diff(cmap.offsets)[present])
    cuts = np.searchsorted(cost, cost[-1] * np.arange(1, workers) / workers) if present.size else []
    bounds = [0, *[int(c) for c in cuts], present.size]
    losses = run_shards(token_level, list(zip(bounds[:-1], bounds[1:])))
    loss_sum = loss_a.sum() + sum(losses)
    if rows is None:
        dh = dhs
    else:
        dh = np.zeros_like(h)
        np.add.at(dh, rows, dhs)
    return loss_sum * scale, dh, dE, dWc
