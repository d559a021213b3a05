"""The adaptive softmax head: an exact distribution over all V tokens, the loss it trains, the
cluster map, PyTorch's AdaptiveLogSoftmaxWithLoss as a second implementation, and the fast version
equal to the plain one."""
import numpy as np
import pytest

from nanoternary.classmap import DEFAULT_CUTOFFS, ClusterMap, default_cutoffs
from nanoternary.gradcheck import adaptive_setup
from nanoternary.ops.adaptive_head import (adaptive_ce_backward, adaptive_ce_forward, adaptive_log_probs,
                                           adaptive_nll, adaptive_weight_grads, adaptive_weights, tail_widths)


@pytest.fixture
def setup():
    return adaptive_setup(np.random.default_rng(7), V=41, C=8, cutoffs=(6, 15, 30, 41), div=2, N=25)


def test_probabilities_sum_to_one_over_every_token(setup):
    cmap, y, h, W_head, tails = setup
    for scale in (0.1, 1.0, 10.0):
        lp = adaptive_log_probs(h * scale, W_head, tails, cmap)
        assert lp.shape == (h.shape[0], cmap.vocab_size)
        np.testing.assert_allclose(np.exp(lp).sum(1), 1.0, rtol=1e-12)
        np.testing.assert_allclose(adaptive_nll(h * scale, W_head, tails, cmap, y), -lp[np.arange(len(y)), y],
                                   rtol=1e-12)


def test_loss_is_the_mean_nll_without_options(setup):
    cmap, y, h, W_head, tails = setup
    assert set(cmap.token_cluster[y]) == {0, 1, 2, 3}            # every level is exercised
    loss, _ = adaptive_ce_forward(h, W_head, tails, cmap, y)
    assert abs(loss - adaptive_nll(h, W_head, tails, cmap, y).mean()) < 1e-12


def test_smoothing_and_z_loss_apply_per_level(setup):
    """loss = sum over the levels a row goes through of (1-eps) nll + eps (lse - mean l) + z lse^2."""
    cmap, y, h, W_head, tails = setup
    eps, z = 0.1, 0.03

    def level(logits, t):
        lse = logits.max() + np.log(np.exp(logits - logits.max()).sum())
        return (1 - eps) * (lse - logits[t]) + eps * (lse - logits.mean()) + z * lse ** 2
    want = []
    for n in range(len(y)):
        c, pos = cmap.token_cluster[y[n]], cmap.position[y[n]]
        a = W_head @ h[n]
        row = level(a, pos if c == 0 else cmap.shortlist_size + c - 1)
        if c:
            P, W = tails[c - 1]
            row += level(W @ (P @ h[n]), pos)
        want.append(row)
    loss, _ = adaptive_ce_forward(h, W_head, tails, cmap, y, eps, z)
    assert abs(loss - np.mean(want)) < 1e-12


def test_a_tail_without_targets_gets_zero_gradients(setup):
    cmap, y, h, W_head, tails = setup
    y = np.where(cmap.token_cluster[y] == 2, cmap.members(0)[0], y)      # nothing in tail 2
    _, cache = adaptive_ce_forward(h, W_head, tails, cmap, y, 0.1, 0.01)
    dh, dW_head, dtails = adaptive_ce_backward(1.0, cache)
    assert not dtails[1][0].any() and not dtails[1][1].any() and dtails[0][1].any()
    assert dtails[1][0].shape == tails[1][0].shape and dtails[1][1].shape == tails[1][1].shape


def test_tied_weights_are_the_embedding_rows(setup):
    cmap, y, h, _, tails = setup
    r = np.random.default_rng(0)
    E, cw = r.standard_normal((cmap.vocab_size, 8)), r.standard_normal((cmap.n_tails, 8))
    projs = [P for P, _ in tails]
    W_head, tw = adaptive_weights(E, cw, projs, cmap)
    S = cmap.shortlist_size
    assert np.array_equal(W_head[:S], E[cmap.members(0)]) and np.array_equal(W_head[S:], cw)
    for i, (P, W) in enumerate(tw, start=1):
        assert P is projs[i - 1] and np.array_equal(W, E[cmap.members(i), :P.shape[0]])
    dW_head = r.standard_normal(W_head.shape)
    dtails = [(r.standard_normal(P.shape), r.standard_normal(W.shape)) for P, W in tw]
    dE, dcw, dprojs = adaptive_weight_grads(dW_head, dtails, cmap, E.shape)
    assert np.array_equal(dcw, dW_head[S:]) and all(a is b for a, (b, _) in zip(dprojs, dtails))
    # each token's gradient lands in its own row, in the columns its vector uses
    t = cmap.members(2)[3]
    assert np.array_equal(dE[t, :tw[1][0].shape[0]], dtails[1][1][3]) and not dE[t, tw[1][0].shape[0]:].any()
    with pytest.raises(ValueError, match="3 tail clusters"):
        adaptive_weights(E, cw[:2], projs, cmap)


# ------------------------------------------------------------------------------- the cluster map

