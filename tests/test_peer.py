"""nanoternary against its PyTorch peer (nanoternary/tools/torch_peer.py), in float64: the loss and
every gradient of a tiny model (our hand-written backward against torch's autograd), and the
optimizers (ours against torch.optim.AdamW and the peer's NorMuon). A second implementation is the
strongest check of a backward short of finite differences, as llm.c checks its C against PyTorch.
Skipped when torch is not installed (`pip install -e ".[peer]"`). A few seconds."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nanoternary.model import Model, ModelConfig  # noqa: E402
from nanoternary.optim import AdamW, NorMuon  # noqa: E402
from nanoternary.tools import torch_peer  # noqa: E402
from nanoternary.tools.torch_peer import TorchFlashLM, grads_dict, load_params, params_from  # noqa: E402
from nanoternary.tools.torch_train_peer import NorMuon as TorchNorMuon  # noqa: E402


def tiny(**kw):
    return ModelConfig(vocab_size=97, d_model=16, glu_hidden=24, n_recursions=2, dilations=(1, 2),
                       kernel_size=3, conv_groups=4, **kw)


def rel_err(got, want):
    """max |got - want| / max |want|: one number per tensor."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300))


def assert_all_close(got, want, tol, what):
    """Every tensor of two dicts within tol (relative); the failure names each offender and its error."""
    assert set(got) == set(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))}"
    errs = {k: rel_err(got[k], want[k]) for k in want}
    worst = max(errs, key=errs.get)
    bad = {k: f"{e:.2e}" for k, e in errs.items() if not e <= tol}
    assert not bad, f"{what}: relative error above {tol:g} in {bad}; worst {worst} {errs[worst]:.2e}"


def peer_of(model):
    peer = TorchFlashLM(model.cfg).double()
    load_params(peer, model.params)
    return peer


def batch(cfg, B=3, T=10, seed=1):
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))


