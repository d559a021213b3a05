"""The speed layer (nanoternary/fast/) equals the plain code: the fused heads equal the textbook
ones for every option, the training step on several cores equals Model.loss_and_grads, the chunked
optimizer updates equal the plain ones bit for bit; and the thread and profiling machinery."""
import time

import numpy as np
import pytest

from nanoternary.fast import head as fhead
from nanoternary.fast import profile, threads
from nanoternary.fast import step as fast
from nanoternary.fast.hier_head import hier_ce_fused
from nanoternary.fast.optim import CHUNK, FastAdamW, FastEMA, FastNorMuon
from nanoternary.gradcheck import TINY, tiny_model
from nanoternary.model import Model, ModelConfig
from nanoternary.ops.head import nll, softmax_ce_backward, softmax_ce_forward
from nanoternary.classmap import ClassMap
from nanoternary.ops.hier_head import hier_ce_backward, hier_ce_forward
from nanoternary.optim import EMA, AdamW, NorMuon


@pytest.fixture
def rng():
    return np.random.default_rng(99)


def assert_close(got, want, name, rtol, atol=0.0):
    got, want = np.asarray(got), np.asarray(want)
    err = np.abs(got - want).max(initial=0.0) / max(np.abs(want).max(initial=0.0), 1e-30)
    assert got.shape == want.shape and err <= rtol or np.allclose(got, want, rtol=rtol, atol=atol), \
        f"{name}: relative difference {err:.2e} > {rtol:g}; first values {got.reshape(-1)[:4]} vs {want.reshape(-1)[:4]}"


def textbook_head(h, E, y, rows, eps, z, denom=None):
    """ops/head.py's pair, on the counted rows, with dh scattered back: what the fused head computes."""
    hs, ys = (h, y) if rows is None else (h[rows], y[rows])
    loss, cache = softmax_ce_forward(hs, E, ys, eps, z)
    dhs, dE = softmax_ce_backward(1.0, cache)
    n = hs.shape[0]
    k = n / (denom or n)                              # a shard's share of a larger batch's mean
    dh = np.zeros_like(h)
    dh[slice(None) if rows is None else rows] = dhs
    return loss * k, dh * k, dE * k


# ------------------------------------------------------------------------------------- the heads

@pytest.mark.parametrize("eps,z", [(0.0, 0.0), (0.1, 1e-4), (0.2, 0.3)])
@pytest.mark.parametrize("frac", [1.0, 0.5])
@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_fused_full_head_equals_textbook(rng, eps, z, frac, chunk):
    N, C, V = 10, 4, 13
    h, E, y = rng.standard_normal((N, C)), rng.standard_normal((V, C)), rng.integers(0, V, N)
    rows = None if frac == 1.0 else np.sort(rng.choice(N, int(N * frac), replace=False))
    want = textbook_head(h, E, y, rows, eps, z)
    loss, dh, dE = fhead.softmax_ce_fused(h, E, y, rows, eps, z, chunk)
    assert abs(loss - want[0]) < 1e-12
    assert_close(dh, want[1], "dh", 1e-12)
    assert_close(dE, want[2], "dE", 1e-12)
    _, dh2, dE2 = fhead.softmax_ce_fused(h, E, y, rows, eps, z, chunk, need_dE=False, denom=3 * N)
    assert dE2 is None
    assert_close(dh2, textbook_head(h, E, y, rows, eps, z, denom=3 * N)[1], "dh with a denominator", 1e-12)


def test_fused_full_head_float32(rng):
    """float32 against the float64 textbook: within float32 rounding, stated here as 2e-5 relative."""
    N, C, V = 300, 16, 2000
    h, E, y = rng.standard_normal((N, C)), 0.3 * rng.standard_normal((V, C)), rng.integers(0, V, N)
    want = textbook_head(h, E, y, None, 0.1, 1e-4)
    got = fhead.softmax_ce_fused(h.astype(np.float32), E.astype(np.float32), y, None, 0.1, 1e-4, chunk=128)
    assert abs(got[0] - want[0]) / want[0] < 2e-5
    assert_close(got[1], want[1], "dh", 2e-5)
    assert_close(got[2], want[2], "dE", 2e-5)


