"""The hierarchical (two-level, class-based) softmax head: the reference author's next step.

The full head scores all V = 50,257 tokens for every position, three GEMMs of N x C x V. Here every
token belongs to exactly one of n_classes classes (about sqrt(V) = 224), and

    P(token | h) = P(class(token) | h) * P(token | class(token), h)

    class level:   a = h @ W_c^T        (n_classes,)   softmax over the classes; W_c trained
    token level:   b = h @ E[S_c]^T     (|S_c|,)       softmax over the tokens S_c of the class c;
                                                      E is the tied embedding, as in the full head

Both factors are normalised softmaxes, so the probabilities are exact: they sum to 1 over the whole
vocabulary, and the NLL is directly comparable with the full head's. The cost per position is
n_classes + |S_c| dot products instead of V: with frequency binning (Mikolov et al. 2011) each class
holds about 1/n_classes of the token occurrences, so frequent tokens sit in small classes and the
expected class size of a target is about V / n_classes. n_classes = sqrt(V) balances the two levels:
about 2 sqrt(V) = 450 dot products per position instead of 50,257.

Each level is a softmax cross-entropy (head.cross_entropy_*, with its label smoothing and z-loss),
so this file only says which logits go into which softmax. `cmap` is the class map (classmap.py,
which also says how the classes are made): cmap.token_class[v] is the class of token v,
cmap.members(c) the tokens S_c of class c, cmap.position[v] the index of v within its class.
fast/hier_head.py computes the same in place, the classes split between the cores.
"""
import numpy as np

from .head import cross_entropy_backward, cross_entropy_forward, log_softmax


def hier_ce_rows(h, E, Wc, cmap, targets, label_smoothing=0.0, z_loss=0.0):
    # h (N,C), E (V,C), Wc (n_classes,C), targets (N,) -> loss (N,): one loss per row, cache
    """Per-row loss of both levels (module docstring). Caches what hier_ce_backward needs."""
    eps, z = label_smoothing, z_loss
    cls = cmap.token_class[targets]                        # (N,) the class of every target
    # class level: one softmax over the n_classes class logits for every row
    loss, c_class = cross_entropy_forward(h @ Wc.T, cls, eps, z)
    # token level: a softmax over the tokens of the target's class. Rows whose targets share a
    # class share the same logit vectors E[S_c], so they go through one product per class.
    c_tokens = []
    for c in np.unique(cls):
        r = np.flatnonzero(cls == c)                       # rows whose target is in class c
        toks = cmap.members(c)                             # S_c
        loss_b, c_b = cross_entropy_forward(h[r] @ E[toks].T, cmap.position[targets[r]], eps, z)
        loss[r] += loss_b
        c_tokens.append((r, toks, c_b))
    return loss, (h, E, Wc, c_class, c_tokens)


def hier_ce_forward(h, E, Wc, cmap, targets, label_smoothing=0.0, z_loss=0.0):
    # h (N,C), E (V,C), Wc (n_classes,C), targets (N,) -> loss scalar (mean over the N rows), cache
    loss, cache = hier_ce_rows(h, E, Wc, cmap, targets, label_smoothing, z_loss)
    return loss.mean(), cache


def hier_ce_backward(dloss, cache):
    # dloss scalar -> dh (N,C), dE (V,C), dWc (n_classes,C)
    """Forward was a = h @ Wc^T, b_c = h[r_c] @ E[S_c]^T for each class c, loss = mean of the
    cross-entropies of a and of every b_c. So, with da, db_c from cross_entropy_backward:
        dh = da @ Wc, plus db_c @ E[S_c] on the rows r_c;   dWc = da^T @ h;
        dE[S_c] = db_c^T @ h[r_c]  (each token is in one class: every row of dE is written once)."""
    h, E, Wc, c_class, c_tokens = cache
    N = h.shape[0]
    drow = np.full(N, dloss / max(N, 1), dtype=h.dtype)    # d mean / d row loss
    da = cross_entropy_backward(drow, c_class)
    dh = da @ Wc
    dWc = da.T @ h
    dE = np.zeros_like(E)
    for r, toks, c_b in c_tokens:
        db = cross_entropy_backward(drow[r], c_b)
        dh[r] += db @ E[toks]
        dE[toks] = db.T @ h[r]
    return dh, dE, dWc


def hier_nll(h, E, Wc, cmap, targets):
    # h (N,C), targets (N,) -> nll (N,) float64 = -log P(class) - log P(token | class)
    return hier_ce_rows(h, E, Wc, cmap, targets)[0].astype(np.float64)


def hier_log_probs(h, E, Wc, cmap):
    # h (N,C) -> logp (N,V): log P(class(v)) + log P(v | class(v)) for every token v
    logp_class = log_softmax(h @ Wc.T)
    out = np.empty((h.shape[0], cmap.vocab_size), dtype=h.dtype)
    for c in range(cmap.n_classes):
        toks = cmap.members(c)
        out[:, toks] = logp_class[:, c:c + 1] + log_softmax(h @ E[toks].T)
    return out

