"""From next-token logits to a sampled token: temperature, top-k, top-p (nucleus), greedy.

sample.py calls this once per generated token over the full V = 50,257 GPT-2 vocabulary, so
every step below is a few linear passes over one row of logits z (V,):

    greedy      temperature 0 (or None): the argmax, lowest token id on ties; no randomness
    temperature z' = z / T                        T > 1 flattens, T < 1 sharpens
    top-k       keep the k largest z'             ties at the k-th value: lowest token ids first
    top-p       p = softmax(z' over what top-k kept); walking tokens from most to least probable
                (lowest id first on ties), keep the shortest prefix whose cumulative probability
                reaches top_p, so always at least one token; top_p = 1 keeps everything
    sample      token ~ softmax(kept z'), by inverse CDF with one uniform draw from `rng`

That is the order of Hugging Face's generate(): temperature, then top-k, then top-p, so top-p
measures its nucleus on the distribution that top-k left behind.

API:
    filter_logits(logits, temperature=1.0, top_k=None, top_p=None) -> (..., V) float64, -inf = banned
    sample_token(logits (V,), rng, temperature=1.0, top_k=None, top_p=None) -> int
    sample_tokens(logits (..., V), rng, ...) -> int64 array (...)          one token per row
    sample_from_probs(probs (V,) or (N, V), rng) -> int or (N,) int64      any non-negative weights
(the hierarchical head's sampler in generate.py draws a class, then a token in it, each with
sample_token on that level's logits)

What it costs for V = 50,257: temperature alone is an exp and a cumulative sum over V. top-k
never sorts: np.partition finds the k-th largest value in linear time. top-p needs the
probabilities in descending order, but only their values, not which token has which, so it
sorts values (np.sort, SIMD) and then selects the tokens above the threshold it found; after a
top-k it sorts just those k values. (A stable argsort of all V, the textbook way, costs about
6 ms, more than a forward step of the model.) `python -m nanoternary.sampling` measures, per
token, on our 2-core VM:

    greedy 0.06 ms | temperature 0.4 ms | top_k=50 0.2-0.7 ms | top_p=0.9 1.3-2.0 ms
    top_k=50 + top_p=0.9 0.2-0.7 ms

The ranges are memory, not arithmetic: a fresh V-sized temporary (400 kB) costs about 0.35 ms of
page faults here when glibc has handed the previous one back to the OS (the low ends are with
MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=134217728 in the environment). That is
why the code below works in place on one private copy of the logits.

Determinism: the result depends only on the logits, the options and the Generator's state. Each
sampled row consumes exactly one rng.random() double; greedy consumes none. Batches are sampled
row by row (a Python loop over rows; each row's work is vectorised over V).
"""

import numpy as np

# ----------------------------------------------------------------------------------------------
# argument checks


def _is_real(v):
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _check_args(temperature, top_k, top_p):
    if temperature is not None:
        if not _is_real(temperature):
            raise ValueError(f"temperature must be a number >= 0 (0 or None = greedy), got {temperature!r}")
        if not (np.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 or None = greedy), got {temperature!r}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
            raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 (None disables it), got {top_k}")
    if top_p is not None:
        if not _is_real(top_p) or not (0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (None or 1 disables it), got {top_p!r}")


def _check_rng(rng):
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a np.random.Generator, e.g. np.random.default_rng(seed); got {type(rng).__name__}")


def _as_rows(logits, who):
    """logits (..., V) -> float64 rows (N, V) and the leading shape (...).

    Always a copy, never the caller's array, so that everything after it can work in place:
    each extra V-sized temporary can cost more in page faults than the exp over it (see top).
    """
    x = np.array(logits, dtype=np.float64)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"{who}: logits must have shape (..., V) with V >= 1, got shape {x.shape}")
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


_FLOAT64_MAX = float(np.finfo(np.float64).max)


def _is_greedy(temperature):
    return temperature is None or temperature == 0


# ----------------------------------------------------------------------------------------------
# one row: z (V,) -> the allowed token ids (ascending) and their tempered logits


