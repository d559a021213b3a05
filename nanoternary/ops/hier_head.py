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

Training options, applied to each of the two softmaxes: label smoothing eps mixes each level's
target with that level's uniform distribution, and the z-loss adds z * lse^2 for both normalisers.

    per row:  loss = (1-eps) * (nll_class + nll_token) + eps * (lse_a - mean a) + eps * (lse_b - mean b)
                     + z * (lse_a^2 + lse_b^2)
              da = p_a * (1 + 2 z lse_a) - (1-eps) onehot(class) - eps / n_classes
              db = p_b * (1 + 2 z lse_b) - (1-eps) onehot(token) - eps / |S_c|
              dh = da @ W_c + db @ E[S_c];  dW_c += da^T h;  dE[S_c] += db^T h

Each level is a plain softmax cross-entropy (head.cross_entropy_*), so this file only says which
logits go into which softmax. nanoternary/fast/hier_head.py computes the same in place, with the
classes split between the cores; tests/test_fast.py proves the two equal.
"""
import numpy as np

from .head import cross_entropy_backward, cross_entropy_forward, log_softmax


class ClassMap:
    """Which class each token is in, and the tokens of each class as a contiguous run of `order`.

    token_class (V,)  class of every token
    order (V,)        token ids sorted by class: class c's tokens are order[offsets[c]:offsets[c+1]]
    offsets (n+1,)    where each class starts in `order`
    position (V,)     index of every token within its class
    """

    def __init__(self, token_class):
        self.token_class = np.asarray(token_class, dtype=np.int64)
        self.n_classes = int(self.token_class.max()) + 1
        sizes = np.bincount(self.token_class, minlength=self.n_classes)
        if (sizes == 0).any():
            raise ValueError(f"class map has empty classes: {np.flatnonzero(sizes == 0)[:10]}")
        self.order = np.argsort(self.token_class, kind="stable")
        self.offsets = np.concatenate(([0], np.cumsum(sizes)))
        self.position = np.empty_like(self.order)
        self.position[self.order] = np.arange(self.order.size) - self.offsets[self.token_class[self.order]]

    @property
    def vocab_size(self):
        return self.token_class.size

    def members(self, c):
        """Token ids of class c."""
        return self.order[self.offsets[c]:self.offsets[c + 1]]

    @classmethod
    def from_counts(cls, counts, n_classes):
        """Frequency binning: tokens sorted by count (most frequent first, ties by id), cut into
        n_classes consecutive bins of about equal total count, so frequent tokens share small
        classes and the rare tail shares the last ones. One is added to every count, so tokens never
        seen in training still carry a little mass and spread over the last bins instead of all
        landing in one."""
        counts = np.asarray(counts, dtype=np.float64) + 1.0
        V = counts.size
        if not 1 <= n_classes <= V:
            raise ValueError(f"n_classes must be in [1, {V}], got {n_classes}")
        by_freq = np.lexsort((np.arange(V), -counts))             # descending count, then id
        mass = np.cumsum(counts[by_freq])
        start_mass = mass - counts[by_freq]                       # mass before each token
        bins = np.minimum(np.floor(start_mass / mass[-1] * n_classes).astype(np.int64), n_classes - 1)
        # A very frequent token can carry more than one bin of mass, which leaves bins empty:
        # _no_empty_bins then splits the largest classes until there are exactly n_classes.
        bins = _no_empty_bins(bins, n_classes)
        token_class = np.empty(V, dtype=np.int64)
        token_class[by_freq] = bins
        return cls(token_class)

    @classmethod
    def default(cls, vocab_size, n_classes):
        """The class map of a model built from its config alone (no token counts yet): frequency
        binning on a Zipf prior, count ~ 1 / (rank + 10), with GPT-2's token id as the rank (BPE
        ids roughly follow merge order, i.e. frequency). Deterministic."""
        prior = 1e6 / (np.arange(vocab_size) + 10.0)
        return cls.from_counts(prior, n_classes)

    def state(self):
        return {"token_class": self.token_class}

    @classmethod
    def from_state(cls, state):
        return cls(state["token_class"])


def _no_empty_bins(bins, n_classes):
    """bins: non-decreasing class per rank in [0, n_classes). Renumber so that every class in
    [0, n_classes) is used, keeping the order: later ranks move up to fill gaps."""
    V = bins.size
    out = bins.copy()
    if np.unique(out).size == n_classes:
        return out
    # cut by rank into the runs of equal bins, then split the largest run in two until there are
    # n_classes runs; number them in order
    cuts = list(np.flatnonzero(np.diff(out)) + 1)
    runs = [(a, b) for a, b in zip([0] + cuts, cuts + [V])]
    while len(runs) < n_classes:
        k = max(range(len(runs)), key=lambda i: runs[i][1] - runs[i][0])
        a, b = runs.pop(k)
        if b - a < 2:
            raise ValueError("cannot make that many non-empty classes")
        m = (a + b) // 2 if b - a > 2 else a + 1
        runs[k:k] = [(a, m), (m, b)]
    for c, (a, b) in enumerate(runs):
        out[a:b] = c
    return out


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

