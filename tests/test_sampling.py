"""Tests for nanoternary/sampling.py: temperature, top-k, top-p and greedy sampling.

The allowed sets are recomputed here the slow, obvious way (a stable argsort and a Python loop)
and compared with filter_logits exactly; draws are checked to stay inside them; frequencies are
compared with softmax(logits / T). Every test uses a fixed seed, so none can flake.
Run: python -m pytest -q tests/test_sampling.py
"""

import numpy as np
import pytest

from nanoternary.sampling import filter_logits, sample_from_probs, sample_token, sample_tokens


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def ref_top_k(z, k):
    """The k largest entries of z, lowest id first on ties, by a full stable sort."""
    order = np.argsort(-z, kind="stable")
    return set(order[:k].tolist())


def ref_nucleus(z, top_p, allowed=None):
    """The smallest most-probable set with probability >= top_p, walking a stable sort."""
    ids = np.arange(z.size) if allowed is None else np.array(sorted(allowed))
    p = softmax(z[ids])
    kept, total = set(), 0.0
    for i in np.argsort(-p, kind="stable"):
        kept.add(int(ids[i]))
        total += p[i]
        if total >= top_p:
            break
    return kept


def allowed_set(filtered):
    return set(np.flatnonzero(np.isfinite(filtered)).tolist())


def draws(logits, seed, n, **kw):
    rng = np.random.default_rng(seed)
    return np.array([sample_token(logits, rng, **kw) for _ in range(n)])


# ----------------------------------------------------------------------------------------------
# greedy, determinism


def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    for V in (1, 2, 17, 50257):
        z = rng.standard_normal(V).astype(np.float32)
        g = np.random.default_rng(1)
        state = g.bit_generator.state
        for temperature in (0, 0.0, None):
            assert sample_token(z, g, temperature) == int(np.argmax(z))
            assert sample_token(z, g, temperature, top_k=3, top_p=0.5) == int(np.argmax(z))
        assert g.bit_generator.state == state, "greedy decoding must not draw from rng"
    z = np.array([0.0, 2.0, 1.0, 2.0])  # tie: the lowest id wins, like np.argmax
    assert sample_token(z, np.random.default_rng(0), 0) == 1
    f = filter_logits(z, 0)
    assert f.tolist() == [-np.inf, 2.0, -np.inf, -np.inf]
    # batched: argmax per row
    Z = rng.standard_normal((3, 4, 50))
    assert np.array_equal(sample_tokens(Z, np.random.default_rng(0), 0), Z.argmax(-1))


def test_same_seed_same_draws():
    z = np.random.default_rng(0).standard_normal(1000) * 2
    for kw in ({}, {"temperature": 0.7}, {"top_k": 40}, {"top_p": 0.8}, {"top_k": 100, "top_p": 0.9, "temperature": 1.3}):
        a, b = draws(z, 123, 50, **kw), draws(z, 123, 50, **kw)
        assert np.array_equal(a, b), kw
        assert not np.array_equal(a, draws(z, 124, 50, **kw)), f"seed has no effect for {kw}"


def test_batched_matches_row_by_row():
    # sample_tokens consumes one double per row, in row order: same as sample_token per row
    Z = np.random.default_rng(0).standard_normal((2, 3, 300))
    for kw in ({}, {"top_k": 20, "temperature": 0.8}, {"top_p": 0.7}):
        got = sample_tokens(Z, np.random.default_rng(5), **kw)
        assert got.shape == (2, 3) and got.dtype == np.int64
        g = np.random.default_rng(5)
        want = [[sample_token(Z[b, t], g, **kw) for t in range(3)] for b in range(2)]
        assert got.tolist() == want, kw


def test_inputs_are_not_modified():
    z = np.random.default_rng(0).standard_normal((2, 100))
    z0 = z.copy()
    filter_logits(z, 0.5, top_k=10, top_p=0.5)
    filter_logits(z, 0.5)
    sample_tokens(z, np.random.default_rng(0), temperature=0.5)
    sample_token(z[0], np.random.default_rng(0))
    assert np.array_equal(z, z0)


# ----------------------------------------------------------------------------------------------
# top-k