def _largest_mask(v, k, kth):
    """Bool mask of the k largest entries of v (m,), given kth = the k-th largest value.

    Everything above kth is in; entries equal to kth fill the remaining places, leftmost
    (= lowest token id) first, so ties are settled the same way everywhere. (np.argpartition
    alone would pick among ties in an order that depends on its algorithm.)
    """
    keep = v > kth
    ties = np.flatnonzero(v == kth)[: k - np.count_nonzero(keep)]
    keep[ties] = True
    return keep


def _top_k(z, k):
    """Ids (ascending) of the k largest entries of z (V,), k < V. Linear time: a partition, no sort."""
    V = z.size
    kth = np.partition(z, V - k)[V - k]  # partition puts the k-th largest at position V - k
    return np.flatnonzero(_largest_mask(z, k, kth))


def _nucleus_mask(v, top_p):
    """Bool mask of the top-p nucleus of v (m,), logits in ascending token-id order.

    With the values sorted descending, s_0 >= s_1 >= ..., the cumulative probability is
        c_n = sum_{i<=n} exp(s_i - s_0) / sum_all exp(s_i - s_0),   c_{m-1} = 1 exactly,
    and the nucleus is the first n+1 of them where n = #{c_i < top_p}: the tokens before the
    crossing and the one that crosses. Since c_{m-1} = 1 >= top_p, n+1 <= m. Which tokens those
    are follows from the value s_n alone: the n+1 largest entries of v, ties lowest id first.
    """
    s = np.sort(v)[::-1]  # values only: which token has which does not matter yet
    c = s - s[0]
    np.exp(c, out=c)
    np.cumsum(c, out=c)
    c /= c[-1]
    n = int(np.count_nonzero(c < top_p))  # c is non-decreasing, so these are c_0 .. c_{n-1}
    return _largest_mask(v, n + 1, s[n])


def _filter_row(z, temperature, top_k, top_p):
    """z (V,) float64 logits -> (ids, vals): allowed ids ascending (None = all V) and z / temperature at them.

    z is our own copy (see _as_rows) and is divided by the temperature in place; when no filter
    removes anything, vals is z itself.
    """
    V = z.size
    zmax = z.max()  # NaN propagates through max, so this one pass also checks for NaN
    if np.isnan(zmax):
        raise ValueError("logits contain NaN; cannot sample")
    if zmax == np.inf:
        raise ValueError("logits contain +inf; cannot sample")
    if zmax == -np.inf:
        raise ValueError("logits are all -inf (every token banned); cannot sample")
    if _is_greedy(temperature):  # greedy: every top-k and every nucleus contains the argmax anyway
        i = int(np.argmax(z))  # the first maximum: lowest id on ties
        return np.array([i]), z[[i]]  # a copy, not a view: filter_logits overwrites z
    if abs(float(zmax)) > _FLOAT64_MAX * float(temperature):  # zmax / temperature would overflow
        raise ValueError(f"logits / temperature overflow float64 (temperature {temperature!r}); use 0 for greedy")
    if temperature != 1:
        z /= temperature
    ids, vals = None, z
    if top_k is not None and top_k < V:
        ids = _top_k(z, top_k)
        vals = z[ids]
    if top_p is not None and top_p < 1:
        keep = _nucleus_mask(vals, top_p)
        ids = np.flatnonzero(keep) if ids is None else ids[keep]
        vals = vals[keep]
    return ids, vals


def _inverse_cdf(w, u):
    """Index drawn from non-negative weights w (m,) with a positive sum, by a uniform u in [0, 1).

    Entry i owns the interval [c_{i-1}, c_i) of the normalised cumulative sum c; u falls in
    exactly one: the first i with c_i > u (searchsorted side="right"). A zero-weight entry owns an
    empty interval, so it is never drawn, and dividing by the last cumulative value makes it
    exactly 1 > u, so the index is always in range. w is overwritten with c.
    """
    np.cumsum(w, out=w)
    w /= w[-1]
    return int(np.searchsorted(w, u, side="right"))


