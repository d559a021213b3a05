"""Tests for nanoternary/generate.py: incremental decoding against the full forward, the ternary
products of one position, packed checkpoints, and the sampling loop.

The reference for everything is the model itself: `Model.log_probs` over the whole sequence in one
pass. Incremental decoding (one batched prompt pass, then one token at a time through the ring
buffers) must give the same log-probabilities at every position, for prompts shorter and longer than
the receptive field, both kernels and both heads. Run: python -m pytest -q tests/test_generate.py
"""
import json

import numpy as np
import pytest

from nanoternary.checkpoint import CheckpointError, save_checkpoint
from nanoternary.generate import Generator, bench, main
from nanoternary.pack import export_packed, load_packed, load_weights, save_packed, weights_from_model
from nanoternary.model import TERNARY, Model, ModelConfig, quantize
from nanoternary.ops.ternary import addsub_plan, ternary_linear_forward

SMALL = dict(vocab_size=97, d_model=16, glu_hidden=24, n_recursions=2, dilations=(1, 4, 16),
             kernel_size=4, conv_groups=4, hier_classes=9)


def small_model(seed=0, dtype=np.float64, **kw):
    """A random small model with every tensor moved off its init (gains != 1, larger logits)."""
    cfg = ModelConfig(**{**SMALL, **kw})
    m = Model(cfg, seed=seed, dtype=dtype)
    r = np.random.default_rng(seed + 100)
    for k, v in m.params.items():
        v += (0.3 * r.standard_normal(v.shape) * (np.abs(v).mean() + 0.1)).astype(dtype)
    m.params["embed.w"] *= 20          # logits of order 1: a distribution with real structure
    return m


def incremental_log_probs(gen, ids, P):
    """Log-probs at every position of ids: positions < P from the prompt pass, the rest one by one."""
    H = gen.prefill(ids[:P])
    out = [gen.log_probs(h) for h in H]
    for t in range(P, len(ids)):
        out.append(gen.log_probs(gen.step(int(ids[t]))))
    return np.array(out)


def assert_close(name, got, want, tol):
    err = np.abs(got - want)
    i = np.unravel_index(np.argmax(err), err.shape)
    assert err.max() <= tol, (f"{name}: max |diff| {err.max():.3e} at {i} (position {i[0]}): "
                              f"got {got[i]!r}, want {want[i]!r}")


@pytest.mark.parametrize("head", ["full", "hier"])
@pytest.mark.parametrize("kernel", ["addsub", "blas"])
def test_incremental_equals_full_forward_float64(head, kernel):
    m = small_model(head=head)
    rf = m.cfg.receptive_field                            # 1 + 2 * 3 * (1+4+16) = 127
    ids = np.random.default_rng(1).integers(0, m.cfg.vocab_size, rf + 40)
    want = m.log_probs(ids[None])[0]                      # (T, V): one pass over everything
    gen = Generator(m, kernel=kernel)
    for P in (1, 5, 20, rf + 10):                         # all-incremental ... prompt > receptive field
        got = incremental_log_probs(gen, ids, P)
        assert_close(f"{head}/{kernel}, prompt {P}", got, want, 1e-9)


def test_prompt_pass_in_row_chunks(monkeypatch):
    """The addsub kernel cuts long prompts into row chunks (bounded memory): same result."""
    import nanoternary.ops.ternary as ternary
    m = small_model()
    ids = np.random.default_rng(8).integers(0, 97, 70)
    want = m.log_probs(ids[None])[0]
    monkeypatch.setattr(ternary, "ADDSUB_VALUES", 1000)     # about 5 rows per chunk here
    got = incremental_log_probs(Generator(m), ids, 60)
    assert_close("chunked prompt pass", got, want, 1e-9)


def test_incremental_equals_full_forward_logits_and_scale():
    """Raw logits (not only log-probs) and BitNet's per-tensor scale s != 1."""
    m = small_model(ternary_scale=True, n_recursions=3, dilations=(2, 5))
    ids = np.random.default_rng(2).integers(0, 97, m.cfg.receptive_field + 15)
    h = m.hidden(ids[None])
    want = h @ m.params["embed.w"].T
    for kernel in ("addsub", "blas"):
        gen = Generator(m, kernel=kernel)
        H = gen.prefill(ids[:3])
        got = [gen.logits(x).copy() for x in H] + [gen.logits(gen.step(int(t))).copy() for t in ids[3:]]
        assert_close(f"logits, {kernel}", np.array(got), want, 1e-9)


