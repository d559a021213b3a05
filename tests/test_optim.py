"""Tests for nanoternary/optim.py: each optimizer against numbers worked out here from the formulas
(element by element, in float64), schedule shapes, clipping, accumulation, EMA, and state_dict
round trips. Fast: tiny arrays only."""
import math

import numpy as np
import pytest

from nanoternary.checkpoint import CheckpointError, load_optimizer_state, optimizer_state
from nanoternary.optim import (
    EMA, NS_COEFFS, AdamW, NorMuon, accumulate, clip_grad_norm, cosine, grad_norm, newton_schulz5, split_params,
    wsd,
)


def assert_close(got, want, name, rtol=1e-12, atol=1e-14):
    """Loud comparison: names the tensor and prints the worst element."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    err = np.abs(got - want)
    i = np.unravel_index(np.argmax(err - rtol * np.abs(want)), err.shape) if err.size else ()
    assert np.allclose(got, want, rtol=rtol, atol=atol), \
        f"{name}: worst at {i}: got {got[i]!r}, want {want[i]!r} (|diff| {err[i]:.3e})"


# ----------------------------------------------------------------------------------------------
# AdamW


def adamw_by_hand(p, grads, lrs, b1, b2, eps, wd):
    """The AdamW recursion for one scalar parameter, written out plainly."""
    m = v = 0.0
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        p = p - lr * wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat = m / (1 - b1 ** t)
        vhat = v / (1 - b2 ** t)
        p = p - lr * mhat / (math.sqrt(vhat) + eps)
    return p


def test_adamw_two_steps_by_hand():
    W0 = np.array([[0.5, -1.0, 2.0], [0.1, 0.0, -0.3]])
    g0 = np.array([0.3, 0.8, 0.5])
    G1 = [np.array([[0.1, -0.2, 0.3], [1.0, -1e-3, 0.0]]), np.array([[-0.4, 0.2, 0.1], [0.5, 2.0, -3.0]])]
    G2 = [np.array([0.01, -0.5, 2.0]), np.array([0.02, 0.5, -1.0])]
    params = {"block.glu.gate.w": W0.copy(), "norm_f.g": g0.copy()}
    opt = AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    lrs = [1e-2, 5e-3]  # the second step uses the lr override, as a schedule would
    opt.step(params, {"block.glu.gate.w": G1[0], "norm_f.g": G2[0]})
    opt.step(params, {"block.glu.gate.w": G1[1], "norm_f.g": G2[1]}, lr=lrs[1])

    want_W = np.empty_like(W0)
    for i in np.ndindex(W0.shape):  # the matrix is decayed
        want_W[i] = adamw_by_hand(W0[i], [G1[0][i], G1[1][i]], lrs, 0.9, 0.95, 1e-8, 0.1)
    want_g = np.empty_like(g0)
    for i in np.ndindex(g0.shape):  # the 1-D gain is not
        want_g[i] = adamw_by_hand(g0[i], [G2[0][i], G2[1][i]], lrs, 0.9, 0.95, 1e-8, 0.0)
    assert_close(params["block.glu.gate.w"], want_W, "block.glu.gate.w")
    assert_close(params["norm_f.g"], want_g, "norm_f.g")
    # and the first step of Adam is lr * sign(g) up to eps (bias correction makes mhat/sqrt(vhat) = g/|g|)
    p = {"w": np.zeros((2, 2))}
    AdamW(p, lr=0.1, weight_decay=0.0).step(p, {"w": np.array([[3.0, -1e-3], [2e-2, -50.0]])})
    assert_close(p["w"], -0.1 * np.array([[1.0, -1.0], [1.0, -1.0]]), "first step", rtol=1e-5)


def test_adamw_decay_rule_skipped_keys_and_subset():
    rng = np.random.default_rng(0)
    params = {"embed.w": rng.standard_normal((5, 4)), "block.mix.conv0.gate.w": rng.standard_normal((4, 2, 3)),
              "block.mix.norm0.g": np.ones(4), "block.mix.out.w": rng.standard_normal((4, 4))}
    opt = AdamW({k: params[k] for k in ("embed.w", "block.mix.conv0.gate.w", "block.mix.norm0.g")})
    # the 1-D gain is not decayed: with a zero gradient it does not move at all
    g0 = params["block.mix.norm0.g"].copy()
    AdamW({"g": g0}, lr=0.1).step({"g": g0}, {"g": np.zeros(4)})
    assert np.array_equal(g0, np.ones(4))

    # a key missing from grads (a frozen embedding) is left alone, and its step count does not move
    before = {k: v.copy() for k, v in params.items()}
    grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    del grads["embed.w"]
    opt.step(params, grads)
    assert np.array_equal(params["embed.w"], before["embed.w"]) and opt.t["embed.w"] == 0
    assert np.array_equal(params["block.mix.out.w"], before["block.mix.out.w"]), "updated a key it does not own"
    assert not np.array_equal(params["block.mix.conv0.gate.w"], before["block.mix.conv0.gate.w"])
    # when the embedding joins, its bias correction starts at t = 1: a first step of lr * sign(g)
    e0 = params["embed.w"].copy()
    opt.step(params, {"embed.w": np.full((5, 4), 0.7)}, lr=1e-3)
    assert_close(params["embed.w"], e0 * (1 - 1e-3 * 0.1) - 1e-3, "embed.w", rtol=1e-6)


@pytest.mark.parametrize("fast", [False, True])
def test_adamw_keeps_dtype_float32(fast):
    # float32 (and, for the fast layer's version, larger than one chunk) against the textbook
    # formula in float64
    from nanoternary.fast.optim import CHUNK, FastAdamW
    rng = np.random.default_rng(1)
    W = rng.standard_normal((3, CHUNK // 2 + 7)).astype(np.float32)
    grads = [rng.standard_normal(W.shape).astype(np.float32) for _ in range(3)]
    params = {"w": W.copy()}
    opt = (FastAdamW if fast else AdamW)(params, lr=1e-2)
    for g in grads:
        opt.step(params, {"w": g})
    assert params["w"].dtype == np.float32
    p, m, v = W.astype(np.float64), 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        p = p * (1 - 1e-2 * 0.1)
        m = 0.9 * m + 0.1 * g
        v = 0.95 * v + 0.05 * g.astype(np.float64) ** 2
        p = p - 1e-2 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.95 ** t)) + 1e-8)
    assert_close(params["w"], p, "w (float32)", rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# NorMuon


def quintic(x, steps=5):
    """What newton_schulz5 does to each singular value (of the Frobenius-normalised matrix)."""
    a, b, c = NS_COEFFS
    for _ in range(steps):
        x = a * x + b * x ** 3 + c * x ** 5
    return x


@pytest.mark.parametrize("shape", [(20, 12), (12, 20), (16, 16)])
def test_newton_schulz_singular_values_near_one(shape):
    G = np.random.default_rng(0).standard_normal(shape)
    O = newton_schulz5(G)
    s = np.linalg.svd(O, compute_uv=False)
    assert O.shape == shape
    assert s.min() > 0.5 and s.max() < 1.5, f"singular values {s.min():.3f} .. {s.max():.3f}"
    # it is exactly U f(S/||G||) V^T, with the quintic applied to each singular value
    U, S, Vt = np.linalg.svd(G, full_matrices=False)
    assert_close(O, (U * quintic(S / (np.linalg.norm(G) + 1e-7))) @ Vt, "newton_schulz5", rtol=1e-9, atol=1e-12)


def normuon_by_hand(W, grads, lrs, mu=0.95, beta2=0.999, eps=1e-8):
    """NorMuon's recursion with the orthogonalisation done through an SVD (see quintic)."""
    W = W.copy()
    m, v = np.zeros_like(W), np.zeros(W.shape[0])
    for g, lr in zip(grads, lrs):
        m = mu * m + (1 - mu) * g
        U, S, Vt = np.linalg.svd(m, full_matrices=False)
        O = U @ np.diag(quintic(S / (np.linalg.norm(m) + 1e-7))) @ Vt
        v = beta2 * v + (1 - beta2) * np.array([np.mean(row ** 2) for row in O])
        O = O / (np.sqrt(v)[:, None] + eps)
        scale = 0.2 * math.sqrt(O.size) / (np.linalg.norm(O) + eps)
        W = W - lr * scale * O
    return W