def _sample_row(z, rng, temperature, top_k, top_p):
    ids, vals = _filter_row(z, temperature, top_k, top_p)
    if _is_greedy(temperature):
        return int(ids[0])
    # stable softmax weights exp(v - max v), in place (vals is ours: z itself or a new z[ids]);
    # the shift keeps exp from overflowing, the normalisation happens in _inverse_cdf
    w = vals
    w -= w.max()
    np.exp(w, out=w)
    j = _inverse_cdf(w, rng.random())
    return j if ids is None else int(ids[j])


# ----------------------------------------------------------------------------------------------
# public API


def filter_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """Apply temperature, top-k and top-p to logits (V,) or (..., V) -> float64 of the same shape.

    Allowed tokens get logits / temperature, banned ones -inf, so softmax(result) is exactly the
    distribution sample_tokens draws from. Greedy (temperature 0 or None) keeps only the argmax,
    at its original logit. top_k >= V and top_p = 1 (or None) change nothing.
    """
    _check_args(temperature, top_k, top_p)
    x, lead = _as_rows(logits, "filter_logits")  # our copy: filtered row by row in place
    for r in range(x.shape[0]):
        ids, vals = _filter_row(x[r], temperature, top_k, top_p)
        if ids is not None:  # (if None, x[r] already holds x[r] / temperature)
            x[r] = -np.inf
            x[r, ids] = vals
    return x.reshape(*lead, x.shape[-1])


def sample_tokens(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """One token per row of logits (..., V) -> int64 array of shape (...). Options as filter_logits."""
    _check_args(temperature, top_k, top_p)
    _check_rng(rng)
    x, lead = _as_rows(logits, "sample_tokens")
    tokens = [_sample_row(x[r], rng, temperature, top_k, top_p) for r in range(x.shape[0])]
    return np.array(tokens, dtype=np.int64).reshape(lead)


def sample_token(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """One token id from next-token logits (V,) -> int. Options as filter_logits."""
    _check_args(temperature, top_k, top_p)
    _check_rng(rng)
    if np.ndim(logits) != 1:
        raise ValueError(f"sample_token takes one row of logits (V,), got shape {np.shape(logits)}; use sample_tokens")
    x, _ = _as_rows(logits, "sample_token")
    return _sample_row(x[0], rng, temperature, top_k, top_p)


def sample_from_probs(probs, rng):
    """Draw index i with probability probs[i] / sum(probs): (V,) -> int, (N, V) -> (N,) int64.

    probs may be unnormalised, any non-negative weights with a positive sum per row; zero-weight
    entries are never drawn. One rng.random() double per row.
    """
    _check_rng(rng)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim not in (1, 2) or p.shape[-1] == 0:
        raise ValueError(f"sample_from_probs: probs must have shape (V,) or (N, V) with V >= 1, got {p.shape}")
    rows = p.reshape(-1, p.shape[-1])
    if not np.isfinite(rows).all() or (rows < 0).any():
        raise ValueError("sample_from_probs: probs must be finite and non-negative")
    if not (rows.sum(axis=-1) > 0).all():
        raise ValueError("sample_from_probs: every row of probs needs a positive sum")
    j = np.array([_inverse_cdf(row.copy(), rng.random()) for row in rows], dtype=np.int64)
    return int(j[0]) if p.ndim == 1 else j


if __name__ == "__main__":
    # benchmark: time per sampled token for the GPT-2 vocabulary, each option on its own
    import time

    V = 50257
    logits = (np.random.default_rng(0).standard_normal(V) * 2).astype(np.float32)  # as the model emits
    rng = np.random.default_rng(0)
    print(f"sample_token on float32 logits (V={V:,}), best of 5 runs of 200 calls")
    for opts in [dict(temperature=0), dict(temperature=1.0), dict(temperature=0.8), dict(top_k=50),
                 dict(top_p=0.9), dict(top_k=50, top_p=0.9), dict(top_k=1000, top_p=0.9)]:
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(200):
                sample_token(logits, rng, **opts)
            best = min(best, (time.perf_counter() - t0) / 200)
        print(f"  {', '.join(f'{k}={v}' for k, v in opts.items()):<28} {1e3 * best:6.3f} ms")
