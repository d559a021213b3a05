"""Which tokens go together in the cheap heads: the hierarchical head's class map (ClassMap) and the
adaptive head's cluster map (ClusterMap). Both start from the tokens sorted by how often they occur.

ClassMap, frequency binning (Mikolov et al. 2011): tokens sorted by how often they occur, cut into
classes of about equal total count, so each class carries about 1/n_classes of the token
occurrences; frequent tokens sit in small classes, the rare tail shares the last, large ones
(ops/hier_head.py says why that makes the head cheap).

ClusterMap (Grave et al. 2017): the same sorted list cut at a few ranks, c_1 < c_2 < ... < c_K = V:
the c_1 most frequent tokens are the shortlist, scored at full width; the tokens ranked
[c_i, c_{i+1}) are tail cluster i, scored through a narrower projection (ops/adaptive_head.py).
"""
import math

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


# ------------------------------------------------------------------------------------------------
# the adaptive head's clusters

# The default split for V = 50,257, d = 256, div 4 (tail widths 64 and 16): ClusterMap's docstring says why.
DEFAULT_CUTOFFS = (4096, 16384, 50257)


class ClusterMap:
    """The adaptive head's split of the vocabulary: a shortlist of the most frequent tokens and
    tail clusters of rarer ones, as contiguous runs of the tokens sorted by frequency.

    order (V,)         token ids by frequency rank: order[r] is the token of rank r (0 = most frequent)
    cutoffs (K,)       c_1 < ... < c_K = V; bounds = (0, c_1, ..., c_K)
    cluster i          the tokens order[bounds[i]:bounds[i+1]]; i = 0 is the shortlist (c_1 tokens),
                       i = 1 .. K-1 the tail clusters (n_tails = K - 1 of them)
    token_cluster (V,) the cluster of every token (0 = shortlist)
    position (V,)      the index of every token within its cluster (its column in that softmax)
    rank (V,)          the frequency rank of every token (torch.nn.AdaptiveLogSoftmaxWithLoss's
                       target numbering)

    Cost: a row costs S + J dot products of width d in the head, and a row whose target is in tail
    i adds d d_i + n_i d_i multiply-adds (d_i = d / div^i); in training only those rows go through
    tail i, so per row, on average, d (S + J) + sum_i share_i (d d_i + n_i d_i), share_i the fraction
    of targets in tail i. The default split, DEFAULT_CUTOFFS = (4096, 16384, 50257) with div 4: 94%
    of English text's targets in the shortlist, 1.09M multiply-adds per row against the full head's
    12.87M. docs/heads.md has the measurements behind it (tools/adaptive_lab.py).
    """

    def __init__(self, order, cutoffs):
        order = np.asarray(order)
        cutoffs = np.asarray(cutoffs)
        if order.ndim != 1 or order.size < 2 or order.dtype.kind not in "iu":
            raise ValueError(f"cluster map: order must be a 1-D integer array of the V >= 2 token ids, "
                             f"got shape {order.shape} dtype {order.dtype}")
        V = order.size
        if not np.array_equal(np.sort(order), np.arange(V)):
            raise ValueError(f"cluster map: order must hold every token id 0..{V - 1} exactly once")
        if cutoffs.ndim != 1 or cutoffs.dtype.kind not in "iu" or cutoffs.size < 2:
            raise ValueError(f"cluster map: cutoffs must be at least two integers c_1 < ... < c_K = V "
                             f"(a shortlist and one tail cluster), got {cutoffs.tolist()}")
        if cutoffs[0] < 1 or (np.diff(cutoffs) <= 0).any() or cutoffs[-1] != V:
            raise ValueError(f"cluster map: cutoffs must rise strictly from >= 1 and end at the vocabulary "
                             f"size {V}, got {cutoffs.tolist()}")
        self.order = order.astype(np.int64)
        self.cutoffs = cutoffs.astype(np.int64)
        self.bounds = np.concatenate(([0], self.cutoffs))
        self.rank = np.empty(V, dtype=np.int64)
        self.rank[self.order] = np.arange(V)
        self.token_cluster = np.searchsorted(self.cutoffs, self.rank, side="right")   # (V,) 0 .. K-1
        self.position = self.rank - self.bounds[self.token_cluster]

    @property
    def vocab_size(self):
        return self.order.size

    @property
    def shortlist_size(self):
        """S = c_1: the tokens of the head softmax."""
        return int(self.cutoffs[0])

    @property
    def n_tails(self):
        """K - 1 tail clusters: the head softmax has S + n_tails logits."""
        return self.cutoffs.size - 1

    @property
    def sizes(self):
        """Tokens per cluster, the shortlist first: (S, size_1, ..., size_{K-1})."""
        return np.diff(self.bounds)

    def members(self, i):
        """Token ids of cluster i (0 = the shortlist), in rank order: the order of that softmax."""
        return self.order[self.bounds[i]:self.bounds[i + 1]]

    def head_targets(self, targets):
        # targets (N,) token ids -> (N,) the column of the head softmax: the token's own for a
        # shortlist token, S + i - 1 (the cluster's logit) for a token of tail cluster i
        c = self.token_cluster[targets]
        return np.where(c == 0, self.position[targets], self.shortlist_size + c - 1)

    @classmethod
    def from_counts(cls, counts, cutoffs):
        """Tokens sorted by count (most frequent first, ties by id), cut at `cutoffs`. One is added
        to every count, as in ClassMap.from_counts, so unseen tokens rank by id behind the seen ones."""
        counts = np.asarray(counts, dtype=np.float64)
        if counts.ndim != 1 or counts.size < 2 or not np.isfinite(counts).all() or (counts < 0).any():
            raise ValueError(f"cluster map: counts must be a 1-D array of V >= 2 finite counts >= 0, "
                             f"got shape {counts.shape}")
        counts = counts + 1.0
        order = np.lexsort((np.arange(counts.size), -counts))         # descending count, then id
        return cls(order, np.asarray(cutoffs, dtype=np.int64))

    @classmethod
    def default(cls, vocab_size, cutoffs=None):
        """The cluster map of a model built from its config alone (no token counts yet): the Zipf
        prior of ClassMap.default, count ~ 1 / (rank + 10) with GPT-2's token id as the rank (BPE
        ids roughly follow merge order, i.e. frequency). Deterministic. cutoffs None: DEFAULT_CUTOFFS
        for V = 50,257, else the same fractions of V (at least one token per cluster)."""
        if cutoffs is None:
            cutoffs = default_cutoffs(vocab_size)
        prior = 1e6 / (np.arange(vocab_size) + 10.0)
        return cls.from_counts(prior, cutoffs)

    def state(self):
        """What a checkpoint saves: {"order": (V,), "cutoffs": (K,)} int64 arrays."""
        return {"order": self.order, "cutoffs": self.cutoffs}

    @classmethod
    def from_state(cls, state):
        """The map saved by state(), validated: a ValueError names what is missing or wrong."""
        if not hasattr(state, "keys"):
            raise ValueError(f"cluster map: the state must be a dict with 'order' and 'cutoffs', got {type(state).__name__}")
        missing = [k for k in ("order", "cutoffs") if k not in state]
        if missing:
            raise ValueError(f"cluster map: the state has no {' and no '.join(missing)} "
                             f"(it holds {sorted(state.keys())}; expected 'order' and 'cutoffs')")
        return cls(state["order"], state["cutoffs"])