def test_normuon_two_steps_by_hand():
    rng = np.random.default_rng(2)
    W0 = rng.standard_normal((3, 5))
    grads = [rng.standard_normal((3, 5)), rng.standard_normal((3, 5))]
    params = {"block.mix.out.w": W0.copy()}
    opt = NorMuon(params)
    opt.step(params, {"block.mix.out.w": grads[0]})
    opt.step(params, {"block.mix.out.w": grads[1]}, lr=0.01)
    assert_close(params["block.mix.out.w"], normuon_by_hand(W0, grads, [0.02, 0.01]), "block.mix.out.w",
                 rtol=1e-9, atol=1e-12)
    # tall matrices go through the transposed iteration
    W1 = rng.standard_normal((6, 2))
    g1 = [rng.standard_normal((6, 2))]
    p = {"w": W1.copy()}
    NorMuon(p).step(p, {"w": g1[0]})
    assert_close(p["w"], normuon_by_hand(W1, g1, [0.02]), "tall w", rtol=1e-9, atol=1e-12)


def test_normuon_update_size_and_per_row_normalisation():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((8, 12))
    g = rng.standard_normal((8, 12))
    g[0] *= 1e3  # one row with a huge gradient
    for beta2 in (0.999, 0.0):
        p = {"w": W.copy()}
        NorMuon(p, lr=0.1, beta2=beta2).step(p, {"w": g})
        step = W - p["w"]
        # whatever the gradient's scale, the update has RMS 0.2 * lr per entry
        assert math.isclose(np.sqrt(np.mean(step ** 2)), 0.2 * 0.1, rel_tol=1e-7)  # up to the eps
    # with beta2 = 0, v is this step's mean(O^2) per row, so every row of the update has that RMS
    row_rms = np.sqrt(np.mean(step ** 2, axis=1))
    assert_close(row_rms, np.full(8, 0.02), "row RMS", rtol=1e-6)


