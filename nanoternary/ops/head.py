"""The output head: softmax cross-entropy over all V = 50,257 tokens, with the tied embedding.

For a row h (C,) (the final RMSNorm's output) and its target token y:

    l   = h @ E^T                       (V,)  logits; E (V, C) is the tied token embedding
    lse = log sum_v exp(l_v)                  log of the softmax normaliser
    nll = lse - l_y                           the loss: -log p_y

with the reference's two training-only options (both off by default):

    label smoothing eps:  loss = (1-eps) * nll + eps * (lse - mean_v l_v)   (target mixed with uniform)
    z-loss z:             loss += z * lse^2                                   (keeps lse near 0)

This file is the textbook version: the (N, V) logits are materialised, then a stable softmax, then
`dl = p - onehot`. For a batch of 8 x 256 rows the logits alone are 2048 * 50257 * 4 bytes = 412 MB
in float32, and the probabilities as much again. nanoternary/fast/head.py computes the same loss
and gradients in row chunks without ever holding them (O(chunk * V) memory, and fewer passes over
memory); tests/test_fast.py proves the two equal for every option.

`cross_entropy_*` works on logits of any width, so the hierarchical head (hier_head.py) uses it for
both of its levels.
"""
import numpy as np


def cross_entropy_forward(logits, targets, label_smoothing=0.0, z_loss=0.0):
    # logits (n,m), targets (n,) int -> loss (n,): one loss per row
    """loss = (1-eps) (lse - l_y) + eps (lse - mean l) + z lse^2 per row, lse = log sum exp(l).
    Caches (p, lse, targets, eps, z) with p = softmax(l)."""
    eps, z = label_smoothing, z_loss
    n = logits.shape[0]
    m = logits.max(axis=1, keepdims=True)                 # stable softmax: exp never overflows
    e = np.exp(logits - m)
    s = e.sum(axis=1, keepdims=True)
    p = e / s                                             # (n, m) probabilities
    lse = (m + np.log(s))[:, 0]                           # (n,)
    nll = lse - logits[np.arange(n), targets]
    loss = (1.0 - eps) * nll + z * lse * lse
    if eps:
        loss += eps * (lse - logits.mean(axis=1))
    return loss, (p, lse, targets, eps, z)


def cross_entropy_backward(dloss, cache):
    # dloss (n,) -> dlogits (n,m)
    """Forward was loss = (1-eps)(lse - l_y) + eps (lse - mean l) + z lse^2, with d lse / dl = p:
        term 1: (1-eps)(p - onehot(y))
        term 2: eps (p - 1/m)
        term 3: 2 z lse p
    so dl = p (1 + 2 z lse) - (1-eps) onehot(y) - eps/m, times dloss per row."""
    p, lse, targets, eps, z = cache
    n, m = p.shape
    dl = p * (1.0 + 2.0 * z * lse)[:, None]
    dl[np.arange(n), targets] -= 1.0 - eps                # - onehot
    if eps:
        dl -= eps / m                                     # - uniform
    dl *= dloss[:, None]
    return dl


def softmax_ce_forward(h, E, targets, label_smoothing=0.0, z_loss=0.0):
    # h (N,C), E (V,C), targets (N,) int -> loss scalar (mean over the N rows)
    """loss = mean over rows of cross_entropy(h @ E^T, targets). Caches (h, E, ce cache)."""
    logits = h @ E.T                                      # (N, V): 412 MB for 2048 rows in float32
    loss, ce_cache = cross_entropy_forward(logits, targets, label_smoothing, z_loss)
    return loss.mean(), (h, E, ce_cache)


def softmax_ce_backward(dloss, cache):
    # dloss scalar -> dh (N,C), dE (V,C)
    """Forward was loss = mean_n ce(l_n), l = h @ E^T.
    dl = cross_entropy_backward(dloss / N);  dh = dl @ E;  dE = dl^T @ h."""
    h, E, ce_cache = cache
    N = h.shape[0]
    dl = cross_entropy_backward(np.full(N, dloss / max(N, 1), dtype=h.dtype), ce_cache)
    return dl @ E, dl.T @ h


def log_softmax(logits):
    # logits (n,m) -> log p (n,m): log-probabilities, each row normalised
    """log p = l - lse. For evaluation, inspection and sampling."""
    m = logits.max(axis=1, keepdims=True)
    return logits - (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))


def nll(h, E, targets):
    # h (N,C), E (V,C), targets (N,) -> (N,) float64: -log p(target), no smoothing
    logp = log_softmax(h @ E.T)
    return -logp[np.arange(h.shape[0]), targets].astype(np.float64)
