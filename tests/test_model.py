"""The whole model: finite-difference checks on a tiny configuration, causality, the loss at
initialisation, and the reference's sizes."""
import math

import numpy as np
import pytest

from gradcheck import check_grad, numerical_grad
from nanoternary.model import Model, ModelConfig
from nanoternary.ops.head import softmax_ce_fused
from nanoternary.ops.norm import rmsnorm_forward

TINY = dict(vocab_size=23, d_model=8, glu_hidden=12, n_recursions=2, dilations=(1, 3),
            kernel_size=3, conv_groups=2, head_chunk=5)


def tiny_model(seed=0, **kw):
    cfg = ModelConfig(**{**TINY, "ternary": False, **kw})
    m = Model(cfg, seed=seed, dtype=np.float64)
    r = np.random.default_rng(seed + 1)
    for k, v in m.params.items():        # move gains and small weights off their init values
        v += 0.3 * r.standard_normal(v.shape) * (1 if k.endswith(".g") else np.abs(v).mean() + 0.1)
    return m


def _batch(seed, B=2, T=7, V=23):
    r = np.random.default_rng(seed)
    return r.integers(0, V, (B, T)), r.integers(0, V, (B, T))


@pytest.mark.parametrize("kw", [{}, dict(conv_groups=8, n_recursions=3), dict(ternary_scale=True)])
def test_whole_model_gradients(kw):
    m = tiny_model(**kw)
    idx, tgt = _batch(1)
    loss, grads = m.loss_and_grads(idx, tgt)
    assert set(grads) == set(m.params)
    assert abs(loss - m.loss(idx, tgt)) < 1e-12, "loss_and_grads must differentiate loss()"
    for name, p in m.params.items():
        num = numerical_grad(lambda: m.loss(idx, tgt), p)
        check_grad(name, grads[name], num)


def test_whole_model_gradients_training_options():
    m = tiny_model()
    idx, tgt = _batch(2)
    kw = dict(label_smoothing=0.1, z_loss=0.01, loss_frac=0.5)
    loss, grads = m.loss_and_grads(idx, tgt, rng=np.random.default_rng(5), **kw)
    f = lambda: m.loss_and_grads(idx, tgt, rng=np.random.default_rng(5), **kw)[0]
    for name in ("embed.w", "block.glu.up.w", "block.mix.conv1.value.w", "norm_f.g"):
        check_grad(name, grads[name], numerical_grad(f, m.params[name]))


def test_gradients_at_each_block_input():
    """d loss / d x at the input of every application of the weight-shared block."""
    m = tiny_model()
    idx, tgt = _batch(3)
    h, cache = m.forward_hidden(idx)
    _, dh, dE = softmax_ce_fused(h, m.params["embed.w"], tgt.reshape(-1))
    grads = {k: np.zeros_like(v) for k, v in m.params.items() if k != "embed.w"}
    grads["embed.w"] = dE
    dxs = m._backward_hidden(dh, cache, grads)

    # the inputs of each block, recomputed
    q = m._quantized()
    xs, x = [], m.params["embed.w"][idx]
    for _ in range(m.cfg.n_recursions):
        xs.append(x.copy())
        x, _ = m._block_forward(x, q)

    def loss_from(r, x):
        for _ in range(r, m.cfg.n_recursions):
            x, _ = m._block_forward(x, q)
        hf, _ = rmsnorm_forward(x, m.params["norm_f.g"])
        return softmax_ce_fused(hf.reshape(-1, hf.shape[-1]), m.params["embed.w"], tgt.reshape(-1))[0]

    assert len(dxs) == m.cfg.n_recursions
    for r, (x_r, dx_r) in enumerate(zip(xs, dxs)):
        check_grad(f"input of block application {r}", dx_r, numerical_grad(lambda: loss_from(r, x_r), x_r))


def test_causality_whole_model():
    cfg = ModelConfig(**{**TINY, "dilations": (1, 2, 4)})
    m = Model(cfg, seed=3, dtype=np.float64)
    r = np.random.default_rng(0)
    idx = r.integers(0, 23, (2, 30))
    lp = m.log_probs(idx)
    for t in (0, 9, 28):
        idx2 = idx.copy()
        idx2[:, t + 1:] = r.integers(0, 23, idx2[:, t + 1:].shape)
        lp2 = m.log_probs(idx2)
        np.testing.assert_array_equal(lp[:, :t + 1], lp2[:, :t + 1])
    # and the future does change later positions (the check above can fail)
    assert not np.allclose(lp[:, 29], m.log_probs(np.concatenate([idx[:, :29], (idx[:, 29:] + 1) % 23], 1))[:, 29])