@pytest.mark.parametrize("head", ["full", "hier"])
@pytest.mark.parametrize("kernel", ["addsub", "blas"])
def test_incremental_equals_full_forward_float32(head, kernel):
    m = small_model(head=head, dtype=np.float32)
    ids = np.random.default_rng(3).integers(0, 97, m.cfg.receptive_field + 30)
    want = m.log_probs(ids[None])[0].astype(np.float64)
    gen = Generator(m, kernel=kernel)
    assert gen.dtype == np.float32
    got = incremental_log_probs(gen, ids, 10)
    assert_close(f"float32 {head}/{kernel}", got, want, 2e-4)


def test_float_model_runs_with_blas():
    m = small_model(ternary=False)
    ids = np.random.default_rng(4).integers(0, 97, 60)
    got = incremental_log_probs(Generator(m, kernel="blas"), ids, 7)
    assert_close("ternary=False", got, m.log_probs(ids[None])[0], 1e-9)
    with pytest.raises(ValueError, match="addsub"):
        Generator(m, kernel="addsub")


def test_state_does_not_grow():
    """Constant cost per token: the only state is one ring of (K-1)*D rows per conv (and the row of
    the new input), whatever t is."""
    m = small_model()
    gen = Generator(m)
    gen.prefill([1, 2, 3])
    sizes = [[c.buf.shape for c in rings] for rings in gen.rings]
    assert sizes == [[(4, 3 * D + 1, 4) for D in (1, 4, 16)]] * 2    # (G, (K-1)*D + 1, C/G) per layer and application
    for t in range(200):
        gen.step(t % 97)
    assert [[c.buf.shape for c in rings] for rings in gen.rings] == sizes
    assert gen.pos == 203


# ----------------------------------------------------------------------------------------------
# the ternary products of one position


@pytest.mark.parametrize("s", [1.0, 0.37])
def test_one_position_through_the_op_equals_a_product(s):
    """A step runs the op on one row: y = s * W_t x, with all-zero rows and a row with no zeros."""
    r = np.random.default_rng(5)
    wt = r.choice(np.array([-1, 0, 1], dtype=np.int8), size=(11, 9), p=[0.3, 0.4, 0.3])
    wt[3] = 0                            # an all-zero row, in the middle
    wt[-1] = 0                           # and at the end
    wt[5] = 1                            # a row with no zeros
    x = r.standard_normal((1, 9))
    want = s * (x @ wt.T.astype(np.float64))
    for kernel, plan in (("addsub", addsub_plan(wt)), ("blas", None)):
        y, _ = ternary_linear_forward(x, wt.astype(np.float64), s, kernel, plan)
        np.testing.assert_allclose(y, want, rtol=0, atol=1e-12, err_msg=kernel)


# ----------------------------------------------------------------------------------------------
# packed checkpoints


@pytest.mark.parametrize("scheme", ["2bit", "base3"])
@pytest.mark.parametrize("head", ["full", "hier"])
def test_packed_export_round_trip(tmp_path, scheme, head):
    m = small_model(head=head, dtype=np.float32)
    ckpt = str(tmp_path / "latest.npz")
    save_checkpoint(ckpt, m.params, {"config": m.cfg.to_dict(), "step": 7},
                    class_map=m.hier.state() if m.hier else None)
    out = str(tmp_path / "model-packed.npz")
    rep = export_packed(str(tmp_path), out, scheme)       # the run folder -> its latest.npz
    assert rep["bytes"] < rep["source_bytes"]
    assert rep["ternary_weights"] == sum(m.params[k].size for k in TERNARY)
    bound = {"2bit": 2.0, "base3": 1.6}[scheme]
    assert bound <= rep["bits_per_ternary_weight"] < bound + 0.05
    w = load_packed(out)
    assert w.kind == "packed" and w.meta["source"]["step"] == 7
    q = quantize(m.params, m.cfg)
    for name in TERNARY:                                  # exactly the model's quantized weights
        np.testing.assert_array_equal(w.ternary[name][0], q[name][0], err_msg=name)
        assert w.ternary[name][1] == q[name][1]
    for k, v in m.params.items():
        if k not in TERNARY:
            np.testing.assert_array_equal(w.params[k], v, err_msg=k)
    assert load_weights(out).kind == "packed"            # load_weights tells the kinds apart
    assert load_weights(str(tmp_path)).kind == "full"
    ids = np.random.default_rng(6).integers(0, 97, 150)
    for kernel in ("addsub", "blas"):
        a = incremental_log_probs(Generator(out, kernel=kernel), ids, 20)
        b = incremental_log_probs(Generator(ckpt, kernel=kernel), ids, 20)
        np.testing.assert_array_equal(a, b)               # same weights, same ops: bit for bit


