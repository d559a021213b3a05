"""Every op's backward against float64 central differences, and the fast kernels against their
plain references."""
import numpy as np
import pytest

from gradcheck import check_grad, check_op, numerical_grad
from nanoternary.ops.conv import conv1d_backward, conv1d_forward, conv1d_forward_naive
from nanoternary.ops.embedding import embedding_backward, embedding_forward
from nanoternary.ops.gates import (relu2_glu_backward, relu2_glu_forward, sigmoid_gate_backward,
                                   sigmoid_gate_forward)
from nanoternary.ops.head import log_softmax, softmax_ce_forward, softmax_ce_fused
from nanoternary.ops.norm import rmsnorm_backward, rmsnorm_forward
from nanoternary.ops.ternary import (addsub_matmul, addsub_plan, ternary_linear_backward,
                                     ternary_linear_forward, ternary_quantize, ternary_ste_backward)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ----------------------------------------------------------------------------- gradient checks

def test_rmsnorm_grad(rng):
    x = rng.standard_normal((2, 3, 7))
    g = rng.standard_normal(7)
    check_op("rmsnorm", rmsnorm_forward, rmsnorm_backward, [x, g], rng, names=["x", "g"])


def test_sigmoid_gate_grad(rng):
    a, v = rng.standard_normal((2, 3, 5)) * 3, rng.standard_normal((2, 3, 5))
    check_op("sigmoid_gate", sigmoid_gate_forward, sigmoid_gate_backward, [a, v], rng, names=["a", "v"])


def test_relu2_glu_grad(rng):
    a, u = rng.standard_normal((6, 9)), rng.standard_normal((6, 9))
    a[np.abs(a) < 1e-3] = 0.5  # keep away from the kink at 0, where d(relu^2) is 0 from both sides anyway
    check_op("relu2_glu", relu2_glu_forward, relu2_glu_backward, [a, u], rng, names=["a", "u"])


@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_ternary_linear_grad(rng, scale):
    x = rng.standard_normal((5, 6))
    wt, _ = ternary_quantize(rng.standard_normal((4, 6)))
    fwd = lambda x, wt: ternary_linear_forward(x, wt, scale)
    check_op("ternary_linear", fwd, ternary_linear_backward, [x, wt], rng, names=["x", "W_t"])