def test_normuon_rejects_vectors():
    with pytest.raises(ValueError, match="AdamW"):
        NorMuon({"norm_f.g": np.ones(4)})


def test_split_params_follows_the_peer():
    shapes = {"embed.w": (50, 8), "block.mix.conv0.gate.w": (8, 2, 4), "block.mix.norm0.g": (8,),
              "block.mix.out.w": (8, 8), "block.glu.gate.w": (21, 8), "block.glu.down.w": (8, 21),
              "block.norm_mix.g": (8,), "norm_f.g": (8,), "head.class_w": (7, 8)}
    params = {k: np.zeros(s) for k, s in shapes.items()}
    muon, adam = split_params(params)
    assert muon == ["block.mix.out.w", "block.glu.gate.w", "block.glu.down.w"]
    assert adam == ["embed.w", "block.mix.conv0.gate.w", "block.mix.norm0.g", "block.norm_mix.g",
                    "norm_f.g", "head.class_w"]


# ----------------------------------------------------------------------------------------------
# schedules


def test_wsd_follows_the_budget():
    assert wsd(0.0, 0, 200) == 1 / 200
    assert wsd(0.5, 199, 200) == 1.0
    assert wsd(0.89, 5000, 200) == 1.0
    assert math.isclose(wsd(0.95, 5000, 200), 0.5)
    assert wsd(1.0, 5000, 200) == 0.0 and wsd(1.2, 5000, 200) == 0.0
    assert wsd(0.95, 99, 200) == pytest.approx(0.5 * 100 / 200)  # both at once multiply
    f = [wsd(p / 100, 1000, 10, decay_frac=0.2) for p in range(101)]
    assert all(x == 1.0 for x in f[:80]) and f[-1] == 0.0
    assert_close(f[80:], [(100 - p) / 20 for p in range(80, 101)], "linear decay")


# ----------------------------------------------------------------------------------------------
# clipping, accumulation, EMA


def test_clip_grad_norm():
    grads = {"a": np.array([[3.0, 0.0]]), "b": np.array([4.0]), "c": None}
    norm = clip_grad_norm(grads, 1.0)
    assert norm == 5.0
    assert math.isclose(grad_norm(grads), 1.0, rel_tol=1e-6)
    assert_close(grads["a"], [[0.6, 0.0]], "a", rtol=1e-6)
    small = {"a": np.array([0.3, 0.4])}
    assert clip_grad_norm(small, 1.0) == pytest.approx(0.5)
    assert np.array_equal(small["a"], [0.3, 0.4]), "a gradient below max_norm was touched"
    bad = {"a": np.array([np.nan, 1.0])}
    assert math.isnan(clip_grad_norm(bad, 1.0)) and bad["a"][1] == 1.0


