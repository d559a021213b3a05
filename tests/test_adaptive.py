"""The adaptive softmax head: an exact distribution over all V tokens, the loss it trains, the
cluster map, PyTorch's AdaptiveLogSoftmaxWithLoss as a second implementation, the fast version
equal to the plain one; and the head everywhere a head works: the model without data, train.py
(the cluster map from the data's counts, resume, --init-from, bad flags), sample.py, the packed
export, evaluation, the checkpoint's checks, tools/bench. (MPI: tests/test_mpi.py.)"""
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


# ------------------------------------------------------------------------------- the model with it

def test_model_without_data_has_the_default_split():
    from nanoternary.model import Model, ModelConfig
    m = Model(ModelConfig(head="adaptive"))
    assert tuple(m.class_map.cutoffs) == DEFAULT_CUTOFFS and np.array_equal(m.class_map.order, np.arange(50257))
    shapes = {k: v.shape for k, v in m.params.items() if k.startswith("head.")}
    assert shapes == {"head.cluster_w": (2, 256), "head.proj1.w": (64, 256), "head.proj2.w": (16, 256)}
    assert m.param_counts()["head"] == 2 * 256 + 64 * 256 + 16 * 256
    cfg = ModelConfig(head="adaptive", vocab_size=40, d_model=8, adaptive_cutoffs=[5, 40], adaptive_div=2,
                      conv_groups=2)
    assert cfg.adaptive_cutoffs == (5, 40) and Model(cfg).params["head.proj1.w"].shape == (4, 8)
    for kw, match in ((dict(adaptive_cutoffs=(5, 30)), "vocabulary size 40"),
                      (dict(adaptive_cutoffs=(9, 5, 40)), "rising strictly"),
                      (dict(adaptive_cutoffs=(40,)), "at least two"),
                      (dict(adaptive_div=16), "0 wide"),
                      (dict(adaptive_div=1), "--adaptive-div must be in")):
        with pytest.raises(ValueError, match=match):
            ModelConfig(**{**cfg.to_dict(), **kw})


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    from test_train import write_corpus
    monkeypatch.chdir(tmp_path)
    return write_corpus(str(tmp_path))


# the corpus has about 40 distinct tokens: a shortlist of 8 and a first tail of 16 leave seen tokens
# in both tails, so training goes through every level
ADAPTIVE = ["--head", "adaptive", "--adaptive-cutoffs", "8,24,50257"]


def test_trains_resumes_and_starts_others(corpus, monkeypatch, capsys):
    """train.py --head adaptive: the cluster map from the training tokens' counts, saved and loaded;
    an interrupted run resumed takes the same steps as an uninterrupted one; --init-from."""
    import os
    import signal
    import train
    from test_train import TINY, read_log
    from nanoternary.checkpoint import load_checkpoint
    from nanoternary.data import prepare
    from nanoternary.model import Model
    common = ["--data", corpus, "--max-steps", "8", "--eval-interval", "4", "--save-interval", "3",
              "--label-smoothing", "0.1"] + ADAPTIVE + TINY
    assert train.main(common + ["--out", "a"]) == 0
    m = Model.load("a")
    counts = np.bincount(prepare([corpus], verbose=False).train, minlength=50257)
    assert m.cfg.head == "adaptive" and np.array_equal(m.class_map.order, ClusterMap.from_counts(counts, (8, 24, 50257)).order)
    assert set(m.class_map.token_cluster[np.flatnonzero(counts)]) == {0, 1, 2}
    log = read_log("a")
    assert log[-1]["train_loss"] < log[0]["train_loss"] and "loss-frac 1.0" in open("a/report.md").read()
    real = train.train_step

    def interrupted(*args):                                 # a Ctrl-C arrives during step 5
        out = real(*args)
        if args[-1].step + 1 == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return out
    monkeypatch.setattr(train, "train_step", interrupted)
    assert train.main(common + ["--out", "b"]) == 130
    monkeypatch.setattr(train, "train_step", real)
    assert train.main(common + ["--out", "b", "--resume"]) == 0
    assert [r["train_loss"] for r in read_log("b")] == [r["train_loss"] for r in log]
    pa, pb = load_checkpoint("a")[0], load_checkpoint("b")[0]
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    # a new run from its weights: the same head and cluster map; a clashing head setting is one line
    capsys.readouterr()
    init = ["--data", corpus, "--init-from", "a/latest.npz", "--max-steps", "1"] + TINY
    assert train.main(init + ["--out", "c"]) == 0
    c = Model.load("c")
    assert c.cfg == m.cfg and np.array_equal(c.class_map.order, m.class_map.order)
    assert train.main(init + ["--out", "d", "--adaptive-div", "2"]) == 1
    err = capsys.readouterr().err
    assert "--init-from a/latest.npz has --adaptive-div 4, not 2" in err and err.count("\n") == 1, err