def test_top_k_allowed_set_and_draws():
    rng = np.random.default_rng(0)
    for V, k in [(1000, 1), (1000, 10), (1000, 999), (50257, 50), (7, 7), (7, 100)]:
        z = rng.standard_normal(V) * 3
        want = ref_top_k(z, k)
        assert allowed_set(filter_logits(z, 1.0, top_k=k)) == want, (V, k)
        got = set(draws(z, 1, 400, temperature=4.0, top_k=k).tolist())  # hot: spreads the draws
        assert got <= want, f"top_k={k}: drew {sorted(got - want)[:5]} outside the top k"
        if k <= 10:
            assert got == want, f"top_k={k}: 400 hot draws should reach all k tokens"


def test_top_k_ties_take_lowest_ids():
    z = np.array([1.0, 2.0, 0.0, 2.0, 3.0, 2.0, 2.0])
    # the 3 largest: 3.0 (id 4) and two of the four 2.0s: ids 1 and 3
    assert allowed_set(filter_logits(z, top_k=3)) == {4, 1, 3}
    assert allowed_set(filter_logits(np.zeros(10), top_k=4)) == {0, 1, 2, 3}
    z = np.array([[5.0, 5.0, 5.0, 1.0], [1.0, 5.0, 5.0, 5.0]])
    f = filter_logits(z, top_k=2)
    assert allowed_set(f[0]) == {0, 1} and allowed_set(f[1]) == {1, 2}


def test_top_k_keeps_values_and_normalises_over_the_kept():
    z = np.random.default_rng(3).standard_normal(200)
    f = filter_logits(z, 0.5, top_k=20)
    kept = np.isfinite(f)
    np.testing.assert_array_equal(f[kept], z[kept] / 0.5)
    assert np.isneginf(f[~kept]).all()
    assert np.array_equal(filter_logits(z, 0.5, top_k=200), z / 0.5)  # k >= V: nothing removed


# ----------------------------------------------------------------------------------------------
# top-p


def test_top_p_allowed_set_and_draws():
    rng = np.random.default_rng(0)
    for trial, (V, top_p, T) in enumerate([(1000, 0.5, 1.0), (1000, 0.9, 1.0), (1000, 0.9, 0.5),
                                           (1000, 0.99, 2.0), (1000, 0.01, 1.0), (50257, 0.9, 1.0),
                                           (50257, 0.3, 0.8), (3, 1.0, 1.0)]):
        z = rng.standard_normal(V) * 3
        want = ref_nucleus(z / T, top_p)
        assert allowed_set(filter_logits(z, T, top_p=top_p)) == want, (V, top_p, T)
        got = set(draws(z, trial, 300, temperature=T, top_p=top_p).tolist())
        assert got <= want, f"top_p={top_p}: drew {sorted(got - want)[:5]} outside the nucleus"


def test_top_p_boundary_and_ties():
    # four equal tokens: probabilities 0.25 each, cumulative 0.25, 0.5 exactly (n / 4 in floats)
    z = np.zeros(4)
    assert allowed_set(filter_logits(z, top_p=0.5)) == {0, 1}  # reaching p exactly is enough
    assert allowed_set(filter_logits(z, top_p=0.51)) == {0, 1, 2}
    assert allowed_set(filter_logits(z, top_p=0.01)) == {0}  # always at least one token
    assert allowed_set(filter_logits(z, top_p=1.0)) == {0, 1, 2, 3}
    # one dominant token makes a nucleus of one, whatever p below its probability
    z = np.array([0.0, 10.0, 0.0, 1.0])
    assert allowed_set(filter_logits(z, top_p=0.9)) == {1}
    assert draws(z, 0, 50, top_p=0.9).tolist() == [1] * 50


def test_top_k_and_top_p_combined():
    # top-p is measured on the distribution renormalised over what top-k kept
    rng = np.random.default_rng(0)
    for trial, (V, k, top_p, T) in enumerate([(1000, 50, 0.8, 1.0), (1000, 200, 0.5, 2.0),
                                              (1000, 5, 0.99, 1.0), (50257, 40, 0.9, 0.7)]):
        z = rng.standard_normal(V) * 2
        want = ref_nucleus(z / T, top_p, allowed=ref_top_k(z, k))
        assert allowed_set(filter_logits(z, T, top_k=k, top_p=top_p)) == want, (V, k, top_p)
        got = set(draws(z, trial, 300, temperature=T, top_k=k, top_p=top_p).tolist())
        assert got <= want
    # a case where the order matters: with top_k=2 the nucleus of p=0.6 is smaller than without
    z = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    assert allowed_set(filter_logits(z, top_p=0.6)) == {0, 1}  # 0.4 + 0.3 of the full softmax
    assert allowed_set(filter_logits(z, top_k=2, top_p=0.55)) == {0}  # 0.4 / 0.7 = 0.57 >= 0.55


