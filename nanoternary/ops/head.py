"""The output head: tied-embedding logits and softmax cross-entropy over all V = 50,257 tokens,
fused and chunked.

For a row h (C,) (the final RMSNorm's output) and its target token y:

    l   = h @ E^T                       (V,)  logits; E (V, C) is the tied token embedding
    lse = log sum_v exp(l_v)                  log of the softmax normaliser
    nll = lse - l_y                           the loss: -log p_y

with the reference's training-only options (all off by default):

    label smoothing eps:  loss = (1-eps) * nll + eps * (lse - mean_v l_v)   (target mixed with uniform)
    z-loss z:             loss += z * lse^2                                   (keeps lse near 0)
    rows:                 only these rows count (the reference's loss on a random 25% of positions)

Gradient of the per-row loss with respect to the logits (p = softmax(l)):

    dl_v = p_v * (1 + 2 z lse)  -  (1-eps) [v == y]  -  eps / V

then dh = dl @ E and dE = dl^T @ h, two more GEMMs the size of the first.

Why fused and chunked: the (N, V) logits for a batch of 8 x 256 rows are 2048 * 50257 * 4 bytes
= 412 MB in float32, and the probabilities and their gradient would be as big again. The backward
needs p, so instead of storing it we compute, for `chunk` rows at a time, the logits, then
(in place, in the same buffer) the probabilities, then dl, and immediately the chunk's share of
dh and dE. Memory is O(chunk * V): 1024 rows -> 206 MB, whatever N is; the loss, dh and dE come out
of one pass over the rows.
"""
import numpy as np

from ..profile import section

DEFAULT_CHUNK = 1024


def _chunk_logits(hc, E, buf):
    # hc (n,C), E (V,C) -> the first n rows of buf hold the logits hc @ E^T
    L = buf[:hc.shape[0]]
    np.matmul(hc, E.T, out=L)
    return L


def _exp_inplace(L):
    # L (n,V) logits -> L := exp(L - max), returns (m, s): row max and sum of exps, so lse = m + log s
    m = L.max(axis=1)
    L -= m[:, None]
    np.exp(L, out=L)
    s = L.sum(axis=1)
    return m, s


def softmax_ce_fused(h, E, targets, rows=None, label_smoothing=0.0, z_loss=0.0,
                     chunk=DEFAULT_CHUNK, need_dE=True, denom=None):
    # h (N,C), E (V,C), targets (N,) int, rows (n,) int or None -> loss, dh (N,C), dE (V,C) or None
    """Loss (mean over the counted rows) and its gradients for h and for the tied E, in one pass.

    `denom` replaces the number of counted rows as the mean's denominator: a shard of a batch
    passes the whole batch's count, so that the shards' losses and gradients simply add up."""
    N, C = h.shape
    V = E.shape[0]
    eps, z = float(label_smoothing), float(z_loss)
    hs, ys = (h, targets) if rows is None else (h[rows], targets[rows])
    n_total = denom if denom is not None else max(hs.shape[0], 1)
    dhs = np.empty_like(hs)
    dE = None
    if need_dE:                                    # written by the first chunk's GEMM (zeros if none)
        dE = np.empty_like(E) if hs.shape[0] else np.zeros_like(E)
    tmp = np.empty_like(E) if need_dE and hs.shape[0] > chunk else None   # for dE += (more chunks)
    buf = np.empty((min(chunk, hs.shape[0]), V), dtype=h.dtype)
    Esum = E.sum(axis=0) if eps else None                              # sum_v E_v, for mean_v l_v
    loss_sum = 0.0
    for i in range(0, hs.shape[0], chunk):
        hc, yc = hs[i:i + chunk], ys[i:i + chunk]
        n = hc.shape[0]
        ar = np.arange(n)
        with section("head forward"):
            L = _chunk_logits(hc, E, buf)
            ly = L[ar, yc].astype(np.float64)                          # target logits, before exp
            m, s = _exp_inplace(L)                                     # L = exp(l - m)
            lse = m.astype(np.float64) + np.log(s.astype(np.float64))
            row_loss = (1.0 - eps) * (lse - ly) + z * lse * lse
            if eps:
                mean_l = (hc @ Esum).astype(np.float64) / V            # mean_v l_v = h . sum_v E_v / V
                row_loss += eps * (lse - mean_l)
            loss_sum += row_loss.sum()
        with section("head backward"):
            # dl = p * (1 + 2 z lse) - (1-eps) onehot(y) - eps/V, all / n_total (the mean).
            # p = L / s, so one in-place scale turns the buffer into the first term.
            L *= ((1.0 + 2.0 * z * lse) / (s * n_total)).astype(L.dtype)[:, None]
            L[ar, yc] -= (1.0 - eps) / n_total
            # the uniform -eps/V term is added below as a rank-1 correction, without a pass over L
            np.matmul(L, E, out=dhs[i:i + n])                          # dh = dl @ E
            if need_dE:                                                # dE += dl^T @ h
                if i == 0:
                    np.matmul(L.T, hc, out=dE)
                else:
                    np.matmul(L.T, hc, out=tmp)
                    dE += tmp
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


def softmax_ce_forward(h, E, targets, chunk=DEFAULT_CHUNK):
    # h (N,C), E (V,C), targets (N,) -> nll (N,) float64: -log p(target), no smoothing
    """The plain negative log-likelihood per row (evaluation), chunked the same way."""
    N = h.shape[0]
    nll = np.empty(N, dtype=np.float64)
    buf = np.empty((min(chunk, N), E.shape[0]), dtype=h.dtype)
    for i in range(0, N, chunk):
        hc, yc = h[i:i + chunk], targets[i:i + chunk]
        L = _chunk_logits(hc, E, buf)
        ly = L[np.arange(hc.shape[0]), yc].astype(np.float64)
        m, s = _exp_inplace(L)
        nll[i:i + hc.shape[0]] = m + np.log(s.astype(np.float64)) - ly
    return nll


def log_softmax(h, E):
    # h (N,C), E (V,C) -> logp (N,V): log-probabilities of every token (holds all N*V values)
    """log p = l - lse, with l = h @ E^T. For inspection and sampling, not for training."""
    L = h @ E.T
    m = L.max(axis=1, keepdims=True)
    return L - (m + np.log(np.exp(L - m).sum(axis=1, keepdims=True)))
