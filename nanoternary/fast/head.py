"""The full head, fused and chunked: the same loss and gradients as ops/head.py's textbook pair
(softmax_ce_forward / softmax_ce_backward), without ever holding the (N, V) logits.

The math is ops/head.py's (its docstring states it); the one line this file builds on is the
gradient of a row's loss with respect to its logits (p = softmax(l)),

    dl_v = p_v * (1 + 2 z lse)  -  (1-eps) [v == y]  -  eps / V

then dh = dl @ E and dE = dl^T @ h, two more GEMMs the size of the first. `rows`: only these rows
count (the reference's loss on a random 25% of positions).

Why fused and chunked: the (N, V) logits for a batch of 8 x 256 rows are 2048 * 50257 * 4 bytes
= 412 MB in float32, and the probabilities and their gradient would be as big again. The backward
needs p, so instead of storing it we compute, for `chunk` rows at a time, the logits and then, in
place in the same buffer, their exponentials, and immediately the chunk's share of dh and dE.
Memory is O(chunk * V): 1024 rows -> 206 MB per thread (the buffer is
kept between calls, see _scratch), whatever N is, plus one (V, C) buffer for the dE of later chunks;
the loss, dh and dE come out of one pass over the rows.

Every pass over that (chunk, V) buffer costs about as much as a tenth of a GEMM, so the code makes
as few as it can: the GEMM that writes the logits, exp in place, a row sum, and the two backward
GEMMs that read it. Nothing else touches it:
  - the max-shift of a stable softmax is skipped when a bound shows it is not needed (_exp_inplace);
  - with P = exp(l - m) and s its row sums, dl = a * P - onehot terms with one number per row,
    a = (1 + 2 z lse) / (s n). The row scale a goes on the small matrices either side of the GEMMs,
    dl @ E = a * (P @ E)  and  dl^T @ h = P^T @ (a * h),
    and the one-hot and uniform terms are added to dh and dE directly (a gather, a scatter-add and
    a rank-1 term) instead of being written into the buffer.
"""
import threading

import numpy as np

from .profile import section

DEFAULT_CHUNK = 1024


_buffers = threading.local()


def _scratch(rows, V, dtype):
    """The (rows, V) logits buffer, kept per thread between calls. A fresh 200 MB array each step
    would cost its page faults again every time (the kernel maps and zeroes memory on first touch)."""
    buf = getattr(_buffers, "buf", None)
    if buf is None or buf.dtype != dtype or buf.shape[1] != V or buf.shape[0] < rows:
        buf = _buffers.buf = np.empty((rows, V), dtype=dtype)
    return buf[:rows]


def _chunk_logits(hc, E, buf):
    # hc (n,C), E (V,C) -> the first n rows of buf hold the logits hc @ E^T
    L = buf[:hc.shape[0]]
    np.matmul(hc, E.T, out=L)
    return L


SAFE_LOGIT = 60.0  # |l| <= 60: exp(l) and a sum of 50,257 of them fit in float32 (max 3.4e38)


def _exp_inplace(L, bound=None):
    # L (n,V) logits -> L := exp(L - m), returns (m, s) with s the row sums, so lse = m + log s
    """Softmax's usual max-shift costs two passes over the (n, V) buffer (the max, the subtraction).
    When every |logit| is known to be at most SAFE_LOGIT (`bound`, from Cauchy-Schwarz, see
    softmax_ce_fused) the shift is not needed: m = 0 and exp cannot overflow or underflow to 0."""
    if bound is not None and bound <= SAFE_LOGIT:
        m = np.zeros(L.shape[0], dtype=L.dtype)
    else:
        m = L.max(axis=1)
        L -= m[:, None]
    np.exp(L, out=L)
    s = L.sum(axis=1)
    return m, s


def max_row_norm(a):
    # a (n,C) -> max_i ||a_i||
    return float(np.sqrt(np.einsum("nc,nc->n", a, a).max(initial=0.0)))


def _logit_bound(h, E, e_norm=None):
    # -> max over rows and tokens of |h_i . E_v| <= max_i ||h_i|| * max_v ||E_v||  (Cauchy-Schwarz)
    # e_norm: max_v ||E_v|| if the caller has it (one pass over E per step, not one per piece)
    return max_row_norm(h) * (max_row_norm(E) if e_norm is None else e_norm)


