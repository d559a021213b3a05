"""Experiments a learner runs: a float core (--no-ternary), the equal-wall-clock comparison tool,
the report of every run, --init-from and the evaluation of any checkpoint on any text. (The float
core's gradient check is gradcheck.py's "model, ..." checks: they run the model with ternary=False,
which is what --no-ternary trains.)"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from test_train import ROOT, TINY, corpus, read_log, write_corpus  # noqa: F401  (corpus: a fixture)

import train  # noqa: E402  (test_train put the repository on sys.path)
from nanoternary.checkpoint import load_checkpoint
from nanoternary.data import get_batch, prepare
from nanoternary.model import Model, ModelConfig, quantize

SAMPLE = os.path.join(ROOT, "sample.py")


def test_no_ternary_trains_samples_and_refuses_to_pack(corpus, capsys):
    assert train.main(["--data", corpus, "--out", "fl", "--max-steps", "6", "--no-ternary"] + TINY) == 0
    m = Model.load("fl")
    assert m.cfg.ternary is False
    wt, s = quantize(m.params, m.cfg)["block.glu.up.w"]          # the forward uses the float weights as they are
    assert wt is m.params["block.glu.up.w"] and s == 1.0 and len(np.unique(wt)) > 3
    assert "float" in open(os.path.join("fl", "report.md")).read()
    r = subprocess.run([sys.executable, SAMPLE, "--checkpoint", "fl", "--prompt", "the cat", "--max-new-tokens", "5"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("the cat"), r.stderr
    assert "float (--no-ternary) core, kernel blas" in r.stderr
    from nanoternary.generate import main as generate_main
    capsys.readouterr()
    assert generate_main(["export", "--checkpoint", "fl"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--no-ternary" in err and err.count("\n") == 1, err
    # the ternary run of the same settings and seed: the same weights at init, another forward
    assert train.main(["--data", corpus, "--out", "te", "--max-steps", "6"] + TINY) == 0
    t = Model.load("te")
    assert set(np.unique(quantize(t.params, t.cfg)["block.glu.up.w"][0])) == {-1.0, 0.0, 1.0}
    assert read_log("te")[0]["train_loss"] != read_log("fl")[0]["train_loss"]


def test_report_after_a_normal_end(corpus):
    assert train.main(["--data", corpus, "--out", "rep", "--max-steps", "8", "--eval-interval", "4",
                       "--label-smoothing", "0.1"] + TINY) == 0
    text = open(os.path.join("rep", "report.md")).read()
    log = read_log("rep")
    best = min(r["val_loss"] for r in log if "val_loss" in r)
    for part in ("**Finished (8 steps)**: 8 steps, 1,024 tokens", "python train.py --data", "`--label-smoothing` | 0.1 | 0.0",
                 "--loss-frac 0.25", "| train |", "tokens/s", "Where a training step's time went", "| head forward |",
                 f"{best:.4f}", "## A sample", "prompt `The`", "latest.npz, best.npz"):
        assert part in text, part
    assert ("![training and validation loss](loss.png)" in text) == os.path.exists(os.path.join("rep", "loss.png"))


def test_report_after_ctrl_c_and_a_resume(corpus, monkeypatch):
    real_step = train.train_step

    def interrupted(*args):
        out = real_step(*args)
        if args[-1].step + 1 == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return out
    monkeypatch.setattr(train, "train_step", interrupted)
    assert train.main(["--data", corpus, "--out", "cc", "--max-steps", "9"] + TINY) == 130
    text = open(os.path.join("cc", "report.md")).read()
    assert "**Stopped by SIGINT**: 5 steps" in text and "| 1 | `python" in text and "| 2 | `python" not in text
    assert "| `--dilations` | 1,2 | 1,4,64 |" in text
    monkeypatch.setattr(train, "train_step", real_step)
    assert train.main(["--data", corpus, "--out", "cc", "--resume"] + TINY) == 0
    text = open(os.path.join("cc", "report.md")).read()
    assert "**Finished (9 steps)**: 9 steps" in text
    assert "| 1 | `python train.py" in text and "| 0 -> 5 | stopped by SIGINT |" in text
    assert "| 2 | `python train.py" in text and "--resume" in text and "| 5 -> 9 | finished (9 steps) |" in text


def test_report_after_a_divergence(corpus, monkeypatch):
    from nanoternary.fast import step
    real, calls = step.part_loss_and_grads, {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        loss, grads = real(*a, **k)
        return (float("nan") if calls["n"] == 5 else loss), grads
    monkeypatch.setattr(step, "part_loss_and_grads", poisoned)
    assert train.main(["--data", corpus, "--out", "nan", "--max-steps", "20", "--save-interval", "2"] + TINY) == 1
    text = open(os.path.join("nan", "report.md")).read()
    assert "**Diverged (step 5: the training loss is nan" in text and "From nan/latest.npz" in text


def test_init_from_starts_from_the_checkpoint_weights(corpus, capsys):
    assert train.main(["--data", corpus, "--out", "pre", "--max-steps", "10", "--dtype", "float64"] + TINY) == 0
    pre = Model.load("pre")
    other = write_corpus(".", n_docs=200, seed=7)                   # "my own text"
    os.rename(other, "other.parquet")
    flags = ["--data", "other.parquet", "--out", "ft", "--init-from", os.path.join("pre", "latest.npz"),
             "--max-steps", "1", "--loss-frac", "1", "--z-loss", "0", "--seed", "3", "--dtype", "float64",
             "--batch-size", "4", "--seq-len", "32", "--embed-init", "random", "--log-interval", "1"]
    assert train.main(flags) == 0
    data = prepare(["other.parquet"], verbose=False)
    x, y = get_batch(data.train, 4, 32, np.random.default_rng(3))     # the run's first batch
    assert read_log("ft")[0]["train_loss"] == pytest.approx(pre.loss(x, y), abs=1e-5)
    ft = load_checkpoint("ft")[1]
    assert ft["step"] == 1 and ModelConfig.from_dict(ft["config"]) == pre.cfg and ft["embed_source"] == "checkpoint"
    assert "weights of pre/latest.npz" in capsys.readouterr().out
    # a model flag that disagrees with the checkpoint: one line
    assert train.main(flags[:3] + ["ft2"] + flags[4:] + ["--d-model", "32"]) == 1
    err = capsys.readouterr().err
    assert "--init-from pre/latest.npz has --d-model 16, not 32" in err and err.count("\n") == 1, err
    assert train.main(flags[:3] + ["ft3"] + flags[4:5] + ["nothing.npz"] + flags[6:]) == 1
    assert "--init-from: no checkpoint nothing.npz" in capsys.readouterr().err


def test_evaluate_any_checkpoint_on_any_text(corpus, capsys):
    from nanoternary import evaluate
    from nanoternary.generate import main as generate_main
    assert train.main(["--data", corpus, "--out", "ev", "--max-steps", "6", "--dtype", "float64"] + TINY) == 0
    text = write_corpus(".", n_docs=60, seed=11)
    os.rename(text, "unseen.parquet")
    full = evaluate.evaluate("ev", ["unseen.parquet"], tokens=2048, seq_len=32, verbose=False)
    assert full["tokens"] == 2048 and full["kind"] == "full" and full["step"] == 6
    # the same windows through the model itself
    m = Model.load("ev")
    data = prepare(["unseen.parquet"], val_fraction=0.0, verbose=False)
    from nanoternary.data import val_windows
    windows = val_windows(data.train, 8, 32, 8, seed=0)
    want = np.mean([m.nll(x, y).mean() for x, y in windows])
    assert full["nll"] == pytest.approx(want, rel=1e-6)
    assert full["bits_per_byte"] == pytest.approx(want / np.log(2) / (data.meta["train_bytes"] / data.meta["train_tokens"]),
                                                  rel=1e-5)
    assert generate_main(["export", "--checkpoint", "ev", "--out", "ev-packed.npz"]) == 0
    packed = evaluate.evaluate("ev-packed.npz", ["unseen.parquet"], tokens=2048, seq_len=32, verbose=False)
    assert packed["kind"] == "packed" and packed["nll"] == pytest.approx(full["nll"], rel=1e-9)
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", "ev", "--data", "unseen.parquet", "--tokens", "1024", "--seq-len", "32",
                          "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 1024
    assert evaluate.main(["--checkpoint", "nowhere", "--data", "unseen.parquet"]) == 1
    assert capsys.readouterr().err.startswith("error: checkpoint nowhere does not exist")


def test_compare_runs_named_variants(corpus, tmp_path, capsys, monkeypatch):
    from nanoternary.tools import compare
    out = str(tmp_path / "cmp")
    assert compare.main(["--data", corpus, "--minutes", "0.03", "--out", out, "base=", "float=--no-ternary",
                         "--"] + TINY + ["--eval-interval", "1000"]) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert list(summary) == ["base", "float"]
    for name, s in summary.items():
        assert 0 < s["val_loss"] < 12 and s["steps"] > 0 and s["tokens"] == s["steps"] * 128, (name, s)
        assert os.path.exists(os.path.join(out, name, "report.md"))
    assert Model.load(os.path.join(out, "float")).cfg.ternary is False
    table = capsys.readouterr().out
    assert "equal wall clock, 0.03 minutes each" in table and "--no-ternary" in table
    with pytest.raises(SystemExit):
        compare.main(["--data", corpus, "bad variant"])
    assert "NAME=\"FLAGS\"" in capsys.readouterr().err
    checked = []                                                   # --peer before a variant: not its PYTHON

    def no_peer(python):
        checked.append(python)
        raise SystemExit(3)
    monkeypatch.setattr(compare, "check_peer", no_peer)
    with pytest.raises(SystemExit):
        compare.main(["--peer", "base=", "--out", out])
    assert checked == [sys.executable]
