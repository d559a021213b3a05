"""The hierarchical softmax head: gradients, exact normalisation, the class map."""
import numpy as np
import pytest

from nanoternary.model import Model, ModelConfig
from nanoternary.classmap import ClassMap
from nanoternary.ops.hier_head import hier_ce_forward, hier_log_probs, hier_nll


@pytest.fixture
def setup():
    r = np.random.default_rng(7)
    V, C, n_cls, N = 29, 5, 5, 12
    counts = r.integers(0, 100, V) ** 2
    cmap = ClassMap.from_counts(counts, n_cls)
    return r, cmap, r.standard_normal((N, C)), r.standard_normal((V, C)), r.standard_normal((n_cls, C)), r.integers(0, V, N)


def test_loss_is_the_mean_nll_without_options(setup):
    r, cmap, h, E, Wc, y = setup
    loss, _ = hier_ce_forward(h, E, Wc, cmap, y)
    assert abs(loss - hier_nll(h, E, Wc, cmap, y).mean()) < 1e-12


def test_probabilities_sum_to_one(setup):
    r, cmap, h, E, Wc, y = setup
    for scale in (0.1, 1.0, 10.0):
        lp = hier_log_probs(h * scale, E, Wc, cmap)
        np.testing.assert_allclose(np.exp(lp).sum(1), 1.0, rtol=1e-12)
        np.testing.assert_allclose(-lp[np.arange(len(y)), y], hier_nll(h * scale, E, Wc, cmap, y), rtol=1e-12)


def test_class_map_frequency_binning():
    V = 1000
    counts = (1e6 / (np.arange(V) + 1.0)).astype(np.int64)      # Zipf
    cmap = ClassMap.from_counts(counts, 30)
    assert cmap.n_classes == 30
    sizes = np.diff(cmap.offsets)
    assert sizes.min() >= 1 and sizes.sum() == V
    assert sizes[cmap.token_class[0]] < sizes[cmap.token_class[V - 1]], "frequent tokens share small classes"
    # every token exactly once; positions index the members
    assert np.array_equal(np.sort(cmap.order), np.arange(V))
    for c in (0, 7, 29):
        m = cmap.members(c)
        assert np.all(cmap.token_class[m] == c) and np.array_equal(cmap.position[m], np.arange(m.size))
    # deterministic, and the same from a saved state
    again = ClassMap.from_counts(counts.copy(), 30)
    assert np.array_equal(again.token_class, cmap.token_class)
    assert np.array_equal(ClassMap.from_state(cmap.state()).order, cmap.order)
    assert np.array_equal(ClassMap.default(V, 30).token_class, ClassMap.default(V, 30).token_class)


def test_class_map_handles_a_dominant_token():
    counts = np.ones(50)
    counts[3] = 1e9                                               # more than one bin of mass
    cmap = ClassMap.from_counts(counts, 8)
    assert cmap.n_classes == 8 and np.diff(cmap.offsets).min() >= 1
    assert np.diff(cmap.offsets)[cmap.token_class[3]] == 1


def test_hier_model_interface():
    cfg = ModelConfig(vocab_size=40, d_model=8, glu_hidden=12, dilations=(1, 2), kernel_size=2,
                      conv_groups=2, head="hier", hier_classes=6, ternary=False)
    m = Model(cfg, seed=0, dtype=np.float64)
    assert m.params["head.class_w"].shape == (6, 8)
    r = np.random.default_rng(0)
    idx, tgt = r.integers(0, 40, (2, 5)), r.integers(0, 40, (2, 5))
    loss, grads = m.loss_and_grads(idx, tgt)
    assert abs(loss - m.loss(idx, tgt)) < 1e-12 and set(grads) == set(m.params)


def test_hier_checkpoint_needs_a_matching_class_map(tmp_path):
    from nanoternary.checkpoint import CheckpointError, save_checkpoint
    cfg = ModelConfig(vocab_size=40, d_model=8, glu_hidden=12, dilations=(1, 2), kernel_size=2,
                      conv_groups=2, head="hier", hier_classes=6)
    m = Model(cfg, seed=0)
    meta = {"config": cfg.to_dict()}
    good = str(tmp_path / "good.npz")
    save_checkpoint(good, m.params, meta, class_map=m.class_map.state())
    assert np.array_equal(Model.load(good).class_map.token_class, m.class_map.token_class)
    missing = str(tmp_path / "missing.npz")
    save_checkpoint(missing, m.params, meta)
    with pytest.raises(CheckpointError, match="class map"):
        Model.load(missing)
    wrong = str(tmp_path / "wrong.npz")
    save_checkpoint(wrong, m.params, meta, class_map={"token_class": np.arange(40) % 9})
    with pytest.raises(CheckpointError, match="class map does not fit"):
        Model.load(wrong)


def test_bench_prints_one_json_object():
    import json
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "nanoternary.tools.bench", "--head", "hier", "--batch-size", "2",
                          "--seq-len", "32", "--steps", "1", "--json"], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    assert r["tokens_per_s"] > 0 and r["head"] == "hier"
    assert abs(sum(r["shares"].values()) - 1.0) < 0.01 and "glu" in r["shares"]