def test_bad_adaptive_flags_get_one_line(corpus, capsys):
    import train
    from test_train import TINY
    for flags, words in ((["--adaptive-cutoffs", "8,4,50257"], "--adaptive-cutoffs must be"),
                         (["--adaptive-cutoffs", "8,x"], "--adaptive-cutoffs"),
                         (["--adaptive-div", "64"], "--adaptive-div 64: the last of 2 tail clusters"),
                         (["--adaptive-div", "1"], "--adaptive-div must be in [2, inf)")):
        assert train.main(["--data", corpus, "--out", "x", "--head", "adaptive"] + flags + TINY) == 1
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err


def test_sample_export_evaluate_and_the_checkpoint_checks(corpus, capsys):
    """sample.py, the packed export (the same tokens and log-probabilities as the full checkpoint),
    evaluation (full = packed = Model.nll) and the cluster map's validation on load."""
    import train
    from test_sample import load_sample_module
    from test_train import TINY
    from nanoternary import evaluate
    from nanoternary.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from nanoternary.data import prepare, val_windows
    from nanoternary.generate import Generator, main as generate_main
    from nanoternary.model import Model
    from nanoternary.pack import load_packed
    assert train.main(["--data", corpus, "--out", "s", "--max-steps", "30", "--lr-adam", "1e-2", "--dtype", "float64"]
                      + ADAPTIVE + TINY) == 0
    capsys.readouterr()
    sample = load_sample_module()
    assert sample.main(["--checkpoint", "s", "--prompt", "the cat", "--max-new-tokens", "12", "--head", "adaptive"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("the cat") and len(out) > len("the cat\n") and "head adaptive" in err
    assert generate_main(["export", "--checkpoint", "s", "--out", "p.npz"]) == 0
    capsys.readouterr()
    w = load_packed("p.npz")
    m = Model.load("s")
    assert w.cfg.head == "adaptive" and np.array_equal(w.class_map.order, m.class_map.order)
    assert sample.main(["--checkpoint", "p.npz", "--prompt", "the cat", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr()[0] == out                                  # the same seed, the same text
    ids = [int(t) for t in np.random.default_rng(0).integers(0, 50257, 3)] + [262, 3797, 3332]
    a, b = Generator("p.npz", kernel="blas"), Generator(m, kernel="blas")
    ha, hb = a.prefill(ids)[-1], b.prefill(ids)[-1]
    np.testing.assert_array_equal(a.log_probs(ha), b.log_probs(hb))
    np.testing.assert_allclose(b.log_probs(hb), m.log_probs(np.array([ids]))[0, -1], rtol=1e-10)
    full = evaluate.evaluate("s", [corpus], tokens=1024, seq_len=32, verbose=False)
    packed = evaluate.evaluate("p.npz", [corpus], tokens=1024, seq_len=32, verbose=False)
    data = prepare([corpus], val_fraction=0.0, verbose=False)
    want = np.mean([m.nll(x, y).mean() for x, y in val_windows(data.train, 8, 32, 4, seed=0)])
    assert full["head"] == "adaptive" and full["nll"] == pytest.approx(want, rel=1e-6) == packed["nll"]
    # a checkpoint without its cluster map, or with one that does not fit the config: one clear error
    params, meta, _, cmap = load_checkpoint("s")
    save_checkpoint("missing.npz", params, meta)
    with pytest.raises(CheckpointError, match="missing.npz: an adaptive-head checkpoint without its cluster map"):
        Model.load("missing.npz")
    save_checkpoint("wrong.npz", params, meta, class_map={**cmap, "cutoffs": np.array([8, 50257])})
    with pytest.raises(CheckpointError, match="wrong.npz: its cluster map does not fit the model"):
        Model.load("wrong.npz")
    save_checkpoint("bad.npz", params, meta, class_map={**cmap, "order": np.zeros(50257, dtype=np.int64)})
    with pytest.raises(CheckpointError, match="bad.npz: its cluster map is invalid"):
        Model.load("bad.npz")


def test_bench_prints_one_json_object():
    import json
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "nanoternary.tools.bench", "--head", "adaptive", "--batch-size", "2",
                          "--seq-len", "32", "--steps", "1", "--json"], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    assert r["tokens_per_s"] > 0 and r["head"] == "adaptive" and r["loss_frac"] == 1.0
    assert abs(sum(r["shares"].values()) - 1.0) < 0.01 and r["shares"]["head forward"] > 0


def test_fused_nll_equals_plain(setup):
    from nanoternary.fast.adaptive_head import adaptive_nll_fused
    cmap, y, h, W_head, tails = setup
    for scale in (0.3, 30.0):
        want = adaptive_nll(h * scale, W_head, tails, cmap, y)
        for chunk in (3, 1024):
            got = adaptive_nll_fused(h * scale, W_head, tails, cmap, y, chunk)
            assert got.dtype == np.float64
            np.testing.assert_allclose(got, want, rtol=1e-12)