@pytest.mark.parametrize("ternary,scale", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("eps,z,frac", [(0.0, 0.0, 1.0), (0.1, 1e-4, 1.0), (0.0, 0.0, 0.5), (0.1, 1e-2, 0.5)])
def test_loss_and_every_gradient_match_torch(ternary, scale, eps, z, frac):
    cfg = tiny(ternary=ternary, ternary_scale=scale)
    model = Model(cfg, seed=0, dtype=np.float64)
    idx, tgt = batch(cfg)
    loss, grads = model.loss_and_grads(idx, tgt, label_smoothing=eps, z_loss=z, loss_frac=frac,
                                       rng=np.random.default_rng(5))
    rows = None
    if frac < 1.0:             # the rows nanoternary drew: the same call on the same generator
        N = idx.size
        rows = np.sort(np.random.default_rng(5).choice(N, size=max(1, int(round(N * frac))), replace=False))
    peer = peer_of(model)
    t_loss = peer.loss(idx, tgt, rows, label_smoothing=eps, z_loss=z)
    t_loss.backward()
    e = rel_err(loss, t_loss.item())
    assert e <= 1e-10, f"loss: {loss!r} vs torch {t_loss.item()!r} (relative error {e:.2e})"
    assert_all_close(grads, grads_dict(peer), 1e-10, "gradients (nanoternary vs torch)")


def test_plain_loss_matches_and_params_round_trip():
    model = Model(tiny(), seed=3, dtype=np.float64)
    idx, tgt = batch(model.cfg, B=2, T=12, seed=2)
    peer = peer_of(model)
    with torch.no_grad():
        assert rel_err(model.loss(idx, tgt), peer.loss(idx, tgt).item()) <= 1e-12
    back = params_from(peer)
    assert all(np.array_equal(back[k], model.params[k]) for k in model.params)
    with pytest.raises(KeyError, match="block.glu.up.w"):
        load_params(peer, {k: v for k, v in model.params.items() if k != "block.glu.up.w"})


def test_hier_head_is_refused():
    with pytest.raises(ValueError, match="full"):
        TorchFlashLM(tiny(head="hier"))


def test_optimizers_match_torch():
    """A few steps on random float64 tensors with changing gradients and learning rates: our
    NorMuon against the peer's torch NorMuon (both orientations of a matrix), our AdamW against
    torch.optim.AdamW (decay on matrices and conv kernels, none on gains, as ours by default)."""
    rng = np.random.default_rng(0)
    shapes = {"wide": (6, 10), "tall": (12, 5), "conv": (8, 2, 3), "gain": (8,)}
    init = {k: rng.normal(size=s) for k, s in shapes.items()}
    muon_names, adam_names = ["wide", "tall"], ["wide", "tall", "conv", "gain"]
    ours = {k: v.copy() for k, v in init.items()}
    ours2 = {k: v.copy() for k, v in init.items()}            # AdamW on its own copy
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in init.items()}
    tp2 = {k: torch.tensor(v, requires_grad=True) for k, v in init.items()}
    muon, tmuon = NorMuon({k: ours[k] for k in muon_names}), TorchNorMuon([tp[k] for k in muon_names])
    adam = AdamW({k: ours2[k] for k in adam_names}, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    tadam = torch.optim.AdamW([{"params": [tp2[k] for k in adam_names if init[k].ndim >= 2]},
                               {"params": [tp2[k] for k in adam_names if init[k].ndim < 2], "weight_decay": 0.0}],
                              lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    for step, mult in enumerate([0.3, 1.0, 0.7, 1.0]):
        grads = {k: rng.normal(size=s) for k, s in shapes.items()}
        muon.step(ours, grads, lr=0.02 * mult)
        adam.step(ours2, grads, lr=3e-4 * mult)
        for k in shapes:
            tp[k].grad = torch.tensor(grads[k])
            tp2[k].grad = torch.tensor(grads[k])
        for g in tmuon.param_groups:
            g["lr"] = 0.02 * mult
        for g in tadam.param_groups:
            g["lr"] = 3e-4 * mult
        tmuon.step()
        tadam.step()
        assert_all_close({k: ours[k] for k in muon_names}, {k: tp[k].detach().numpy() for k in muon_names},
                         1e-12, f"NorMuon after step {step + 1}")
        assert_all_close(ours2, {k: v.detach().numpy() for k, v in tp2.items()}, 1e-12,
                         f"AdamW after step {step + 1}")
        assert_all_close({k: ours2[k] - init[k] for k in init}, {k: tp2[k].detach().numpy() - init[k] for k in init},
                         1e-11, f"AdamW updates after step {step + 1}")


def test_bench_runs_on_a_tiny_model(monkeypatch, capsys):
    """The bench entry point end to end (a tiny model, so it is quick); no assertion on speed."""
    monkeypatch.setattr(torch_peer, "ModelConfig", lambda: tiny())
    torch_peer.main(["bench", "--B", "2", "--T", "8", "--steps", "1", "--frac", "0.5", "--freeze-emb"])
    out = capsys.readouterr().out.strip()
    assert out.startswith("torch tok/s B=2 T=8") and float(out.split()[-1]) > 0


def test_train_peer_runs_and_logs(tmp_path, monkeypatch, capsys):
    """torch_train_peer end to end on a small text file and a small model: two steps, the log lines
    and their fields (the data through nanoternary.data, the cache in the test's folder)."""
    import json

    from nanoternary.tools import torch_train_peer
    monkeypatch.chdir(tmp_path)
    r = np.random.default_rng(0)
    words = ["the cat", "a dog", "sat on", "looked at", "the mat", "a red door", "the river"]
    docs = [" ".join(r.choice(words) for _ in range(60)) + "." for _ in range(200)]
    (tmp_path / "corpus.txt").write_text("<|endoftext|>".join(docs))
    small = ModelConfig(d_model=16, glu_hidden=24, dilations=(1, 2), kernel_size=3, conv_groups=4)
    monkeypatch.setattr(torch_train_peer, "TorchFlashLM", lambda: TorchFlashLM(small))
    out = tmp_path / "peer.jsonl"
    torch_train_peer.main(["--data", str(tmp_path / "corpus.txt"), "--out", str(out), "--max-steps", "2",
                           "--minutes", "5"])
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    assert set(recs[0]) == {"step", "tokens", "elapsed", "train_loss", "val_loss"}
    assert recs[-1]["final"] and recs[-1]["tokens"] == 2 * 4 * 4 * 128
    assert all(np.isfinite(r["val_loss"]) for r in recs)
    from nanoternary import runlog                 # compare reads the peer's log as train.py's: every record,
    assert runlog.read(out) == recs                # the final one too (its last steps and validation loss)