@pytest.mark.parametrize("head", ["full", "hier"])
def test_log_probs_normalised_and_match_loss(head):
    m = Model(ModelConfig(**{**TINY, "head": head}), seed=0, dtype=np.float64)
    idx, tgt = _batch(4)
    lp = m.log_probs(idx)
    assert lp.shape == (2, 7, 23)
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, rtol=1e-10)
    picked = -np.take_along_axis(lp, tgt[..., None], -1)[..., 0]
    assert abs(picked.mean() - m.loss(idx, tgt)) < 1e-10


def test_loss_at_init_is_close_to_ln_V():
    m = Model(ModelConfig(vocab_size=50257), seed=0)
    idx, tgt = _batch(5, B=2, T=64, V=50257)
    loss = m.loss(idx, tgt)
    assert abs(loss - math.log(50257)) < 0.15, loss


def test_reference_sizes_and_dtypes():
    m = Model()                                      # the defaults are the reference
    counts = m.param_counts()
    assert counts["embedding (tied)"] == 50257 * 256 == 12_865_792
    assert 13.5e6 < counts["total"] < 13.7e6
    assert all(v.dtype == np.float32 for v in m.params.values())
    assert m.cfg.receptive_field == 1 + 2 * 3 * (1 + 4 + 64)
    m64 = Model(ModelConfig(**TINY), dtype=np.float64)
    loss, grads = m64.loss_and_grads(*_batch(6))
    assert all(g.dtype == np.float64 for g in grads.values()) and np.isfinite(loss)


def test_frozen_embedding_skips_its_gradient():
    m = tiny_model()
    idx, tgt = _batch(7)
    loss, grads = m.loss_and_grads(idx, tgt, train_embed=False)
    loss2, grads2 = m.loss_and_grads(idx, tgt)
    assert "embed.w" not in grads and loss == loss2
    for k in grads:
        np.testing.assert_array_equal(grads[k], grads2[k])


def test_ternary_model_weights_are_ternary_in_the_forward():
    m = Model(ModelConfig(**TINY), seed=0, dtype=np.float64)
    for name, (wt, s) in m._quantized().items():
        assert set(np.unique(wt)) <= {-1.0, 0.0, 1.0} and s == 1.0, name


def test_bad_input_is_rejected():
    m = Model(ModelConfig(**TINY))
    with pytest.raises(ValueError, match="token ids"):
        m.loss(np.array([[0, 23]]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        m.loss(np.array([0, 1]), np.array([0, 1]))
    with pytest.raises(ValueError, match="head"):
        ModelConfig(head="softmax")


@pytest.mark.parametrize("head", ["full", "hier"])
def test_sharded_batch_equals_one_shard(head):
    """Data parallelism over the batch (parallel.py) gives the same loss and gradients as one shard."""
    cfg = ModelConfig(**{**TINY, "head": head, "ternary": True})
    m = Model(cfg, seed=0, dtype=np.float64)
    idx, tgt = _batch(8, B=5, T=9)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, loss_frac=0.3)
    results = {}
    for workers in (1, 2, 3):
        m.workers = workers
        loss, grads = m.loss_and_grads(idx, tgt, rng=np.random.default_rng(1), **kw)
        results[workers] = (loss, grads, m.nll(idx, tgt))
    loss1, grads1, nll1 = results[1]
    for workers in (2, 3):
        loss, grads, nll = results[workers]
        assert abs(loss - loss1) < 1e-12
        np.testing.assert_allclose(nll, nll1, rtol=1e-12)
        for k in grads1:
            np.testing.assert_allclose(grads[k], grads1[k], rtol=1e-10, atol=1e-13, err_msg=k)


@pytest.mark.parametrize("head", ["full", "hier"])
def test_a_shard_with_no_counted_rows_and_a_frozen_embedding(head):
    cfg = ModelConfig(**{**TINY, "head": head, "ternary": False})
    m = Model(cfg, seed=0, dtype=np.float64)
    idx, tgt = _batch(9, B=2, T=4)
    out = {}
    for workers in (1, 2):
        m.workers = workers
        # one counted position out of 8: with two shards, one of them has none
        out[workers] = m.loss_and_grads(idx, tgt, loss_frac=0.125, rng=np.random.default_rng(3),
                                        train_embed=False)
    (l1, g1), (l2, g2) = out[1], out[2]
    assert abs(l1 - l2) < 1e-12 and "embed.w" not in g1 and "embed.w" not in g2
    for k in g1:
        np.testing.assert_allclose(g2[k], g1[k], rtol=1e-10, atol=1e-13, err_msg=k)
    f = lambda: m.loss_and_grads(idx, tgt, loss_frac=0.125, rng=np.random.default_rng(3))[0]
    check_grad("block.glu.up.w", g1["block.glu.up.w"], numerical_grad(f, m.params["block.glu.up.w"]))
