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
"""
import numpy as np

from ..parallel import run_shards
from ..profile import section


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
    split by classes between that many threads (parallel.run_shards); each class's rows and tokens
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


def hier_nll(h, E, Wc, cmap, targets):
    # h (N,C), targets (N,) -> nll (N,) float64 = -log P(class) - log P(token | class)
    cls = cmap.token_class[targets]
    A = h @ Wc.T
    _, lse_a = _softmax_rows(A.copy())
    nll = lse_a - (A[np.arange(len(cls)), cls]).astype(np.float64)
    by_class = np.argsort(cls, kind="stable")
    present, starts, counts = np.unique(cls[by_class], return_index=True, return_counts=True)
    for c, s0, k in zip(present, starts, counts):
        r = by_class[s0:s0 + k]
        Bl = h[r] @ E[cmap.members(c)].T
        picked = Bl[np.arange(k), cmap.position[targets[r]]].astype(np.float64)
        _, lse_b = _softmax_rows(Bl)
        nll[r] += lse_b - picked
    return nll


def hier_log_probs(h, E, Wc, cmap):
    # h (N,C) -> logp (N,V): log P(class(v)) + log P(v | class(v)) for every token v
    A = h @ Wc.T
    _, lse_a = _softmax_rows(A.copy())
    logp_class = A - lse_a[:, None].astype(A.dtype)
    out = np.empty((h.shape[0], cmap.vocab_size), dtype=h.dtype)
    for c in range(cmap.n_classes):
        toks = cmap.members(c)
        Bl = h @ E[toks].T
        _, lse_b = _softmax_rows(Bl.copy())
        out[:, toks] = logp_class[:, c:c + 1] + Bl - lse_b[:, None].astype(Bl.dtype)
    return out