# ----------------------------------------------------------------------------------------------
# the distribution itself


def test_frequencies_follow_softmax_of_logits_over_temperature():
    z = np.array([1.0, 0.5, 0.0, -1.0, 2.0])
    n = 10000
    for T in (0.5, 1.0, 2.0):
        rng = np.random.default_rng(7)
        counts = np.bincount(sample_tokens(np.broadcast_to(z, (n, 5)), rng, temperature=T), minlength=5)
        p = softmax(z / T)
        # standard error of each frequency <= sqrt(0.25 / n) = 0.005; allow 0.02 (4 sigma)
        np.testing.assert_allclose(counts / n, p, atol=0.02, err_msg=f"temperature {T}")
        np.testing.assert_allclose(softmax(filter_logits(z, T)), p, rtol=1e-12)
    # lower temperature sharpens: the top token's share grows as T falls
    top = [np.mean(draws(z, 1, 2000, temperature=T) == 4) for T in (2.0, 1.0, 0.5, 0.25)]
    assert top == sorted(top), top


def test_banned_tokens_are_never_drawn():
    z = np.full(100, -np.inf)
    z[[3, 50, 97]] = [0.0, 1.0, 0.5]
    assert set(draws(z, 0, 300, temperature=5.0).tolist()) == {3, 50, 97}
    assert set(draws(z, 0, 300, temperature=5.0, top_k=10).tolist()) == {3, 50, 97}  # k > finite count
    assert set(draws(z, 0, 300, temperature=5.0, top_p=0.999).tolist()) == {3, 50, 97}


def test_sample_from_probs():
    p = np.array([0.0, 3.0, 0.0, 1.0, 0.0])  # unnormalised, zeros at both ends and between
    got = np.array([sample_from_probs(p, np.random.default_rng(s)) for s in range(2000)])
    assert set(got.tolist()) == {1, 3}
    assert abs(np.mean(got == 1) - 0.75) < 0.04
    P = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    out = sample_from_probs(P, np.random.default_rng(0))
    assert out.shape == (3,) and out[0] == 0 and out[1] == 1
    assert isinstance(sample_from_probs(p, np.random.default_rng(0)), int)
    for bad in ([0.5, -0.1], [np.nan, 1.0], [0.0, 0.0], np.ones((2, 2, 2))):
        with pytest.raises(ValueError):
            sample_from_probs(np.array(bad), np.random.default_rng(0))


# ----------------------------------------------------------------------------------------------
# bad arguments


@pytest.mark.parametrize("kw, match", [
    ({"top_k": 0}, "top_k must be >= 1"),
    ({"top_k": -3}, "top_k must be >= 1"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"top_k": True}, "top_k must be an integer"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"top_p": -0.1}, r"top_p must be in \(0, 1\]"),
    ({"top_p": float("nan")}, r"top_p must be in \(0, 1\]"),
    ({"temperature": -1.0}, "temperature must be a finite number >= 0"),
    ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
    ({"temperature": float("inf")}, "temperature must be a finite number >= 0"),
    ({"temperature": "hot"}, "temperature must be a number"),
])
def test_invalid_arguments(kw, match):
    z = np.zeros(10)
    with pytest.raises(ValueError, match=match):
        filter_logits(z, **kw)
    with pytest.raises(ValueError, match=match):
        sample_token(z, np.random.default_rng(0), **kw)


def test_invalid_logits_and_rng():
    g = np.random.default_rng(0)
    for z, match in [([1.0, np.nan], "NaN"), ([1.0, np.inf], r"\+inf"), ([-np.inf, -np.inf], "all -inf")]:
        with pytest.raises(ValueError, match=match):
            sample_token(np.array(z), g)
        with pytest.raises(ValueError, match=match):
            filter_logits(np.array(z), 0)
    with pytest.raises(ValueError, match="V >= 1"):
        sample_token(np.zeros(0), g)
    with pytest.raises(ValueError, match="use sample_tokens"):
        sample_token(np.zeros((2, 3)), g)
    with pytest.raises(ValueError, match="overflow"):
        sample_token(np.array([0.0, 1e300]), g, temperature=1e-300)
    with pytest.raises(TypeError, match="np.random.Generator"):
        sample_token(np.zeros(3), 0)
    with pytest.raises(TypeError, match="np.random.Generator"):
        sample_tokens(np.zeros((1, 3)), np.random.RandomState(0))