def test_fused_head_shift_free_path_equals_max_shift(rng):
    """Small logits skip softmax's max-shift (a Cauchy-Schwarz bound proves it safe); same result."""
    N, C, V = 9, 6, 40
    h, E, y = rng.standard_normal((N, C)), rng.standard_normal((V, C)) * 0.3, rng.integers(0, V, N)
    assert fhead._logit_bound(h, E) < fhead.SAFE_LOGIT
    fast_path = fhead.softmax_ce_fused(h, E, y, None, 0.1, 1e-3, chunk=4)
    saved = fhead.SAFE_LOGIT
    fhead.SAFE_LOGIT = -1.0                                   # force the max-shift path
    try:
        slow = fhead.softmax_ce_fused(h, E, y, None, 0.1, 1e-3, chunk=4)
        slow_nll = fhead.nll_fused(h, E, y, 4)
    finally:
        fhead.SAFE_LOGIT = saved
    assert abs(fast_path[0] - slow[0]) < 1e-12
    assert_close(fast_path[1], slow[1], "dh", 1e-10)
    assert_close(fast_path[2], slow[2], "dE", 1e-10)
    assert_close(fhead.nll_fused(h, E, y, 4), slow_nll, "nll", 1e-12)
    assert_close(slow_nll, nll(h, E, y), "nll vs textbook", 1e-12)


def test_fused_head_float32_large_logits(rng):
    h = rng.standard_normal((6, 4)).astype(np.float32) * 30
    E = rng.standard_normal((30, 4)).astype(np.float32) * 30
    y = rng.integers(0, 30, 6)
    loss, dh, dE = fhead.softmax_ce_fused(h, E, y, chunk=4)
    ref = nll(h.astype(np.float64), E.astype(np.float64), y).mean()
    assert np.isfinite(loss) and abs(loss - ref) / ref < 1e-4
    assert np.isfinite(dh).all() and np.isfinite(dE).all()


@pytest.mark.parametrize("eps,z,use_rows", [(0.0, 0.0, False), (0.1, 1e-3, False), (0.2, 0.05, True)])
@pytest.mark.parametrize("workers", [1, 3])
def test_fused_hier_head_equals_plain(rng, eps, z, use_rows, workers):
    V, C, n_cls, N = 29, 5, 5, 12
    cmap = ClassMap.from_counts(rng.integers(0, 100, V) ** 2, n_cls)
    h, E, Wc, y = rng.standard_normal((N, C)), rng.standard_normal((V, C)), rng.standard_normal((n_cls, C)), \
        rng.integers(0, V, N)
    rows = np.sort(rng.choice(N, 7, replace=False)) if use_rows else None
    hs, ys = (h, y) if rows is None else (h[rows], y[rows])
    loss, cache = hier_ce_forward(hs, E, Wc, cmap, ys, eps, z)
    dhs, dE, dWc = hier_ce_backward(1.0, cache)
    dh = np.zeros_like(h)
    dh[slice(None) if rows is None else rows] = dhs
    got = hier_ce_fused(h, E, Wc, cmap, y, rows, eps, z, workers=workers)
    assert abs(got[0] - loss) < 1e-12
    for name, a, b in (("dh", got[1], dh), ("dE", got[2], dE), ("dWc", got[3], dWc)):
        assert_close(a, b, name, 1e-12)


# ------------------------------------------------------------------------------------- the step

def _batch(seed, B=5, T=9, V=23):
    r = np.random.default_rng(seed)
    return r.integers(0, V, (B, T)), r.integers(0, V, (B, T))


OPTIONS = [dict(), dict(label_smoothing=0.1, z_loss=1e-3, loss_frac=0.3), dict(loss_frac=0.4, train_embed=False)]


@pytest.mark.parametrize("head", ["full", "hier", "adaptive"])
@pytest.mark.parametrize("options", OPTIONS)
def test_fast_step_equals_plain_step_float64(head, options):
    """fast.step.loss_and_grads == Model.loss_and_grads: loss and every gradient to 1e-10 relative,
    for 1, 2 and 3 shards (data parallelism over the batch) and the fused heads."""
    m = Model(ModelConfig(**{**TINY, "head": head, "adaptive_div": 2}), seed=0, dtype=np.float64)
    idx, tgt = _batch(8)
    loss, grads = m.loss_and_grads(idx, tgt, rng=np.random.default_rng(1), **options)
    for workers in (1, 2, 3):
        floss, fgrads = fast.loss_and_grads(m, idx, tgt, rng=np.random.default_rng(1), workers=workers,
                                            chunk=7, **options)
        assert abs(floss - loss) <= 1e-10 * abs(loss), (workers, floss, loss)
        assert set(fgrads) == set(grads)
        for k in grads:
            assert_close(fgrads[k], grads[k], f"{k} ({workers} shards)", 1e-10)
    assert_close(fast.nll(m, idx, tgt, workers=2, chunk=7), m.nll(idx, tgt), "nll", 1e-12)


