"""train.py end to end on a tiny model and a corpus the test writes: learning, resume, Ctrl-C, NaN."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from nanoternary.checkpoint import load_checkpoint  # noqa: E402
from nanoternary.model import Model  # noqa: E402

TINY = ["--d-model", "16", "--glu-hidden", "24", "--dilations", "1,2", "--kernel-size", "2",
        "--conv-groups", "4", "--batch-size", "4", "--seq-len", "32", "--eval-tokens", "256",
        "--log-interval", "1", "--embed-init", "random", "--threads", "2"]


def write_corpus(folder, n_docs=240, seed=0):
    """Sentences from a tiny grammar: easy to learn, so the loss must fall."""
    r = np.random.default_rng(seed)
    subj = ["the cat", "a dog", "my sister", "the old farmer", "our teacher"]
    verb = ["sat on", "looked at", "walked to", "painted", "found"]
    obj = ["the mat", "a red door", "the river", "an apple", "the garden"]
    docs = [" ".join(f"{r.choice(subj)} {r.choice(verb)} {r.choice(obj)}." for _ in range(r.integers(5, 15)))
            for _ in range(n_docs)]
    path = os.path.join(folder, "corpus.parquet")
    pq.write_table(pa.table({"text": docs, "id": [str(i) for i in range(n_docs)]}), path)
    return path


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)            # data/ caches land in the test's folder
    return write_corpus(str(tmp_path))


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def test_tiny_model_learns(corpus, capsys):
    assert train.main(["--data", corpus, "--out", "run", "--max-steps", "40", "--eval-interval", "20",
                       "--lr-adam", "3e-3", "--warmup", "5"] + TINY) == 0
    out = capsys.readouterr().out
    assert "step    40" in out and "val loss" in out
    log = read_log("run")
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    assert len(vals) == 2 and vals[-1] < vals[0] - 0.5 and vals[0] < 10.9, vals
    assert log[0]["train_loss"] > log[-1]["train_loss"] + 1.0
    assert [r["step"] for r in log] == list(range(1, 41))
    for r in log:
        assert {"step", "tokens", "train_loss", "elapsed"} <= set(r)
    m = Model.load("run")                                   # the folder -> latest.npz
    assert m.cfg.d_model == 16 and m.meta["step"] == 40
    best = Model.load(os.path.join("run", "best.npz"))
    assert abs(best.meta["val_loss"] - min(vals)) < 1e-5


def test_resume_gives_the_same_losses(corpus, monkeypatch):
    common = ["--data", corpus, "--max-steps", "12", "--eval-interval", "4", "--save-interval", "3",
              "--warmup", "3", "--loss-frac", "0.5", "--ema", "0.9", "--grad-accum", "2"] + TINY
    assert train.main(common + ["--out", "a"]) == 0

    real_step = train.train_step

    def interrupted(*args):                                 # a Ctrl-C arrives during step 7
        out = real_step(*args)
        if args[-1].step + 1 == 7:
            os.kill(os.getpid(), signal.SIGINT)
        return out
    monkeypatch.setattr(train, "train_step", interrupted)
    assert train.main(common + ["--out", "b"]) == 130        # the shell's status for SIGINT
    assert load_checkpoint("b")[1]["step"] == 7
    monkeypatch.setattr(train, "train_step", real_step)
    assert train.main(common + ["--out", "b", "--resume"]) == 0

    a, b = read_log("a"), read_log("b")
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, 13))
    for ra, rb in zip(a, b):
        assert ra["train_loss"] == rb["train_loss"], (ra, rb)
        assert ra.get("val_loss") == rb.get("val_loss"), (ra, rb)
    pa_, pb = load_checkpoint("a")[0], load_checkpoint("b")[0]
    for k in pa_:
        np.testing.assert_array_equal(pa_[k], pb[k], err_msg=k)


def test_resume_refuses_other_settings(corpus, capsys):
    assert train.main(["--data", corpus, "--out", "r", "--max-steps", "2"] + TINY) == 0
    assert train.main(["--data", corpus, "--out", "r", "--max-steps", "3", "--resume", "--head", "hier"] + TINY) == 1
    assert "started with --head full" in capsys.readouterr().err
    assert train.main(["--data", corpus, "--out", "nothing-here", "--resume"] + TINY) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus, monkeypatch, capsys):
    from nanoternary.fast import step
    real = step.part_loss_and_grads
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        loss, grads = real(*a, **k)
        return (float("nan") if calls["n"] == 5 else loss), grads
    monkeypatch.setattr(step, "part_loss_and_grads", poisoned)
    code = train.main(["--data", corpus, "--out", "n", "--max-steps", "20", "--save-interval", "2"] + TINY)
    assert code == 1
    err = capsys.readouterr().err
    assert "step 5" in err and "nan" in err and "last good checkpoint" in err
    m = Model.load("n")
    assert m.meta["step"] == 4
    assert all(np.isfinite(v).all() for v in m.params.values())


def test_sigint_to_a_training_process_leaves_a_loadable_checkpoint(corpus, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data", corpus, "--out", "s",
           "--max-steps", "100000", "--eval-interval", "100000"] + TINY
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline:
        if os.path.exists(tmp_path / "s" / "log.jsonl") and len(read_log(tmp_path / "s")) >= 3:
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 130, out
    assert "stopped by SIGINT" in out
    m = Model.load(str(tmp_path / "s"))
    assert m.meta["step"] >= 3
    assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path / "s"))


def test_hier_head_trains_and_saves_its_class_map(corpus):
    assert train.main(["--data", corpus, "--out", "h", "--max-steps", "6", "--head", "hier",
                       "--hier-classes", "20"] + TINY) == 0
    m = Model.load("h")
    assert m.cfg.head == "hier" and m.hier.n_classes == 20
    # the class map came from the training data's counts, not the default
    from nanoternary.classmap import ClassMap
    assert not np.array_equal(m.hier.token_class, ClassMap.default(50257, 20).token_class)


def test_time_budget_and_token_limit(corpus):
    assert train.main(["--data", corpus, "--out", "t", "--max-steps", "0", "--max-tokens", "1000"] + TINY) == 0
    log = read_log("t")
    assert log[-1]["tokens"] >= 1000 and log[-2]["tokens"] < 1000
    assert train.main(["--data", corpus, "--out", "u", "--max-steps", "0", "--time-budget", "0.05",
                       "--eval-interval", "1000"] + TINY) == 0
    log = read_log("u")
    assert 3.0 <= log[-1]["elapsed"] < 3.0 + 20
    assert "val_loss" in log[-1]


def test_defaults_that_depend_on_other_settings():
    def resolved(flags, head="full", embed_source="gpt2"):
        cfg = train.TrainConfig(**flags)
        train.resolve_defaults(cfg, head, embed_source)
        return cfg
    assert resolved(dict(time_budget=30)).max_steps == 0 and resolved(dict(max_tokens=9)).max_steps == 0
    assert resolved({}).max_steps == 4000                           # the reference's length
    assert resolved(dict(max_steps=7, time_budget=30)).max_steps == 7
    assert resolved({}).loss_frac == 0.25 and resolved({}, head="hier").loss_frac == 1.0
    assert resolved(dict(loss_frac=0.5), head="hier").loss_frac == 0.5
    assert resolved({}).freeze_embed_steps == 1000 and resolved({}, embed_source="random").freeze_embed_steps == 0
    assert resolved(dict(freeze_embed_steps=5)).freeze_embed_steps == 5
    helps = train.run.build_parser(train.TrainConfig, train.ModelConfig).format_help()
    for rule in ("0.25 [0.25] with the full head, 1 with the hier head", "1000 [1000] with GPT-2's",
                 "no limit with --time-budget or --max-tokens"):
        assert rule in " ".join(helps.split()), rule


def test_bad_flags_get_one_line(corpus, capsys):
    for flags, words in ((["--dilations", "1,x"], "--dilations"), (["--eval-interval", "0"], "--eval-interval"),
                         (["--d-model", "30", "--conv-groups", "16"], "divisible"),
                         (["--loss-frac", "1.5"], "--loss-frac")):
        assert train.main(["--data", corpus, "--out", "bad"] + TINY + flags) == 1
        err = capsys.readouterr().err
        assert err.startswith("error:") and words in err and "Traceback" not in err, err


def test_new_run_does_not_mix_with_an_old_one(corpus, capsys):
    assert train.main(["--data", corpus, "--out", "o", "--max-steps", "2"] + TINY) == 0
    assert train.main(["--data", corpus, "--out", "o", "--max-steps", "2"] + TINY) == 1
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert train.main(["--data", corpus, "--out", "o", "--max-steps", "3", "--overwrite"] + TINY) == 0
    assert [r["step"] for r in read_log("o")] == [1, 2, 3]


def test_resume_takes_flags_with_equals_and_survives_a_cut_log_line(corpus):
    assert train.main(["--data", corpus, "--out", "e", "--max-steps", "3"] + TINY) == 0
    with open(os.path.join("e", "log.jsonl"), "a") as f:
        f.write('{"step": 4, "tokens": 5')                          # a line cut short by a crash
    assert train.main(["--data", corpus, "--out", "e", "--resume", "--max-steps=5"] + TINY) == 0
    assert [r["step"] for r in read_log("e")] == [1, 2, 3, 4, 5]


def test_curriculum_keeps_tokens_per_step(corpus):
    assert train.main(["--data", corpus, "--out", "c", "--max-steps", "4", "--curriculum", "16,32"] + TINY) == 0
    log = read_log("c")
    assert [r["tokens"] for r in log] == [128 * s for s in range(1, 5)]   # batch 4 x 32 = 8 x 16


# ------------------------------------------------------------------------------------- hardening

BAD_NUMBERS = [("--time-budget", "-1"), ("--max-steps", "-1"), ("--max-tokens", "-1"), ("--lr-adam", "nan"),
               ("--lr-adam", "-0.01"), ("--lr-muon", "inf"), ("--weight-decay", "nan"), ("--ema", "2"),
               ("--decay-frac", "2"), ("--label-smoothing", "1.5"), ("--z-loss", "-1"), ("--grad-clip", "-1"),
               ("--warmup", "-5"), ("--freeze-embed-steps", "-7"), ("--threads", "-1"), ("--seed", "-1"),
               ("--data-seed", "-3"), ("--val-fraction", "1"), ("--loss-frac", "0"), ("--data-tokens", "0"),
               ("--kernel-size", "0"), ("--d-model", "0"), ("--conv-groups", "0"), ("--n-recursions", "0"),
               ("--glu-hidden", "0"), ("--hier-classes", "-2"), ("--curriculum", "64,0"), ("--batch-size", "inf")]


@pytest.mark.parametrize("flag,value", BAD_NUMBERS)
def test_every_bad_number_is_refused_before_any_work(corpus, capsys, flag, value):
    assert train.main(["--data", corpus, "--out", "bad"] + TINY + [flag, value]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and flag in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not os.path.exists("bad") and not os.path.exists("data"), "work started before the check"


def test_a_diverging_run_never_saves_non_finite_weights(corpus, monkeypatch, capsys):
    """The optimizer makes a ternary latent NaN at step 5 (the loss cannot see it: the quantizer
    maps NaN to 0). The save of step 6 refuses, and latest.npz stays the finite step-4 one, which
    --resume accepts."""
    from nanoternary.fast.optim import FastNorMuon as NorMuon
    real = NorMuon.step
    calls = {"n": 0}

    def poisoned(self, params, grads, lr=None):
        real(self, params, grads, lr)
        calls["n"] += 1
        if calls["n"] == 5:
            params["block.glu.up.w"][0, 0] = np.nan
    monkeypatch.setattr(NorMuon, "step", poisoned)
    assert train.main(["--data", corpus, "--out", "d", "--max-steps", "20", "--save-interval", "2"] + TINY) == 1
    err = capsys.readouterr().err
    assert "block.glu.up.w" in err and "NaN" in err and "last good checkpoint" in err, err
    m = Model.load("d")
    assert m.meta["step"] == 4 and all(np.isfinite(v).all() for v in m.params.values())
    monkeypatch.setattr(NorMuon, "step", real)
    assert train.main(["--data", corpus, "--out", "d", "--resume", "--max-steps", "6"] + TINY) == 0
    assert Model.load("d").meta["step"] == 6


def test_resume_from_any_checkpoint_file(corpus):
    assert train.main(["--data", corpus, "--out", "f", "--max-steps", "4", "--eval-interval", "2",
                       "--save-interval", "4"] + TINY) == 0
    os.replace(os.path.join("f", "best.npz"), "kept.npz")             # e.g. the best of another folder
    assert train.main(["--data", corpus, "--out", "g", "--resume", "kept.npz", "--max-steps", "6"] + TINY) == 0
    assert [r["step"] for r in read_log("g")][-1] == 6
    assert train.main(["--data", corpus, "--out", "g", "--resume", "nothing.npz"] + TINY) == 1


def test_one_run_per_out_folder_and_stale_temps_removed(corpus, tmp_path):
    """A second run on a busy --out refuses and names the first; once the first is killed (kill -9),
    the lock is gone with it and the next start removes the checkpoint it was writing."""
    from nanoternary.fileio import HOST
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data", corpus, "--out", "busy",
           "--max-steps", "100000", "--eval-interval", "100000", "--save-interval", "1"] + TINY
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (os.path.exists(tmp_path / "busy" / "latest.npz")
                                              and len(read_log(tmp_path / "busy")) >= 2):
            time.sleep(0.2)
        res = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert res.returncode == 1 and "in use by a training run (pid" in res.stderr, res.stderr
        assert str(p.pid) in res.stderr and res.stderr.count("\n") == 1
    finally:
        p.kill()
        p.wait()
    stale = tmp_path / "busy" / f"latest.npz.{HOST}-{p.pid}-0123abcd.tmp"
    stale.write_bytes(b"half a checkpoint")
    res = subprocess.run(cmd + ["--resume", "--max-steps", "1"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "removed" in res.stdout and not stale.exists()


def test_out_that_cannot_be_written(corpus, capsys):
    with open("afile", "w") as f:
        f.write("x")
    for out, words in (("afile", "is a file"), (os.path.join("afile", "sub"), "cannot write to --out")):
        assert train.main(["--data", corpus, "--out", out, "--max-steps", "1"] + TINY) == 1
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err


def test_log_is_json_without_clipping(corpus):
    assert train.main(["--data", corpus, "--out", "j", "--max-steps", "2", "--grad-clip", "0"] + TINY) == 0
    with open(os.path.join("j", "log.jsonl")) as f:
        recs = [json.loads(line) for line in f]          # plain json: a bare NaN would fail here
    assert all(r["grad_norm"] > 0 for r in recs)        # the norm, even when nothing is clipped


@pytest.mark.parametrize("head,extra", [("full", ["--loss-frac", "0.5", "--label-smoothing", "0.1"]),
                                        ("hier", ["--hier-classes", "9", "--ema", "0.9", "--grad-accum", "2"])])
def test_plain_run_takes_the_same_steps_as_the_fast_one(corpus, monkeypatch, head, extra):
    """--plain (Model.loss_and_grads and optim.py, one thread: the code of the reading path) and the
    default (nanoternary/fast/ on 2 threads) take the same steps: the same losses (compared unrounded;
    the log keeps 5 decimals) and the same weights after 5 float64 steps."""
    losses, real_step = [], train.train_step

    def recorded(*args):
        out = real_step(*args)
        losses[-1].append(out[0])
        return out
    monkeypatch.setattr(train, "train_step", recorded)
    common = ["--data", corpus, "--max-steps", "5", "--eval-interval", "5", "--dtype", "float64",
              "--head", head] + TINY + extra
    for out in ("fast", "plain"):
        losses.append([])
        assert train.main(common + ["--out", out] + (["--plain"] if out == "plain" else [])) == 0
    fast, plain = losses
    assert len(fast) == len(plain) == 5 and fast[0] != fast[-1]
    np.testing.assert_allclose(fast, plain, rtol=1e-9, atol=0)
    assert [r["train_loss"] for r in read_log("fast")] == [r["train_loss"] for r in read_log("plain")]
    assert read_log("fast")[-1]["val_loss"] == pytest.approx(read_log("plain")[-1]["val_loss"], rel=1e-9)
    wf, wp = load_checkpoint("fast")[0], load_checkpoint("plain")[0]
    init = Model(Model.load("fast").cfg, seed=0, dtype=np.float64).params
    for k in wf:
        assert np.abs(wf[k] - wp[k]).max() <= 1e-9 * np.abs(wp[k]).max(), k
    assert not np.allclose(wf["block.glu.up.w"], init["block.glu.up.w"])       # they did move