@pytest.mark.parametrize("B,T,C_in,C_out,G,K,D", [
    (2, 7, 4, 6, 2, 3, 2),     # grouped, C_out != C_in
    (2, 9, 6, 6, 6, 2, 3),     # depthwise
    (1, 5, 4, 4, 1, 4, 1),     # dense
    (2, 4, 4, 4, 2, 3, 5),     # receptive field longer than the sequence
])
def test_conv_grad(rng, B, T, C_in, C_out, G, K, D):
    x = rng.standard_normal((B, T, C_in))
    w = rng.standard_normal((C_out, C_in // G, K))
    fwd = lambda x, w: conv1d_forward(x, w, D, G)
    check_op("conv1d", fwd, conv1d_backward, [x, w], rng, names=["x", "w"])


def test_embedding_grad_with_repeats(rng):
    E = rng.standard_normal((5, 3))
    idx = np.array([[0, 2, 2], [4, 2, 0]])  # token 2 three times: add.at must sum all three
    y, cache = embedding_forward(idx, E)
    R = rng.standard_normal(y.shape)
    dE = embedding_backward(R, cache)
    num = numerical_grad(lambda: float(np.sum(embedding_forward(idx, E)[0] * R)), E)
    check_grad("embedding: E", dE, num)
    # what the comment in embedding.py warns about: buffered fancy-index += loses repeats
    wrong = np.zeros_like(E)
    wrong[idx.reshape(-1)] += R.reshape(-1, 3)
    assert not np.allclose(wrong[2], dE[2])


@pytest.mark.parametrize("eps,z,frac", [(0.0, 0.0, 1.0), (0.1, 1e-4, 1.0), (0.1, 0.3, 0.5)])
@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_head_grad(rng, eps, z, frac, chunk):
    N, C, V = 10, 4, 13
    h = rng.standard_normal((N, C))
    E = rng.standard_normal((V, C))
    y = rng.integers(0, V, N)
    rows = None if frac == 1.0 else np.sort(rng.choice(N, int(N * frac), replace=False))
    loss = lambda: softmax_ce_fused(h, E, y, rows, eps, z, chunk)[0]
    _, dh, dE = softmax_ce_fused(h, E, y, rows, eps, z, chunk)
    check_grad(f"head eps={eps} z={z}: h", dh, numerical_grad(loss, h))
    check_grad(f"head eps={eps} z={z}: E", dE, numerical_grad(loss, E))
    if rows is not None:
        unused = np.setdiff1d(np.arange(N), rows)
        assert np.all(dh[unused] == 0), "rows outside the counted positions must get no gradient"


# ----------------------------------------------------------------------------- references

def _head_reference(h, E, y, eps, z):
    """One-shot, unchunked: the whole (N, V) logits matrix at once."""
    L = h @ E.T
    lse = np.log(np.exp(L - L.max(1, keepdims=True)).sum(1)) + L.max(1)
    nll = lse - L[np.arange(len(y)), y]
    return float(np.mean((1 - eps) * nll + eps * (lse - L.mean(1)) + z * lse ** 2))


@pytest.mark.parametrize("chunk", [1, 3, 7, 16, 100])
def test_head_chunked_equals_one_shot(rng, chunk):
    N, C, V = 16, 8, 50
    h, E = rng.standard_normal((N, C)), rng.standard_normal((V, C))
    y = rng.integers(0, V, N)
    for eps, z in [(0.0, 0.0), (0.1, 1e-4)]:
        ref = _head_reference(h, E, y, eps, z)
        loss, dh, dE = softmax_ce_fused(h, E, y, None, eps, z, chunk)
        loss1, dh1, dE1 = softmax_ce_fused(h, E, y, None, eps, z, chunk=N)
        assert abs(loss - ref) < 1e-12, (chunk, loss, ref)
        np.testing.assert_allclose(dh, dh1, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(dE, dE1, rtol=1e-12, atol=1e-15)
    nll = softmax_ce_forward(h, E, y, chunk)
    assert abs(nll.mean() - _head_reference(h, E, y, 0.0, 0.0)) < 1e-12
    lp = log_softmax(h, E)
    np.testing.assert_allclose(np.exp(lp).sum(1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(-lp[np.arange(N), y], nll, rtol=1e-12)


def test_head_shift_free_path_equals_max_shift(rng):
    """Small logits skip softmax's max-shift (a Cauchy-Schwarz bound proves it safe); the result is
    the same as with the shift."""
    import nanoternary.ops.head as head
    N, C, V = 9, 6, 40
    h, E = rng.standard_normal((N, C)), rng.standard_normal((V, C)) * 0.3
    y = rng.integers(0, V, N)
    assert head._logit_bound(h, E) < head.SAFE_LOGIT
    fast = softmax_ce_fused(h, E, y, None, 0.1, 1e-3, chunk=4)
    saved = head.SAFE_LOGIT
    head.SAFE_LOGIT = -1.0                                   # force the max-shift path
    try:
        slow = softmax_ce_fused(h, E, y, None, 0.1, 1e-3, chunk=4)
        slow_nll = softmax_ce_forward(h, E, y, 4)
    finally:
        head.SAFE_LOGIT = saved
    assert abs(fast[0] - slow[0]) < 1e-12
    np.testing.assert_allclose(fast[1], slow[1], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(fast[2], slow[2], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(softmax_ce_forward(h, E, y, 4), slow_nll, rtol=1e-12)


def test_head_float32_large_logits(rng):
    """Logits far beyond exp's float32 range still give a finite, correct loss (max-shift)."""
    N, C, V = 6, 4, 30
    h = rng.standard_normal((N, C)).astype(np.float32) * 30
    E = rng.standard_normal((V, C)).astype(np.float32) * 30
    y = rng.integers(0, V, N)
    loss, dh, dE = softmax_ce_fused(h, E, y, chunk=4)
    ref = _head_reference(h.astype(np.float64), E.astype(np.float64), y, 0.0, 0.0)
    assert np.isfinite(loss) and abs(loss - ref) / ref < 1e-4
    assert np.isfinite(dh).all() and np.isfinite(dE).all()


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
