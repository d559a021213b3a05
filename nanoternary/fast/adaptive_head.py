"""The adaptive head, fused and split between the cores: the same loss and gradients as
ops/adaptive_head.py's plain pair (adaptive_ce_forward / adaptive_ce_backward), whose docstring
states the math.

The counted rows are split between `workers` threads (threads.run_shards); each thread runs the
head level over its rows, then each tail level over those of its rows whose target is in that tail
(gathered once per tail), and returns its share of the weight gradients; the shares are added at
the end (a few MB). Every softmax level goes through `_level`, which makes as few passes over its
(rows, width) logits as fast/head.py's full head does: the GEMM that writes them, exp in place
(without the max-shift when the Cauchy-Schwarz bound allows), a row sum, and the two GEMMs that read
them; the row scale a = (1 + 2 z lse) / (s denom) goes on the small matrices either side of those
GEMMs and the one-hot and uniform terms are added to dx and dW directly,

    dl = a * P - (1-eps)/denom onehot(y) - eps/(m denom),     P = exp(l - shift)
    dx = a * (P @ W) - (1-eps)/denom W[y] - eps/(m denom) sum_v W_v
    dW = P^T @ (a * x) - (1-eps)/denom x at the rows y - eps/(m denom) sum_n x_n

The head's (rows, S + J) logits are computed `chunk` rows at a time in a buffer kept per thread
between calls (_kept): 1,024 rows x 4,098 logits x 4 bytes = 17 MB for the default split. The tails'
logits, `chunk` rows at a time too, go into a second one (at most 1,024 x 33,873 x 4 bytes = 139 MB,
when that many rows reach the largest tail): a fresh array per step would pay its page faults
again every step. adaptive_nll_fused, for evaluation, uses the same buffers.
(Buffers of their own, not fast/head.py's: a process that runs both heads, as tools/bench does,
would otherwise swap the full head's 206 MB buffer for a small one and back at every step.)
"""
import threading

import numpy as np

from .head import DEFAULT_CHUNK, SAFE_LOGIT, _exp_inplace, max_row_norm
from .profile import section
from .threads import run_shards, split

_buffers = threading.local()


def _kept(name, n, m, dtype):
    """An (n, m) buffer for logits, kept per thread between calls under `name` (as head._scratch)."""
    buf = getattr(_buffers, name, None)
    if buf is None or buf.dtype != dtype or buf.size < n * m:
        buf = np.empty(max(n * m, 1), dtype=dtype)
        setattr(_buffers, name, buf)
    return buf[:n * m].reshape(n, m)


def _level(x, W, y, eps, z, scale, dx, dW, dW_from, bound, buf):
    # x (n,c), W (m,c), y (n,) columns, buf (>=n, m) -> loss summed over the rows (float64);
    # dx (n,c) written; dW (m,c) += this level's gradient in its rows dW_from.. (None: skipped)
    """One softmax cross-entropy level, logits l = x @ W^T (module docstring for the gradient)."""
    n, m = x.shape[0], W.shape[0]
    with section("head forward"):
        L = buf[:n]
        np.matmul(x, W.T, out=L)
        ly = L[np.arange(n), y].astype(np.float64)            # target logits, before exp
        shift, s = _exp_inplace(L, bound)                     # L = P = exp(l - shift), s = sum P
        lse = shift.astype(np.float64) + np.log(s.astype(np.float64))
        loss = (1.0 - eps) * (lse - ly) + z * lse * lse
        Wsum = W.sum(axis=0) if eps else None
        if eps:
            loss += eps * (lse - (x @ Wsum).astype(np.float64) / m)    # mean_v l_v = x . sum_v W_v / m
    with section("head backward"):
        a = ((1.0 + 2.0 * z * lse) * scale / s).astype(x.dtype)[:, None]       # (n, 1)
        w_hot = x.dtype.type((1.0 - eps) * scale)
        np.matmul(L, W, out=dx)                               # dx = a * (P @ W) - ...
        dx *= a
        dx -= w_hot * W[y]
        if eps:
            dx -= (eps * scale / m * Wsum).astype(x.dtype)
        if dW is not None:
            dW[dW_from:] += L[:, dW_from:].T @ (x * a)        # P^T @ (a x), in the rows kept
            hot = y >= dW_from
            np.add.at(dW, y[hot], -w_hot * x[hot])            # add.at: a column hit twice gets both
            if eps:
                dW[dW_from:] -= (eps * scale / m * x.sum(axis=0)).astype(x.dtype)
    return float(loss.sum())


def _bound(x_norm, W_norm):
    # -> the Cauchy-Schwarz bound of |logits| when it allows the shift-free exp, else None
    b = x_norm * W_norm
    return b if b <= SAFE_LOGIT else None


