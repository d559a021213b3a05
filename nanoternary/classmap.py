"""The hierarchical head's class map: which of the n_classes classes each token belongs to.

Frequency binning (Mikolov et al. 2011): tokens sorted by how often they occur, cut into classes of
about equal total count, so each class carries about 1/n_classes of the token occurrences; frequent
tokens sit in small classes, the rare tail shares the last, large ones (ops/hier_head.py says why
that makes the head cheap).
"""
import numpy as np


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