def softmax_ce_fused(h, E, targets, rows=None, label_smoothing=0.0, z_loss=0.0,
                     chunk=DEFAULT_CHUNK, need_dE=True, denom=None, e_norm=None):
    # h (N,C), E (V,C), targets (N,) int, rows (n,) int or None -> loss, dh (N,C), dE (V,C) or None
    """Loss (mean over the counted rows) and its gradients for h and for the tied E, in one pass.

    `denom` replaces the number of counted rows as the mean's denominator: a shard of a batch
    passes the whole batch's count, so that the shards' losses and gradients simply add up.
    `e_norm`: max_v ||E_v||, computed by the caller once for all pieces (else here)."""
    N, C = h.shape
    V = E.shape[0]
    eps, z = float(label_smoothing), float(z_loss)
    hs, ys = (h, targets) if rows is None else (h[rows], targets[rows])
    n_rows = hs.shape[0]
    n_total = denom if denom is not None else max(n_rows, 1)
    dhs = np.empty_like(hs)
    dE = None
    if need_dE:                                    # written by the first chunk's GEMM (zeros if none)
        dE = np.empty_like(E) if n_rows else np.zeros_like(E)
    tmp = np.empty_like(E) if need_dE and n_rows > chunk else None    # for dE += (more chunks)
    buf = _scratch(min(chunk, n_rows), V, h.dtype)
    Esum = E.sum(axis=0) if eps else None                              # sum_v E_v, for mean_v l_v
    # the bound reads all of E once: worth it only when the buffer passes it saves are bigger
    bound = _logit_bound(hs, E, e_norm) if n_rows > C else None
    w_hot = (1.0 - eps) / n_total                                      # weight of the one-hot term
    loss_sum = 0.0
    for i in range(0, n_rows, chunk):
        hc, yc = hs[i:i + chunk], ys[i:i + chunk]
        n = hc.shape[0]
        with section("head forward"):
            P = _chunk_logits(hc, E, buf)
            ly = P[np.arange(n), yc].astype(np.float64)                # target logits, before exp
            m, s = _exp_inplace(P, bound)                              # P = exp(l - m), s = sum_v P
            lse = m.astype(np.float64) + np.log(s.astype(np.float64))
            row_loss = (1.0 - eps) * (lse - ly) + z * lse * lse
            if eps:
                mean_l = (hc @ Esum).astype(np.float64) / V            # mean_v l_v = h . sum_v E_v / V
                row_loss += eps * (lse - mean_l)
            loss_sum += row_loss.sum()
        with section("head backward"):
            # dl = a * P - (1-eps)/n onehot(y) - eps/(V n), with a = (1 + 2 z lse) / (s n)
            a = ((1.0 + 2.0 * z * lse) / (s * n_total)).astype(h.dtype)[:, None]     # (n, 1)
            dhc = dhs[i:i + n]
            np.matmul(P, E, out=dhc)                                   # dh = a * (P @ E) ...
            dhc *= a
            dhc -= h.dtype.type(w_hot) * E[yc]                         # ... - (1-eps)/n E[y]
            if need_dE:                                                # dE += P^T @ (a * h)
                out = dE if i == 0 else tmp
                np.matmul(P.T, hc * a, out=out)
                if i:
                    dE += tmp
                np.add.at(dE, yc, -w_hot * hc)                         # ... - (1-eps)/n h at row y
    if eps:
        c = eps / (V * n_total)
        dhs -= (c * Esum).astype(h.dtype)                              # (-eps/V) 1^T @ E per row
        if need_dE:
            dE -= (c * hs.sum(axis=0)).astype(h.dtype)[None, :]        # (-eps/V) 1 (sum of rows of h)
    if rows is None:
        dh = dhs
    else:
        dh = np.zeros_like(h)
        np.add.at(dh, rows, dhs)   # add.at: a row listed twice gets both gradients (see embedding.py)
    return loss_sum / n_total, dh, dE


def nll_fused(h, E, targets, chunk=DEFAULT_CHUNK):
    # h (N,C), E (V,C), targets (N,) -> nll (N,) float64: -log p(target), no smoothing
    """ops.head.nll, chunked the same way (evaluation)."""
    N = h.shape[0]
    nll = np.empty(N, dtype=np.float64)
    buf = _scratch(min(chunk, N), E.shape[0], h.dtype)
    bound = _logit_bound(h, E) if N > E.shape[1] else None
    for i in range(0, N, chunk):
        hc, yc = h[i:i + chunk], targets[i:i + chunk]
        L = _chunk_logits(hc, E, buf)
        ly = L[np.arange(hc.shape[0]), yc].astype(np.float64)
        m, s = _exp_inplace(L, bound)
        nll[i:i + hc.shape[0]] = m + np.log(s.astype(np.float64)) - ly
    return nll