def test_accumulate():
    acc = {}
    g1 = {"w": np.array([1.0, 2.0]), "e": None}
    accumulate(acc, g1, 0.5)
    accumulate(acc, {"w": np.array([3.0, -2.0])}, 0.5)
    assert_close(acc["w"], [2.0, 0.0], "w")
    assert "e" not in acc and np.array_equal(g1["w"], [1.0, 2.0]), "the input gradient was modified"


def test_ema_math_and_swap():
    params = {"w": np.array([1.0, 2.0]), "g": np.array([0.0])}
    ema = EMA(params, decay=0.9)
    params["w"][:] = [3.0, 0.0]
    params["g"][:] = [1.0]
    ema.update(params)      # 0.9 * [1, 2] + 0.1 * [3, 0]
    params["w"][:] = [5.0, 5.0]
    ema.update(params)      # 0.9 * that + 0.1 * [5, 5]
    want = 0.9 * (0.9 * np.array([1.0, 2.0]) + 0.1 * np.array([3.0, 0.0])) + 0.1 * np.array([5.0, 5.0])
    assert_close(ema.shadow["w"], want, "ema w")
    assert_close(ema.shadow["g"], [0.9 * 0.1 + 0.1], "ema g")
    live = params["w"]
    with ema.swapped(params):
        assert params["w"] is live and np.allclose(params["w"], want)
    assert np.array_equal(params["w"], [5.0, 5.0]), "trained weights not restored"


# ----------------------------------------------------------------------------------------------
# saved state (checkpoint.optimizer_state) round trips


def test_optimizer_state_round_trip_gives_identical_steps(tmp_path):
    rng = np.random.default_rng(5)
    shapes = {"embed.w": (6, 4), "block.mix.conv0.gate.w": (4, 2, 3), "norm_f.g": (4,),
              "block.mix.out.w": (4, 4), "block.glu.gate.w": (7, 4)}
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s) for k, s in shapes.items()} for _ in range(5)]
    muon_names, adam_names = split_params(params)

    def build(params):
        return (NorMuon({k: params[k] for k in muon_names}), AdamW({k: params[k] for k in adam_names}),
                EMA(params))

    def run(params, opts, gs):
        muon, adam, ema = opts
        for g in gs:
            muon.step(params, g)
            adam.step(params, g, lr=1e-3)
            ema.update(params)

    # uninterrupted: five steps
    pa = {k: v.copy() for k, v in params.items()}
    oa = build(pa)
    run(pa, oa, grads)
    # interrupted after two: save through np.savez under prefixes, load into fresh objects
    pb = {k: v.copy() for k, v in params.items()}
    ob = build(pb)
    run(pb, ob, grads[:2])
    state = {}
    for prefix, opt in zip(("normuon/", "adamw/", "ema/"), ob):
        state.update({prefix + k: v for k, v in optimizer_state(opt).items()})
    np.savez(tmp_path / "opt.npz", **state)
    loaded = dict(np.load(tmp_path / "opt.npz"))
    pc = {k: v.copy() for k, v in pb.items()}
    oc = build(pc)
    for prefix, opt in zip(("normuon/", "adamw/", "ema/"), oc):
        load_optimizer_state(opt, {k[len(prefix):]: v for k, v in loaded.items() if k.startswith(prefix)})
    run(pc, oc, grads[2:])
    for k in params:
        assert np.array_equal(pc[k], pa[k]), f"{k}: resumed run differs"
        assert np.array_equal(oc[2].shadow[k], oa[2].shadow[k]), f"ema {k}: resumed run differs"

    # a state of another optimizer, or of other parameters, is refused clearly
    with pytest.raises(CheckpointError, match="NorMuon"):
        load_optimizer_state(oc[1], optimizer_state(oc[0]))
    with pytest.raises(CheckpointError, match="missing"):
        load_optimizer_state(AdamW({"other.w": np.zeros((2, 2))}), optimizer_state(oc[1]))
    with pytest.raises(CheckpointError, match="unexpected"):
        load_optimizer_state(AdamW({"norm_f.g": pc["norm_f.g"]}), optimizer_state(oc[1]))


def test_cosine_endpoints_and_warmup():
    assert cosine(0.0, 0, warmup=10) == pytest.approx(0.1)            # (0+1)/10 * 1
    assert cosine(0.0, 50, warmup=10) == pytest.approx(1.0)
    assert cosine(0.5, 50, warmup=10) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cosine(1.0, 50, warmup=10) == pytest.approx(0.1)
    assert cosine(2.0, 50, warmup=10, min_ratio=0.0) == pytest.approx(0.0)