def default_cutoffs(vocab_size):
    """DEFAULT_CUTOFFS for GPT-2's 50,257 tokens; for another V the same fractions of it (4096/50257,
    16384/50257), each cluster at least one token; V < 3: a shortlist of 1 and one tail."""
    V = int(vocab_size)
    if V == DEFAULT_CUTOFFS[-1]:
        return DEFAULT_CUTOFFS
    if V < 3:
        return (1, V)
    c = [max(1, round(V * f / DEFAULT_CUTOFFS[-1])) for f in DEFAULT_CUTOFFS[:-1]]
    cuts = sorted(set(min(x, V - 1) for x in c))
    return tuple(cuts) + (V,)


def check_cutoffs(cutoffs, vocab_size, d_model, div):
    """A ValueError naming the flags when the adaptive head's settings cannot make a cluster map."""
    c = list(cutoffs)
    if len(c) < 2 or c[0] < 1 or any(b <= a for a, b in zip(c, c[1:])) or c[-1] != vocab_size:
        raise ValueError(f"--adaptive-cutoffs must be at least two ranks rising strictly from >= 1 to the "
                         f"vocabulary size {vocab_size} (a shortlist and one tail or more), "
                         f"got {','.join(map(str, c))}")
    if d_model // div ** (len(c) - 1) < 1:
        raise ValueError(f"--adaptive-div {div}: the last of {len(c) - 1} tail clusters would be "
                         f"{d_model} // {div}^{len(c) - 1} = 0 wide; use a smaller --adaptive-div or fewer cutoffs")


# ------------------------------------------------------------------------------------------------
# the map of a model's head, from its config (model.ModelConfig)


def n_hier_classes(cfg):
    return cfg.hier_classes or int(round(math.sqrt(cfg.vocab_size)))


def adaptive_cutoffs(cfg):
    return cfg.adaptive_cutoffs or default_cutoffs(cfg.vocab_size)


def head_map(cfg, counts=None):
    """The map of the vocabulary a model's head needs, from the training tokens' counts: the hier
    head's classes, the adaptive head's clusters, None for the full head. counts None: the Zipf
    prior of `default`, for a model made without data."""
    if cfg.head == "hier":
        n = n_hier_classes(cfg)
        return ClassMap.default(cfg.vocab_size, n) if counts is None else ClassMap.from_counts(counts, n)
    if cfg.head == "adaptive":
        c = adaptive_cutoffs(cfg)
        return ClusterMap.default(cfg.vocab_size, c) if counts is None else ClusterMap.from_counts(counts, c)
    return None