def test_packed_embed_fp16(tmp_path):
    m = small_model(dtype=np.float32)
    full = export_packed(m, str(tmp_path / "a.npz"))
    half = export_packed(m, str(tmp_path / "b.npz"), embed_fp16=True)
    assert half["bytes"] < full["bytes"] - 0.4 * m.params["embed.w"].nbytes
    w = load_packed(str(tmp_path / "b.npz"))
    assert w.params["embed.w"].dtype == np.float32        # widened on load, for the BLAS GEMV
    ids = np.arange(40) % 97
    a = incremental_log_probs(Generator(w), ids, 5)
    b = incremental_log_probs(Generator(m), ids, 5)
    assert_close("fp16 embedding", a, b, 0.05)


def test_stored_ternary_weights_are_used_as_they_are(tmp_path):
    """A matrix with no zeros would become all zeros if quantized again (mean|W| = 1): the generator
    must run the stored weights. Reference: a float model whose weights ARE those -1/+1 matrices."""
    ref = small_model(ternary=False)
    r = np.random.default_rng(7)
    w = weights_from_model(small_model())
    for name in TERNARY:
        pm = r.choice(np.array([-1, 1], dtype=np.int8), size=ref.params[name].shape)
        ref.params[name] = pm.astype(np.float64)
        w.ternary[name] = (pm, 1.0)
    for k in w.params:
        ref.params[k] = w.params[k]
    save_packed(w, str(tmp_path / "pm.npz"), "base3")
    ids = r.integers(0, 97, 50)
    got = incremental_log_probs(Generator(str(tmp_path / "pm.npz")), ids, 9)
    assert_close("+-1 weights", got, ref.log_probs(ids[None])[0], 1e-9)