def test_cluster_map_from_counts():
    V = 100
    counts = np.random.default_rng(1).integers(0, 1000, V)
    counts[[17, 42]] = 10 ** 6                                    # the two most frequent tokens
    m = ClusterMap.from_counts(counts, (10, 40, 100))
    assert list(m.order[:2]) == [17, 42] and set(m.members(0)) >= {17, 42}
    assert m.shortlist_size == 10 and m.n_tails == 2 and list(m.sizes) == [10, 30, 60]
    ranked = np.lexsort((np.arange(V), -counts))                  # count down, then id
    assert np.array_equal(m.order, ranked)
    assert np.all(counts[m.members(0)].min() >= counts[m.members(1)].max())
    for i in range(3):                                            # lookups agree with the members
        mem = m.members(i)
        assert np.all(m.token_cluster[mem] == i) and np.array_equal(m.position[mem], np.arange(mem.size))
        assert np.array_equal(m.rank[mem], m.bounds[i] + np.arange(mem.size))
    y = np.array([m.members(0)[3], m.members(1)[0], m.members(2)[5]])
    assert list(m.head_targets(y)) == [3, 10, 11]
    # unseen tokens rank by id, behind every seen one
    counts[[5, 9]] = 0
    m = ClusterMap.from_counts(counts, (10, 40, 100))
    zero = np.flatnonzero(counts == 0)
    assert list(m.order[-zero.size:]) == sorted(zero)


def test_cluster_map_default_is_deterministic_and_zipf():
    a, b = ClusterMap.default(50257), ClusterMap.default(50257)
    assert np.array_equal(a.order, b.order) and tuple(a.cutoffs) == DEFAULT_CUTOFFS
    assert np.array_equal(a.order, np.arange(50257))              # GPT-2's id is the prior's rank
    assert default_cutoffs(23) == (2, 7, 23) and default_cutoffs(2) == (1, 2)
    for V in (2, 3, 23, 97, 1000):
        ClusterMap.default(V)                                     # valid for any V >= 2


def test_cluster_map_state_round_trip():
    m = ClusterMap.from_counts(np.random.default_rng(2).integers(0, 50, 60), (8, 20, 60))
    m2 = ClusterMap.from_state({k: v.copy() for k, v in m.state().items()})
    for k in ("order", "cutoffs", "token_cluster", "position", "rank"):
        assert np.array_equal(getattr(m2, k), getattr(m, k)), k


@pytest.mark.parametrize("state,match", [
    ({"cutoffs": np.array([2, 5])}, "no order"),
    ({"order": np.arange(5)}, "no cutoffs"),
    ({"order": np.array([0, 1, 1, 3, 4]), "cutoffs": np.array([2, 5])}, "every token id 0..4 exactly once"),
    ({"order": np.arange(5.0), "cutoffs": np.array([2, 5])}, "integer"),
    ({"order": np.arange(5), "cutoffs": np.array([3, 2, 5])}, "rise strictly"),
    ({"order": np.arange(5), "cutoffs": np.array([2, 4])}, "end at the vocabulary size 5"),
    ({"order": np.arange(5), "cutoffs": np.array([0, 5])}, "rise strictly from >= 1"),
    ({"order": np.arange(5), "cutoffs": np.array([5])}, "at least two"),
    ({"order": np.arange(5), "cutoffs": np.array([2.0, 5.0])}, "at least two integers"),
    ([1, 2], "must be a dict"),
])
def test_cluster_map_refuses_bad_states(state, match):
    with pytest.raises(ValueError, match=match):
        ClusterMap.from_state(state)


def test_cluster_map_refuses_bad_counts():
    with pytest.raises(ValueError, match="finite counts"):
        ClusterMap.from_counts(np.array([1.0, np.nan, 2.0]), (1, 3))
    with pytest.raises(ValueError, match="end at the vocabulary size"):
        ClusterMap.from_counts(np.ones(10), (4, 12))


# ------------------------------------------------------------------------------- against PyTorch

def test_matches_torch_adaptive_log_softmax_float64():
    """torch.nn.AdaptiveLogSoftmaxWithLoss (head_bias=False, the same cutoffs and div_value; its
    targets are frequency ranks): the loss, the log-probabilities and every gradient."""
    torch = pytest.importorskip("torch")
    r = np.random.default_rng(3)
    V, C, cutoffs, div, N = 50, 16, (6, 20, 50), 2, 40
    cmap, y, h, W_head, tails = adaptive_setup(r, V, C, cutoffs, div, N)
    assert tail_widths(C, div, 2) == (8, 4)                       # torch: C // div^(i+1), i = 0, 1
    loss, cache = adaptive_ce_forward(h, W_head, tails, cmap, y)
    dh, dW_head, dtails = adaptive_ce_backward(1.0, cache)

    asm = torch.nn.AdaptiveLogSoftmaxWithLoss(C, V, list(cutoffs[:-1]), div_value=float(div), head_bias=False)
    asm = asm.double()
    with torch.no_grad():
        asm.head.weight.copy_(torch.from_numpy(W_head))
        for i, (P, W) in enumerate(tails):
            asm.tail[i][0].weight.copy_(torch.from_numpy(P))
            asm.tail[i][1].weight.copy_(torch.from_numpy(W))
    th = torch.from_numpy(h.copy()).requires_grad_(True)
    out = asm(th, torch.from_numpy(cmap.rank[y]))
    out.loss.backward()

    def close(got, want, what):
        want = want.detach().numpy()
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 1e-12, f"{what}: relative error {err:.2e} against torch"
    close(np.array(loss), out.loss, "loss")
    close(dh, th.grad, "dh")
    close(dW_head, asm.head.weight.grad, "dW_head")
    for i, (dP, dW) in enumerate(dtails):
        close(dP, asm.tail[i][0].weight.grad, f"dP_{i + 1}")
        close(dW, asm.tail[i][1].weight.grad, f"dW_{i + 1}")
    close(adaptive_log_probs(h, W_head, tails, cmap)[:, cmap.order], asm.log_prob(th), "log_probs")