def adaptive_ce_fused(h, W_head, tails, cmap, targets, rows=None, label_smoothing=0.0, z_loss=0.0,
                      need_dW=True, denom=None, workers=1, chunk=DEFAULT_CHUNK):
    # h (N,C), W_head (S+J,C), tails [(P_i (d_i,C), W_i (n_i,d_i))], targets (N,) token ids
    #   -> loss, dh (N,C), dW_head (S+J,C), [(dP_i, dW_i or None), ...]
    """Mean loss over the counted rows `rows` (None: all) and its gradients, in one pass.

    `denom`: the mean's denominator, as in head.softmax_ce_fused (a shard of a larger batch passes
    the whole batch's count). need_dW=False skips the gradients of the token vectors, i.e. of the
    tied embedding: dW_head's shortlist rows stay 0 (its cluster rows are computed) and every dW_i
    is None; the projections' dP_i are computed either way. `workers`: the rows are split between
    that many threads."""
    eps, z = float(label_smoothing), float(z_loss)
    hs, ys = (h, targets) if rows is None else (h[rows], targets[rows])
    n_rows = hs.shape[0]
    scale = 1.0 / (denom if denom is not None else max(n_rows, 1))
    S = cmap.shortlist_size
    cl = cmap.token_cluster[ys]
    head_y = cmap.head_targets(ys)
    pos = cmap.position[ys]
    dhs = np.empty_like(hs)
    norms_head = max_row_norm(W_head)                          # read once, for every worker
    norms_tail = [max_row_norm(W) for _, W in tails]
    dW_from = 0 if need_dW else S

    def work(lo, hi):                                          # the counted rows lo .. hi-1
        x, yh, dx = hs[lo:hi], head_y[lo:hi], dhs[lo:hi]
        dWh = np.zeros_like(W_head)
        loss = 0.0
        bound = _bound(max_row_norm(x), norms_head)
        buf = _kept("head", min(chunk, max(hi - lo, 1)), W_head.shape[0], h.dtype)
        for i in range(0, hi - lo, chunk):                     # the head level, chunk rows at a time
            loss += _level(x[i:i + chunk], W_head, yh[i:i + chunk], eps, z, scale,
                           dx[i:i + chunk], dWh, dW_from, bound, buf)
        dts = []
        for t, (P, W) in enumerate(tails, start=1):            # tail t, on its rows only
            r = lo + np.flatnonzero(cl[lo:hi] == t)
            dW = np.zeros_like(W) if need_dW else None
            if r.size == 0:
                dts.append((np.zeros_like(P), dW))
                continue
            with section("head forward"):
                xr = hs[r]                                     # gathered once
                zr = xr @ P.T                                  # (k, d_t)
            dz = np.empty_like(zr)
            bound = _bound(max_row_norm(zr), norms_tail[t - 1])
            tbuf = _kept("tail", min(chunk, r.size), W.shape[0], h.dtype)
            for i in range(0, r.size, chunk):                  # chunk rows at a time, as the head
                loss += _level(zr[i:i + chunk], W, pos[r[i:i + chunk]], eps, z, scale, dz[i:i + chunk], dW, 0,
                               bound, tbuf)
            with section("head backward"):
                dhs[r] += dz @ P                               # r: distinct rows
                dts.append((dz.T @ xr, dW))
        return loss, dWh, dts

    parts = run_shards(work, split(n_rows, workers) if n_rows else [(0, 0)])
    loss, dW_head, dtails = parts[0]
    with section("shard sum"):
        for l_, dWh, dts in parts[1:]:                         # the workers' shares add up
            loss += l_
            dW_head += dWh
            for (dP, dW), (dP2, dW2) in zip(dtails, dts):
                dP += dP2
                if dW is not None:
                    dW += dW2
    if rows is None:
        dh = dhs
    else:
        dh = np.zeros_like(h)
        np.add.at(dh, rows, dhs)   # add.at: a row listed twice gets both gradients (see embedding.py)
    return loss * scale, dh, dW_head, dtails


def adaptive_nll_fused(h, W_head, tails, cmap, targets, chunk=DEFAULT_CHUNK):
    # h (N,C), targets (N,) token ids -> nll (N,) float64: ops.adaptive_head.adaptive_nll, chunked
    """-log p(target) of every row, `chunk` rows at a time in the kept buffers (evaluation): the
    head level's log-softmax at the target's column, plus its tail's for the rows of each tail."""
    out = np.empty(h.shape[0], dtype=np.float64)
    cl, head_y, pos = cmap.token_cluster[targets], cmap.head_targets(targets), cmap.position[targets]

    def nll_rows(x, W, y, buf):                 # rows x through logits x @ W^T -> lse - l_y (float64)
        L = buf[:x.shape[0]]
        np.matmul(x, W.T, out=L)
        ly = L[np.arange(x.shape[0]), y].astype(np.float64)
        m, s = _exp_inplace(L)
        return m.astype(np.float64) + np.log(s.astype(np.float64)) - ly
    buf = _kept("head", min(chunk, max(h.shape[0], 1)), W_head.shape[0], h.dtype)
    for i in range(0, h.shape[0], chunk):
        out[i:i + chunk] = nll_rows(h[i:i + chunk], W_head, head_y[i:i + chunk], buf)
    for t, (P, W) in enumerate(tails, start=1):
        r = np.flatnonzero(cl == t)
        tbuf = _kept("tail", min(chunk, max(r.size, 1)), W.shape[0], h.dtype)
        for i in range(0, r.size, chunk):
            rows = r[i:i + chunk]
            out[rows] += nll_rows(h[rows] @ P.T, W, pos[rows], tbuf)
    return out
