"""Token embedding lookup: row idx[b, t] of the table E."""
import numpy as np


def embedding_forward(idx, E):
    # idx (B,T) int, E (V,C) -> x (B,T,C)
    """x = E[idx]. Caches (idx, V)."""
    return E[idx], (idx, E.shape[0])


def embedding_backward(dx, cache, dE=None):
    """Forward was x[b, t] = E[idx[b, t]], so dE[v] = sum of dx[b, t] over positions with idx == v.

    np.add.at, not `dE[idx] += dx`: with fancy indexing `dE[idx] += dx` reads all rows first and
    writes them back, so a token that appears twice keeps only ONE of its gradients. add.at is
    unbuffered and sums the repeats. Pass dE to accumulate into an existing gradient (the tied head's).
    """
    idx, V = cache
    C = dx.shape[-1]
    if dE is None:
        dE = np.zeros((V, C), dtype=dx.dtype)
    np.add.at(dE, idx.reshape(-1), dx.reshape(-1, C))
    return dE