# ------------------------------------------------------------------------------- the fast version

def plain_on_rows(h, W_head, tails, cmap, y, rows, eps, z, denom=None):
    """The plain pair on the counted rows, dh scattered back, scaled to a share of `denom` rows:
    what the fused op computes."""
    hs, ys = (h, y) if rows is None else (h[rows], y[rows])
    loss, cache = adaptive_ce_forward(hs, W_head, tails, cmap, ys, eps, z)
    dhs, dW_head, dtails = adaptive_ce_backward(1.0, cache)
    k = hs.shape[0] / (denom or hs.shape[0])
    dh = np.zeros_like(h)
    dh[slice(None) if rows is None else rows] = dhs
    return loss * k, dh * k, dW_head * k, [(dP * k, dW * k) for dP, dW in dtails]


def assert_close(got, want, name, rtol=1e-10):
    err = np.abs(got - want).max(initial=0.0) / max(np.abs(want).max(initial=0.0), 1e-30)
    assert got.shape == want.shape and err <= rtol, f"{name}: relative difference {err:.2e} > {rtol:g}"


@pytest.mark.parametrize("eps,z", [(0.0, 0.0), (0.1, 1e-3), (0.2, 0.3)])
@pytest.mark.parametrize("use_rows", [False, True])
@pytest.mark.parametrize("scale", [0.3, 30.0])          # shift-free exp / max-shifted exp
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_fused_equals_plain_float64(setup, eps, z, use_rows, scale, workers):
    from nanoternary.fast.adaptive_head import adaptive_ce_fused
    cmap, y, h, W_head, tails = setup
    h = h * scale
    r = np.random.default_rng(5)
    rows = np.sort(r.choice(len(y), 17, replace=False)) if use_rows else None
    denom = 40 if use_rows else None
    want = plain_on_rows(h, W_head, tails, cmap, y, rows, eps, z, denom)
    for chunk in (4, 1024):
        loss, dh, dW_head, dtails = adaptive_ce_fused(h, W_head, tails, cmap, y, rows, eps, z, denom=denom,
                                                      workers=workers, chunk=chunk)
        assert abs(loss - want[0]) <= 1e-10 * abs(want[0])
        assert_close(dh, want[1], "dh")
        assert_close(dW_head, want[2], "dW_head")
        for i, ((dP, dW), (wP, wW)) in enumerate(zip(dtails, want[3]), start=1):
            assert_close(dP, wP, f"dP_{i}")
            assert_close(dW, wW, f"dW_{i}")
    # need_dW=False: the token vectors' gradients skipped, the rest unchanged
    loss, dh, dW_head, dtails = adaptive_ce_fused(h, W_head, tails, cmap, y, rows, eps, z, need_dW=False,
                                                  denom=denom, workers=workers)
    S = cmap.shortlist_size
    assert abs(loss - want[0]) <= 1e-10 * abs(want[0]) and not dW_head[:S].any()
    assert_close(dh, want[1], "dh")
    assert_close(dW_head[S:], want[2][S:], "dW_head cluster rows")
    for i, ((dP, dW), (wP, _)) in enumerate(zip(dtails, want[3]), start=1):
        assert dW is None
        assert_close(dP, wP, f"dP_{i}")


def test_fused_with_no_counted_rows_and_float32(setup):
    from nanoternary.fast.adaptive_head import adaptive_ce_fused
    cmap, y, h, W_head, tails = setup
    loss, dh, dW_head, dtails = adaptive_ce_fused(h, W_head, tails, cmap, y, np.array([], dtype=np.int64),
                                                  denom=10, workers=2)
    assert loss == 0.0 and not dh.any() and not dW_head.any() and not any(a.any() for t in dtails for a in t)
    f32 = lambda a: a.astype(np.float32)
    got = adaptive_ce_fused(f32(h), f32(W_head), [(f32(P), f32(W)) for P, W in tails], cmap, y, None, 0.1, 1e-4,
                            workers=2)
    want = plain_on_rows(h, W_head, tails, cmap, y, None, 0.1, 1e-4)
    assert got[1].dtype == np.float32 and got[2].dtype == np.float32
    assert abs(got[0] - want[0]) < 1e-5 * abs(want[0])
    assert_close(got[1], want[1], "dh", 1e-5)
    assert_close(got[2], want[2], "dW_head", 1e-5)
