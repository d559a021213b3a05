"""The whole plain model (model.py): finite-difference checks on a tiny configuration, gradients at
each block application, causality, the loss at initialisation, and the reference's sizes."""
import math

import numpy as np
import pytest

from nanoternary.gradcheck import TINY, check_grad, numerical_grad, tiny_model
from nanoternary.model import Model, ModelConfig, block_backward, block_forward, quantize
from nanoternary.ops.head import softmax_ce_backward, softmax_ce_forward
from nanoternary.ops.norm import rmsnorm_backward, rmsnorm_forward


def _batch(seed, B=2, T=7, V=23):
    r = np.random.default_rng(seed)
    return r.integers(0, V, (B, T)), r.integers(0, V, (B, T))


@pytest.mark.parametrize("kw", [dict(conv_groups=8, n_recursions=3), dict(ternary_scale=True)])
def test_whole_model_gradients_other_shapes(kw):
    m = tiny_model(**kw)
    idx, tgt = _batch(1)
    loss, grads = m.loss_and_grads(idx, tgt)
    assert set(grads) == set(m.params)
    assert abs(loss - m.loss(idx, tgt)) < 1e-12, "loss_and_grads must differentiate loss()"
    for name, p in m.params.items():
        check_grad(name, grads[name], numerical_grad(lambda: m.loss(idx, tgt), p))


def test_gradients_at_each_block_input():
    """d loss / d x at the input of every application of the weight-shared block, through
    block_forward / block_backward (the functions forward and backward are made of)."""
    m = tiny_model()
    p, cfg = m.params, m.cfg
    idx, tgt = _batch(3)
    q = quantize(p, cfg)

    def loss_from(r, x):                          # block applications r .. n-1, final norm, head
        caches = []
        for _ in range(r, cfg.n_recursions):
            x, c = block_forward(x, p, q, cfg)
            caches.append(c)
        h, c_norm = rmsnorm_forward(x, p["norm_f.g"])
        loss, c_head = softmax_ce_forward(h.reshape(-1, cfg.d_model), p["embed.w"], tgt.reshape(-1))
        return loss, (caches, c_norm, c_head)

    xs, x = [], p["embed.w"][idx]
    for _ in range(cfg.n_recursions):
        xs.append(x.copy())
        x, _ = block_forward(x, p, q, cfg)
    for r, x_r in enumerate(xs):
        _, (caches, c_norm, c_head) = loss_from(r, x_r)
        dh, _ = softmax_ce_backward(1.0, c_head)
        dx, _ = rmsnorm_backward(dh.reshape(x_r.shape), c_norm)
        grads = {k: np.zeros_like(v) for k, v in p.items()}
        for c in reversed(caches):
            dx = block_backward(dx, c, cfg, grads)
        check_grad(f"input of block application {r}", dx, numerical_grad(lambda: loss_from(r, x_r)[0], x_r))


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


@pytest.mark.parametrize("head", ["full", "hier", "adaptive"])
def test_log_probs_normalised_and_match_loss(head):
    m = Model(ModelConfig(**{**TINY, "head": head, "adaptive_div": 2}), seed=0, dtype=np.float64)
    idx, tgt = _batch(4)
    lp = m.log_probs(idx)
    assert lp.shape == (2, 7, 23)
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, rtol=1e-10)
    picked = -np.take_along_axis(lp, tgt[..., None], -1)[..., 0]
    assert abs(picked.mean() - m.loss(idx, tgt)) < 1e-10
    assert abs(m.loss_and_grads(idx, tgt)[0] - m.loss(idx, tgt)) < 1e-12


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


def test_counted_positions_only():
    """With loss_frac, the loss is the mean over the drawn positions only."""
    m = tiny_model()
    idx, tgt = _batch(8)
    rows = m.counted_rows(idx.size, 0.5, np.random.default_rng(2))
    loss, _ = m.loss_and_grads(idx, tgt, loss_frac=0.5, rng=np.random.default_rng(2))
    assert rows.size == 7 and np.all(np.diff(rows) > 0)
    assert abs(loss - m.nll(idx, tgt).reshape(-1)[rows].mean()) < 1e-12


def test_ternary_model_weights_are_ternary_in_the_forward():
    m = Model(ModelConfig(**TINY), seed=0, dtype=np.float64)
    for name, (wt, s) in quantize(m.params, m.cfg).items():
        assert set(np.unique(wt)) <= {-1.0, 0.0, 1.0} and s == 1.0, name


def test_bad_input_is_rejected():
    m = Model(ModelConfig(**TINY))
    with pytest.raises(ValueError, match="token ids"):
        m.loss(np.array([[0, 23]]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        m.loss(np.array([0, 1]), np.array([0, 1]))
    for bad, words in ((dict(head="softmax"), "--head"), (dict(d_model=0), "--d-model"),
                       (dict(kernel_size=0), "--kernel-size"), (dict(conv_groups=0), "--conv-groups"),
                       (dict(n_recursions=0), "--n-recursions"), (dict(glu_hidden=0), "--glu-hidden"),
                       (dict(dilations=(1, 0)), "--dilations"), (dict(d_model=30), "divisible")):
        with pytest.raises(ValueError, match=words):
            ModelConfig(**bad)
