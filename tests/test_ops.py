"""The ops beyond their gradients (those are in test_gradcheck.py): the conv against its plain-loop
reference and causal, the quantizer and the STE, the add/subtract kernel, the textbook head."""
import numpy as np
import pytest

from nanoternary.ops.conv import conv1d_forward, conv1d_forward_naive
from nanoternary.ops.embedding import embedding_backward, embedding_forward
from nanoternary.ops.head import log_softmax, nll, softmax_ce_backward, softmax_ce_forward
from nanoternary.ops.ternary import (addsub_matmul, addsub_plan, ternary_linear_backward,
                                     ternary_linear_forward, ternary_quantize, ternary_ste_backward)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ----------------------------------------------------------------------------- the textbook head

def test_textbook_head_against_a_one_line_reference(rng):
    N, C, V = 16, 8, 50
    h, E = rng.standard_normal((N, C)), rng.standard_normal((V, C))
    y = rng.integers(0, V, N)
    for eps, z in [(0.0, 0.0), (0.1, 1e-4)]:
        L = h @ E.T
        lse = np.log(np.exp(L - L.max(1, keepdims=True)).sum(1)) + L.max(1)
        ref = np.mean((1 - eps) * (lse - L[np.arange(N), y]) + eps * (lse - L.mean(1)) + z * lse ** 2)
        loss, _ = softmax_ce_forward(h, E, y, eps, z)
        assert abs(loss - ref) < 1e-12, (eps, z, loss, ref)
    logp = log_softmax(h @ E.T)
    np.testing.assert_allclose(np.exp(logp).sum(1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(-logp[np.arange(N), y], nll(h, E, y), rtol=1e-12)


def test_textbook_head_float32_large_logits(rng):
    """Logits far beyond exp's float32 range still give a finite, correct loss (the max-shift)."""
    h = rng.standard_normal((6, 4)).astype(np.float32) * 30
    E = rng.standard_normal((30, 4)).astype(np.float32) * 30
    y = rng.integers(0, 30, 6)
    loss, cache = softmax_ce_forward(h, E, y)
    ref = nll(h.astype(np.float64), E.astype(np.float64), y).mean()
    assert np.isfinite(loss) and abs(loss - ref) / ref < 1e-4
    dh, dE = softmax_ce_backward(1.0, cache)
    assert np.isfinite(dh).all() and np.isfinite(dE).all()


def test_embedding_backward_sums_repeats(rng):
    E = rng.standard_normal((5, 3))
    idx = np.array([[0, 2, 2], [4, 2, 0]])  # token 2 three times: add.at must sum all three
    y, cache = embedding_forward(idx, E)
    R = rng.standard_normal(y.shape)
    dE = embedding_backward(R, cache)
    np.testing.assert_allclose(dE[2], R[0, 1] + R[0, 2] + R[1, 1])
    # what the comment in embedding.py warns about: buffered fancy-index += loses repeats
    wrong = np.zeros_like(E)
    wrong[idx.reshape(-1)] += R.reshape(-1, 3)
    assert not np.allclose(wrong[2], dE[2])


# ----------------------------------------------------------------------------- the conv

@pytest.mark.parametrize("B,T,C_in,C_out,G,K,D", [
    (2, 11, 8, 8, 4, 4, 3), (1, 6, 6, 6, 6, 3, 1), (3, 5, 4, 8, 2, 2, 4), (2, 70, 16, 16, 16, 4, 64)])
def test_conv_fast_equals_naive(rng, B, T, C_in, C_out, G, K, D):
    x = rng.standard_normal((B, T, C_in))
    w = rng.standard_normal((C_out, C_in // G, K))
    y, _ = conv1d_forward(x, w, D, G)
    np.testing.assert_allclose(y, conv1d_forward_naive(x, w, D, G), rtol=1e-12, atol=1e-12)


def test_conv_is_causal(rng):
    x = rng.standard_normal((1, 20, 4))
    w = rng.standard_normal((4, 2, 3))
    y, _ = conv1d_forward(x, w, 2, 2)
    x2 = x.copy()
    x2[:, 12:] = rng.standard_normal((1, 8, 4))
    y2, _ = conv1d_forward(x2, w, 2, 2)
    np.testing.assert_array_equal(y[:, :12], y2[:, :12])
    assert not np.allclose(y[:, 12:], y2[:, 12:])


# ----------------------------------------------------------------------------- ternary

def test_quantizer_threshold_rule(rng):
    w = rng.standard_normal((7, 9))
    wt, s = ternary_quantize(w)
    a = np.abs(w).mean()
    assert set(np.unique(wt)) <= {-1.0, 0.0, 1.0} and s == 1.0
    np.testing.assert_array_equal(wt == 1, w > a)
    np.testing.assert_array_equal(wt == -1, w < -a)
    np.testing.assert_array_equal(wt == 0, np.abs(w) <= a)
    _, s = ternary_quantize(w, scale=True)
    assert np.isclose(s, a)


def test_straight_through_estimator(rng):
    """Backward through the ternary linear = backward of a plain linear on the quantized weight for
    the input; the latent weight receives dW_t unchanged."""
    x, w = rng.standard_normal((5, 6)), rng.standard_normal((4, 6))
    wt, s = ternary_quantize(w)
    dy = rng.standard_normal((5, 4))
    _, cache = ternary_linear_forward(x, wt, s)
    dx, dwt = ternary_linear_backward(dy, cache)
    np.testing.assert_allclose(dx, dy @ wt)          # plain linear y = x @ W_t^T on the quantized W_t
    np.testing.assert_allclose(dwt, dy.T @ x)
    dw = ternary_ste_backward(dwt)
    np.testing.assert_array_equal(dw, dy.T @ x)      # passed straight through to the latent weight
    assert np.abs(dw).sum() > 0


@pytest.mark.parametrize("shape", [(3, 5, 8), (1, 1), (17, 31), (64, 3)])
def test_addsub_equals_blas(rng, shape):
    N, I = shape[0], shape[-1]
    x = rng.standard_normal((N, I)).astype(np.float32)
    for O in (1, 7, 40):
        w = rng.standard_normal((O, I)).astype(np.float32)
        w[0] = 0.0 if O > 1 else w[0]                 # an all-zero row: empty runs in the kernel
        wt, s = ternary_quantize(w)
        y_blas, _ = ternary_linear_forward(x, wt, s, kernel="blas")
        y_add, _ = ternary_linear_forward(x, wt, s, kernel="addsub")
        np.testing.assert_allclose(y_add, y_blas, rtol=1e-5, atol=1e-5)
    wt64 = ternary_quantize(rng.standard_normal((9, I)))[0]
    x64 = rng.standard_normal((N, I))
    np.testing.assert_allclose(addsub_matmul(x64, addsub_plan(wt64)), x64 @ wt64.T, rtol=1e-12, atol=1e-12)


class _UfuncSpy(np.ndarray):
    """An array that records every ufunc (add, multiply, ...) applied to it or to arrays made from it."""
    calls = []

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _UfuncSpy.calls.append(f"{ufunc.__name__}.{method}")
        plain = [i.view(np.ndarray) if isinstance(i, _UfuncSpy) else i for i in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(o.view(np.ndarray) if isinstance(o, _UfuncSpy) else o
                                  for o in kwargs["out"])
        result = getattr(ufunc, method)(*plain, **kwargs)
        return result.view(_UfuncSpy) if isinstance(result, np.ndarray) else result


def test_addsub_uses_only_additions_and_subtractions(rng):
    """Every arithmetic operation the addsub kernel applies to the activations is an add or a subtract."""
    wt = ternary_quantize(rng.standard_normal((6, 10)))[0]
    wt[2] = 0.0
    x = rng.standard_normal((4, 10))
    _UfuncSpy.calls = []
    y = addsub_matmul(x.view(_UfuncSpy), addsub_plan(wt))
    np.testing.assert_allclose(np.asarray(y), x @ wt.T, rtol=1e-12, atol=1e-12)
    ops = {c.split(".")[0] for c in _UfuncSpy.calls}
    assert ops and ops <= {"add", "subtract"}, _UfuncSpy.calls
    # and the spy does see a multiplication when there is one
    _UfuncSpy.calls = []
    _ = x.view(_UfuncSpy) * 2.0
    assert _UfuncSpy.calls == ["multiply.__call__"]