@pytest.mark.parametrize("head", ["full", "hier", "adaptive"])
def test_fast_step_equals_plain_step_float32(head):
    """The reference configuration in float32: the fused head sums in another order and skips the
    max-shift, so the two agree to float32 rounding: loss to 1e-5, each gradient to 2e-3 of its
    largest entry (the smallest entries are sums of ~1e3 rounded terms)."""
    m = Model(ModelConfig(head=head), seed=0)
    r = np.random.default_rng(0)
    idx, tgt = r.integers(0, 50257, (2, 64)), r.integers(0, 50257, (2, 64))
    loss, grads = m.loss_and_grads(idx, tgt, loss_frac=0.5, rng=np.random.default_rng(1))
    floss, fgrads = fast.loss_and_grads(m, idx, tgt, loss_frac=0.5, rng=np.random.default_rng(1), workers=2)
    assert abs(floss - loss) / loss < 1e-5
    for k in grads:
        assert fgrads[k].dtype == np.float32
        assert_close(fgrads[k], grads[k], k, 2e-3)


@pytest.mark.parametrize("head", ["hier", "adaptive"])
def test_a_shard_with_no_counted_rows(rng, head):
    m = tiny_model(head=head, hier_classes=5, adaptive_div=2)
    idx, tgt = _batch(9, B=2, T=4)
    kw = dict(loss_frac=0.125, train_embed=False)     # one counted position out of 8: one shard has none
    loss, grads = m.loss_and_grads(idx, tgt, rng=np.random.default_rng(3), **kw)
    floss, fgrads = fast.loss_and_grads(m, idx, tgt, rng=np.random.default_rng(3), workers=2, **kw)
    assert abs(loss - floss) < 1e-12 and "embed.w" not in fgrads
    for k in grads:
        assert_close(fgrads[k], grads[k], k, 1e-10)


# ------------------------------------------------------------------------------------- optimizers

def test_fast_optimizers_equal_the_plain_ones_bit_for_bit(rng):
    shapes = {"embed.w": (3 * CHUNK + 17, 4), "block.norm_mix.g": (5,), "block.mix.conv0.gate.w": (6, 2, 3)}
    for dtype in (np.float32, np.float64):
        params = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
        plain, fast_p = {k: v.copy() for k, v in params.items()}, {k: v.copy() for k, v in params.items()}
        a, b = AdamW(plain, lr=1e-2), FastAdamW(fast_p, lr=1e-2)
        e, f = EMA(plain, 0.9), FastEMA(fast_p, 0.9)
        for step in range(3):
            grads = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
            a.step(plain, grads, lr=1e-2 / (step + 1))
            b.step(fast_p, grads, lr=1e-2 / (step + 1))
            e.update(plain)
            f.update(fast_p)
        for k in shapes:
            np.testing.assert_array_equal(fast_p[k], plain[k], err_msg=k)
            np.testing.assert_array_equal(b.m[k], a.m[k], err_msg=k)
            np.testing.assert_array_equal(f.shadow[k], e.shadow[k], err_msg=k)