def test_bad_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="train.py"):
        load_weights(str(tmp_path))                        # empty run folder
    (tmp_path / "junk.npz").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a .npz"):
        load_weights(str(tmp_path / "junk.npz"))
    np.savez(tmp_path / "foreign.npz", x=np.zeros(3))
    with pytest.raises(CheckpointError, match="no 'meta'"):
        load_weights(str(tmp_path / "foreign.npz"))
    m = small_model(dtype=np.float32)
    export_packed(m, str(tmp_path / "p.npz"))
    data = (tmp_path / "p.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_weights(str(tmp_path / "cut.npz"))
    other = small_model(dtype=np.float32, glu_hidden=12)   # packed tensors of the wrong size
    w = weights_from_model(other)
    w.cfg = m.cfg
    save_packed(w, str(tmp_path / "mismatch.npz"))
    with pytest.raises(CheckpointError, match="shape"):
        load_weights(str(tmp_path / "mismatch.npz"))


def test_export_cli(tmp_path, capsys):
    m = small_model(dtype=np.float32)
    save_checkpoint(str(tmp_path / "latest.npz"), m.params, {"config": m.cfg.to_dict()})
    assert main(["export", "--checkpoint", str(tmp_path), "--scheme", "base3", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["path"] == str(tmp_path / "model-packed.npz") and rep["scheme"] == "base3"
    assert main(["export", "--checkpoint", str(tmp_path / "missing")]) == 1
    assert "train.py" in capsys.readouterr().err


def test_bench_smoke():
    out = bench(tokens=3, prompt_len=5, cfg=ModelConfig(**SMALL))
    assert set(out["kernels"]) == {"addsub", "blas"}
    assert out["kernels"]["addsub"]["tokens_per_s"] > 0 and out["head_gemv_ms"] > 0


# ----------------------------------------------------------------------------------------------
# the sampling loop


def run(gen, prompt, n=30, **kw):
    return list(gen.generate(prompt, n, **kw))


@pytest.mark.parametrize("head", ["full", "hier"])
def test_same_seed_same_tokens(head):
    gen = Generator(small_model(head=head, dtype=np.float32), eot=96)
    kw = dict(temperature=1.0, stop_at_eot=False)
    a = run(gen, [1, 2, 3], rng=np.random.default_rng(0), **kw)
    b = run(gen, [1, 2, 3], rng=np.random.default_rng(0), **kw)
    c = run(gen, [1, 2, 3], rng=np.random.default_rng(1), **kw)
    assert a == b and a != c
    assert len(a) == 30 and all(0 <= t < 97 for t in a)
    assert gen.stats.new_tokens == 30 and gen.stats.prompt_tokens == 3


@pytest.mark.parametrize("head", ["full", "hier"])
def test_flags_reach_the_sampler(head):
    gen = Generator(small_model(head=head), eot=96)
    greedy = run(gen, [5, 6], temperature=0, stop_at_eot=False)
    for seed in range(3):   # top_k=1 leaves one token (one class, then one token): greedy whatever the seed
        assert run(gen, [5, 6], temperature=1.5, top_k=1, rng=np.random.default_rng(seed),
                   stop_at_eot=False) == greedy
        assert run(gen, [5, 6], temperature=1.0, top_p=1e-9, rng=np.random.default_rng(seed),
                   stop_at_eot=False) == greedy
    if head == "full":      # greedy = the argmax of the full forward, token after token
        m = small_model(head=head)
        seq = [5, 6]
        for _ in range(10):
            seq.append(int(np.argmax(m.log_probs(np.array([seq]))[0, -1])))
        assert greedy[:10] == seq[2:]
    with pytest.raises(ValueError, match="top_k"):
        gen.generate([1], 5, top_k=0)                    # checked when called, not at the first token


def test_eot_stops_and_empty_prompt_starts_from_it():
    m = small_model()
    gen = Generator(m, eot=96)
    assert run(gen, [], temperature=0) == run(gen, [96], temperature=0)
    first = run(Generator(m, eot=0), [4, 5], n=1, temperature=0, stop_at_eot=False)[0]
    stopper = Generator(m, eot=first)               # make the greedy first token the EOT
    assert run(stopper, [4, 5], temperature=0) == []
    assert stopper.stats.stop_reason == "eot"
    goes_on = run(stopper, [4, 5], n=8, temperature=0, stop_at_eot=False)
    assert goes_on[0] == first and len(goes_on) == 8
    assert stopper.stats.stop_reason == "length"
    with pytest.raises(ValueError, match="vocabulary"):
        Generator(m).generate([], 3)                     # eot 50256 is not in a vocabulary of 97


def test_ema_weights(tmp_path):
    """--ema: the EMA-averaged weights train.py stores as opt/ema/shadow/<name>."""
    m = small_model(dtype=np.float32)
    shadow = {k: (v * 0.5).astype(np.float32) for k, v in m.params.items()}
    opt = {"ema/kind": np.array("EMA"), **{f"ema/shadow/{k}": v for k, v in shadow.items()}}
    save_checkpoint(str(tmp_path / "latest.npz"), m.params, {"config": m.cfg.to_dict()}, opt)
    w = load_weights(str(tmp_path), ema=True)
    np.testing.assert_array_equal(w.params["embed.w"], shadow["embed.w"])
    ref = Model(m.cfg, dtype=np.float32)
    ref.params = shadow
    q = quantize(ref.params, ref.cfg)
    for name in TERNARY:                                  # quantized from the EMA latents
        np.testing.assert_array_equal(w.ternary[name][0], q[name][0])
    np.testing.assert_array_equal(load_weights(str(tmp_path)).params["embed.w"], m.params["embed.w"])
    rep = export_packed(str(tmp_path), str(tmp_path / "p.npz"), ema=True)
    assert load_packed(rep["path"]).meta["source"]["ema"] is True
    with pytest.raises(CheckpointError, match="packed"):
        load_weights(rep["path"], ema=True)
    save_checkpoint(str(tmp_path / "plain.npz"), m.params, {"config": m.cfg.to_dict()})
    with pytest.raises(CheckpointError, match="no EMA"):
        load_weights(str(tmp_path / "plain.npz"), ema=True)