@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")     # 1e30^2 in float32: on purpose
@pytest.mark.parametrize("path", ["compiled loop", "numpy pieces", "python loop"])
def test_fast_adamw_every_path_equals_the_plain_one_bit_for_bit(path, monkeypatch):
    """FastAdamW's three ways to run the update: numba's compiled loop (fast.optim._adamw_loop, when
    numba is installed), the NumPy passes over cache-sized pieces (without numba), and the loop as
    plain Python (what numba compiles) -- bit for bit optim.AdamW's, in float32 and float64, with
    overflowing, underflowing and zero gradients, with and without decay, split between threads."""
    from nanoternary.fast import optim as fast_optim
    if path == "compiled loop":
        pytest.importorskip("numba")
        assert fast_optim._compiled_loop() is not None
    else:
        monkeypatch.setattr(fast_optim, "_adamw_loop", None if path == "numpy pieces" else fast_optim._adamw_loop_py)
    n = 2003 if path == "python loop" else (1 << 20) + 7              # above parallel_ranges' min_size
    r = np.random.default_rng(4)
    for dtype in (np.float32, np.float64):
        shapes = {"embed.w": (n,), "norm.g": (n // 3,)}                # 1-D: no decay
        params = {k: r.standard_normal(sh).astype(dtype) for k, sh in shapes.items()}
        params["embed.w"] = params["embed.w"].reshape(-1, 1)
        plain, fast_p = {k: v.copy() for k, v in params.items()}, {k: v.copy() for k, v in params.items()}
        a, b = AdamW(plain, lr=1e-2), FastAdamW(fast_p, lr=1e-2)
        for step in range(3):
            grads = {k: (r.standard_normal(v.shape) * 10.0 ** r.integers(-3, 3)).astype(dtype) for k, v in params.items()}
            g = grads["embed.w"].reshape(-1)
            g[:5] = [0.0, -0.0, 1e30, -1e-30, 1e-45 if dtype == np.float32 else 1e-320]
            a.step(plain, grads, lr=1e-2 / (step + 1))
            b.step(fast_p, grads, lr=1e-2 / (step + 1))
        for k in shapes:
            for what, got, want in (("p", fast_p[k], plain[k]), ("m", b.m[k], a.m[k]), ("v", b.v[k], a.v[k])):
                assert got.dtype == want.dtype
                np.testing.assert_array_equal(got, want, err_msg=f"{path}: {what} of {k} ({np.dtype(dtype).name})")

def test_fast_normuon_equals_the_plain_one(rng):
    """One matrix per core with single-threaded BLAS: float32 bit for bit here; float64 to 1e-12 (a
    BLAS may sum in another order with another thread count)."""
    shapes = {"a": (40, 16), "b": (40, 16), "c": (16, 40), "d": (16, 16)}
    for dtype, tol in ((np.float32, 1e-6), (np.float64, 1e-12)):
        p1 = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
        p2 = {k: v.copy() for k, v in p1.items()}
        o1, o2 = NorMuon(p1), FastNorMuon(p2)
        for _ in range(3):
            g = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
            o1.step(p1, g, lr=0.01)
            o2.step(p2, g, lr=0.01)
        for k in shapes:
            assert_close(p2[k], p1[k], k, tol)
            assert o1.t[k] == o2.t[k] == 3


# ------------------------------------------------------------------------------------- machinery

def test_run_shards_restores_blas_threads_even_when_a_shard_fails():
    if not threads.blas().lib_controllers:
        pytest.skip("no BLAS thread control here: shards run in one thread")
    before = threads.blas_threads_now()
    assert threads.run_shards(lambda a, b: threads.blas_threads_now(), [(0, 1), (1, 2)]) == [1, 1]
    assert threads.blas_threads_now() == before

    def boom(a, b):
        if a == 0:
            raise RuntimeError("shard 0 failed")
        time.sleep(0.05)
        return a
    with pytest.raises(RuntimeError, match="shard 0 failed"):
        threads.run_shards(boom, [(0, 1), (1, 2)])
    assert threads.blas_threads_now() == before


def test_parallel_ranges_covers_every_index_once():
    seen = np.zeros(3_000_001, dtype=np.int64)

    def mark(lo, hi):
        seen[lo:hi] += 1
    threads.parallel_ranges(mark, seen.size)
    assert (seen == 1).all()
    assert threads.split(10, 3) == [(0, 3), (3, 6), (6, 10)] and threads.split(2, 5) == [(0, 1), (1, 2)]


def test_profile_sections_are_exclusive_and_reach_worker_threads():
    """Nested time is charged to the inner section only; workers' time to the section that started
    them. Only lower bounds on sleeps and one wide margin: nothing here depends on the machine's speed."""
    with profile.attached():
        with profile.section("outer"):
            time.sleep(0.02)
            with profile.section("inner"):
                time.sleep(0.5)
            threads.parallel_ranges(lambda lo, hi: time.sleep(0.03), 2 << 20)
        t = profile.times()
        shares = profile.shares()
    workers = threads.default_workers()
    assert t["inner"] >= 0.5
    assert t["outer"] >= 0.02 + 0.03 * workers - 1e-3        # its own sleep plus every worker's
    assert t["outer"] < 0.02 + 0.03 * workers + 0.45          # and not the inner 0.5 s
    assert abs(sum(shares.values()) - 1.0) < 1e-9


def test_profile_attaches_from_outside_and_detaches():
    """attached() times the model's own function calls without the model knowing, and puts the
    originals back."""
    from nanoternary import model as model_module
    original = model_module.rmsnorm_forward
    m = tiny_model()
    idx, tgt = _batch(2)
    with profile.attached():
        assert model_module.rmsnorm_forward is not original
        fast.loss_and_grads(m, idx, tgt, workers=2)
        shares = profile.shares()
    assert model_module.rmsnorm_forward is original
    assert {"norms", "convmixer", "glu", "head forward", "head backward", "embedding"} <= set(shares)
    assert not profile.enabled()
