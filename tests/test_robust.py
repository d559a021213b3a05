"""Robustness, round two (issue 19): no lost run, no hang, no traceback, and messages that lead out.

Each test takes one of the issue's cases as a hostile user would, on a tiny model and data the test
writes (test_train.py's TINY flags and write_corpus), and checks the mechanism behind the fix, not
only the one input: docs/robustness.md lists every case with its test.
Run: python -m pytest -q tests/test_robust.py
"""
import hashlib
import json
import os
import shutil
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402
from nanoternary import caches, resources, run, runlog  # noqa: E402
from nanoternary.checkpoint import CheckpointError, load_checkpoint, read_npz  # noqa: E402
from nanoternary.data import DataError, prepare  # noqa: E402
from nanoternary.model import Model  # noqa: E402
from nanoternary.sources import expand_paths  # noqa: E402
from test_train import TINY, read_log, write_corpus  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": ROOT}
TRAIN = os.path.join(ROOT, "train.py")
SAMPLE = os.path.join(ROOT, "sample.py")


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)            # data/ caches and run folders land in the test's folder
    return write_corpus(str(tmp_path))


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def files_of(folder):
    """name -> sha256 of every file in folder (the lock excepted): what must not change."""
    return {n: digest(os.path.join(folder, n)) for n in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, n)) and not n.startswith(".lock")}


def state_of(folder):
    """files_of without report.md, which gains a line for every session, even one with nothing to do."""
    return {k: v for k, v in files_of(folder).items() if k != "report.md"}


def one_line(err):
    """One error line: besides it, only the data preparation's progress bar (redrawn with \\r) and
    its notes may be on stderr."""
    lines = [line for line in err.split("\n") if line and "\r" not in line and not line.startswith("note:")]
    return len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err


def cli(args, cwd, env=ENV, timeout=120):
    r = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


# ------------------------------------------------------------------------------------- no run is lost


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(corpus, capsys, monkeypatch):
    assert train.main(["--data", corpus, "--out", "a", "--max-steps", "3"] + TINY) == 0
    before = files_of("a")
    # a typo in --data: the new run fails before any work; the old run is whole, nothing moved
    assert train.main(["--data", "typo.parquet", "--out", "a", "--overwrite", "--max-steps", "3"] + TINY) == 1
    assert "no such file" in capsys.readouterr().err
    assert files_of("a") == before and not os.path.exists(os.path.join("a", ".replaced"))
    # a new run that diverges at its first step: no checkpoint of its own, so the old run comes back
    real = train.train_step

    def diverges(*args):
        raise run.Diverged("step 1: the training loss is nan")
    monkeypatch.setattr(train, "train_step", diverges)
    assert train.main(["--data", corpus, "--out", "a", "--overwrite", "--max-steps", "3"] + TINY) == 1
    assert files_of("a") == before
    assert "back in place" in capsys.readouterr().out
    monkeypatch.setattr(train, "train_step", real)
    # killed outright (kill -9) after the move and before a checkpoint: the next start settles it
    os.makedirs(os.path.join("a", ".replaced"))
    for f in before:
        os.replace(os.path.join("a", f), os.path.join("a", ".replaced", f))
    open(os.path.join("a", ".replaced", ".complete"), "w").close()        # the move was complete
    with open(os.path.join("a", "log.jsonl"), "w") as f:
        f.write('{"step": 1, "tokens": 128, "train_loss": 10.9, "elapsed": 0.1}\n')   # the new run's log
    assert train.main(["--data", corpus, "--out", "a", "--resume", "--max-steps", "3"] + TINY) == 0
    assert state_of("a") == {k: v for k, v in before.items() if k != "report.md"}   # back, nothing left to do
    # a new run that saves: the old run is gone then, and only then
    assert train.main(["--data", corpus, "--out", "a", "--overwrite", "--max-steps", "2"] + TINY) == 0
    assert [r["step"] for r in read_log("a")] == [1, 2] and not os.path.exists(os.path.join("a", ".replaced"))


def test_an_overwrite_killed_at_any_moment_is_settled(corpus, capsys):
    """kill -9 can stop an --overwrite between any two file operations; every state it can leave is
    settled by the next start on the folder (runfolder.settle) without losing the old run or keeping
    a half of it."""
    from nanoternary.runfolder import settle
    assert train.main(["--data", corpus, "--out", "a", "--max-steps", "2"] + TINY) == 0
    before = files_of("a")
    names = sorted(before)
    aside = os.path.join("a", ".replaced")

    def move(few, complete):
        os.makedirs(aside, exist_ok=True)
        for f in few:
            os.replace(os.path.join("a", f), os.path.join(aside, f))
        if complete:
            open(os.path.join(aside, ".complete"), "w").close()

    def new_file(name, text="new"):
        with open(os.path.join("a", name), "w") as f:
            f.write(text)
    move(names[:2], complete=False)                   # the move cut short: the new run wrote nothing yet
    settle("a")
    assert files_of("a") == before and not os.path.exists(aside)
    move(names, complete=True)                        # moved; the new run logged, no checkpoint yet
    new_file("log.jsonl")
    new_file("report.md")
    settle("a")
    assert files_of("a") == before and not os.path.exists(aside)
    move(names, complete=True)                        # ... and a restore cut short: the mark gone,
    new_file("log.jsonl")                             # one old file back, the new log still there
    os.remove(os.path.join(aside, ".complete"))
    os.replace(os.path.join(aside, names[0]), os.path.join("a", names[0]))
    settle("a")
    assert files_of("a") == before and not os.path.exists(aside)
    move(names, complete=True)                        # the new run saved a checkpoint: the old run goes
    shutil.copy(os.path.join(aside, "latest.npz"), os.path.join("a", "latest.npz"))
    new_file("log.jsonl", "the new run's")
    settle("a")
    assert not os.path.exists(aside) and open(os.path.join("a", "log.jsonl")).read() == "the new run's"
    os.makedirs(aside + ".discard")                    # a commit cut short
    settle("a")
    assert not os.path.exists(aside + ".discard")


def test_resume_never_writes_one_run_over_another(corpus, capsys):
    common = ["--data", corpus, "--eval-interval", "2", "--save-interval", "1"] + TINY
    assert train.main(common + ["--out", "A", "--max-steps", "3"]) == 0
    assert train.main(common + ["--out", "B", "--max-steps", "4", "--seed", "1"]) == 0
    a = files_of("A")
    capsys.readouterr()
    # another run's checkpoint into A: refused on one line, A untouched
    assert train.main(["--resume", os.path.join("B", "latest.npz"), "--out", "A", "--max-steps", "6"]) == 1
    err = capsys.readouterr().err
    assert one_line(err) and "another run" in err and "--out B" in err, err
    assert files_of("A") == a
    # A's best.npz (step 2) would replace A's latest.npz (step 3): refused, with the way to branch off
    assert load_checkpoint(os.path.join("A", "best.npz"))[1]["step"] == 2
    assert train.main(["--resume", os.path.join("A", "best.npz"), "--max-steps", "6"]) == 1
    err = capsys.readouterr().err
    assert one_line(err) and "step 3" in err and "NEW_FOLDER" in err, err
    assert files_of("A") == a
    # a resume with nothing left to do changes nothing, the log included
    assert train.main(["--resume", "A", "--max-steps", "3"]) == 0          # --resume FOLDER
    assert "nothing to do" in capsys.readouterr().out
    assert state_of("A") == {k: v for k, v in a.items() if k != "report.md"}
    # --resume CHECKPOINT without --out continues in the checkpoint's own folder
    assert train.main(["--resume", os.path.join("B", "latest.npz"), "--max-steps", "5"]) == 0
    assert [r["step"] for r in read_log("B")] == [1, 2, 3, 4, 5]
    # into a new folder: a branch, with an id of its own and its own best.npz
    assert train.main(["--resume", os.path.join("A", "best.npz"), "--out", "A2", "--max-steps", "4"]) == 0
    ids = {d: load_checkpoint(d)[1]["run_id"] for d in ("A", "A2")}
    assert ids["A"] != ids["A2"] and os.path.exists(os.path.join("A2", "best.npz"))
    assert [r["step"] for r in read_log("A2")] == [3, 4]
    assert train.main(["--resume", os.path.join("A", "latest.npz"), "--out", "A2", "--max-steps", "6"]) == 1
    assert "another run" in capsys.readouterr().err


def test_an_export_is_never_written_over_another_kind_of_file(corpus, capsys, tmp_path):
    from nanoternary import generate
    assert train.main(["--data", corpus, "--out", "A", "--max-steps", "2"] + TINY) == 0
    latest = files_of("A")["latest.npz"]
    capsys.readouterr()
    for out, words in ((os.path.join("A", "latest.npz"), "training checkpoint"), ("A", "is a folder"),
                       (corpus, "not a nanoternary checkpoint"),
                       (os.path.join(corpus, "x.npz"), "cannot write")):
        assert generate.main(["export", "--checkpoint", "A", "--out", out]) == 1
        err = capsys.readouterr().err
        assert one_line(err) and words in err, (out, err)
    assert files_of("A")["latest.npz"] == latest
    assert train.main(["--resume", "A", "--max-steps", "3"]) == 0             # still a training checkpoint
    assert generate.main(["export", "--checkpoint", "A", "--out", "p.npz"]) == 0
    assert generate.main(["export", "--checkpoint", "A", "--out", "p.npz"]) == 0   # a packed over a packed
    capsys.readouterr()
    assert train.main(["--resume", "p.npz", "--out", "P"]) == 1
    err = capsys.readouterr().err
    assert one_line(err) and "packed export" in err and "cannot be resumed" in err, err
    assert not os.path.exists("P")


# ------------------------------------------------------------------------------------- no hang


def test_link_loops_and_aliases_are_read_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("w/sub/deep")
    for i, path in enumerate(("w/a.txt", "w/sub/b.txt", "w/sub/deep/c.txt")):
        with open(path, "w") as f:
            f.write(f"document {i} " * 50)
    os.symlink(".", "w/sub/me")                      # two loops: glob.glob takes forever on these
    os.symlink("..", "w/sub/deep/up")
    os.symlink("a.txt", "w/alias.txt")               # the same file by another name
    t = time.time()
    files = expand_paths(["w/**/*.txt", "w/a.txt", "./w/sub/../a.txt", os.path.abspath("w/sub/b.txt")])
    assert time.time() - t < 5
    assert sorted(os.path.relpath(os.path.realpath(f)) for f in files) == ["w/a.txt", "w/sub/b.txt",
                                                                           "w/sub/deep/c.txt"]
    data = prepare("w/**/*.txt", val_fraction=0.34, verbose=False)
    assert data.meta["documents"] == 3               # each file once, so no validation text is in training


def test_only_regular_files_are_read(corpus, capsys):
    os.mkfifo("pipe.txt")
    os.symlink("/dev/zero", "zero.txt")
    for path, what in (("pipe.txt", "named pipe"), ("zero.txt", "device")):
        t = time.time()
        with pytest.raises(DataError, match=what):
            expand_paths(path)
        assert train.main(["--data", path, "--out", "r", "--max-steps", "1"] + TINY) == 1
        err = capsys.readouterr().err
        assert one_line(err) and what in err and time.time() - t < 30, err
    assert not os.path.exists("r")


def test_names_that_look_like_globs_and_long_names(corpus, capsys):
    weird = "weird[1].parquet"
    shutil.copy(corpus, weird)
    long_name = "x" * 240 + ".parquet"
    shutil.copy(corpus, long_name)
    for name in (weird, long_name):
        assert train.main(["--data", name, "--out", "r", "--max-steps", "1", "--overwrite"] + TINY) == 0
    # the same bytes under three names: one cache (its key is the content), whatever name came first
    assert len([d for d in os.listdir(os.path.join("data", "tokens")) if os.path.isdir(
        os.path.join("data", "tokens", d))]) == 1


# ------------------------------------------------------------------------------------- no traceback


def test_the_log_is_plain_json_and_readers_skip_what_is_not_a_record(corpus, monkeypatch):
    assert runlog.dumps({"a": float("nan"), "b": [float("inf"), np.float32(1.5)], "c": np.int64(3)}) == \
        '{"a": null, "b": [null, 1.5], "c": 3}'
    real = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda *a: float("nan"))    # weights that have just diverged
    assert train.main(["--data", corpus, "--out", "j", "--max-steps", "2", "--eval-interval", "1"] + TINY) == 0

    def strict(c):
        raise ValueError(c)
    recs = [json.loads(line, parse_constant=strict) for line in open(os.path.join("j", "log.jsonl"))]
    assert [r["val_loss"] for r in recs] == [None, None]
    monkeypatch.setattr(train, "evaluate", real)
    # a damaged log: a list, a string step, a byte that is not UTF-8, a record without elapsed, NaN
    with open(os.path.join("j", "log.jsonl"), "ab") as f:
        f.write(b'[1, 2]\n{"step": "7", "tokens": 1, "train_loss": 1, "elapsed": 1}\n\xff\n'
                b'{"step": 3, "tokens": 5, "train_loss": 1}\n{"step": 4, "tokens": 9, "train_loss": NaN, '
                b'"elapsed": 3}\n[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n')
    assert [r["step"] for r in runlog.read(os.path.join("j", "log.jsonl"))] == [1, 2]
    pytest.importorskip("matplotlib")
    assert runlog.plot("j")
    assert train.main(["--data", corpus, "--out", "j", "--resume", "--max-steps", "4"] + TINY) == 0
    assert [r["step"] for r in read_log("j")] == [1, 2, 3, 4]


IMPOSSIBLE = [(["--threads", "2147483648"], "--threads"), (["--d-model", str(10 ** 30)], "--d-model"),
              (["--dilations", "1,4,100000000000"], "--dilations"), (["--n-recursions", "1000000"], "--n-recursions"),
              (["--d-model", "40000", "--conv-groups", "1"], "--d-model"), (["--seq-len", "100000000"], "--seq-len"),
              (["--batch-size", str(10 ** 400)], "--batch-size"), (["--curriculum", "16,99999999999"], "--curriculum")]


@pytest.mark.parametrize("flags,name", IMPOSSIBLE)
def test_impossible_sizes_are_refused_up_front(corpus, capsys, flags, name):
    t = time.time()
    assert train.main(["--data", corpus, "--out", "big"] + TINY + flags) == 1
    err = capsys.readouterr().err
    assert one_line(err) and name in err and time.time() - t < 10, err
    assert not os.path.exists("big") and not os.path.exists("data"), "work started before the check"


def test_memory_is_checked_against_what_is_available(corpus, capsys, monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda: 40 * 2 ** 20)    # a 40 MiB machine
    assert train.main(["--data", corpus, "--out", "m", "--batch-size", "512"] + TINY) == 1
    err = capsys.readouterr().err
    assert one_line(err) and "40.0 MiB is available" in err and "--batch-size" in err, err
    assert not os.path.exists("m") and not os.path.exists("data")
    # threads above the cores: a note naming the flag; far above: refused
    resources.check_threads(3, "--threads", n_cores=2)
    assert "--threads 3 is more than the 2 core(s)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at most 8"):
        resources.check_threads(9, "--threads", n_cores=2)


MEASURE = """
import sys, tracemalloc, numpy as np
sys.path.insert(0, {root!r})
import train
from nanoternary.model import Model, ModelConfig
from nanoternary.fast import step as fast
from nanoternary.fast.threads import set_threads
from nanoternary import resources
set_threads(2)
mc, tc = ModelConfig(**{model}), train.TrainConfig(**{run})
tracemalloc.start()                  # a fresh process: the head's per-thread buffers are counted too
model = Model(mc, seed=0, dtype=tc.dtype)
opt = train.build_optimizers(tc, model.params)
rng = np.random.default_rng(0)
for T in tc.curriculum or (tc.seq_len,):
    B = max(1, tc.batch_size * tc.seq_len // T)
    x, y = rng.integers(0, mc.vocab_size, (2, B, T))
    for _ in range(2):
        loss, g = fast.loss_and_grads(model, x, y, loss_frac=0.25)
        opt["muon"].step(model.params, g, lr=0.01)
        opt["adamw"].step(model.params, g, lr=1e-3)
        del g
    fast.nll(model, x, y)            # the evaluation's buffers
peak = tracemalloc.get_traced_memory()[1]
print(peak, sum(resources.estimate(tc, mc, 2).values()))
"""


@pytest.mark.parametrize("model,run_", [
    (dict(d_model=64, glu_hidden=128, conv_groups=4, dilations=(1, 4, 16)), dict(batch_size=8, seq_len=128, ema=0.9)),
    (dict(d_model=32, glu_hidden=64, conv_groups=4, dilations=(1, 4, 2000)), dict(batch_size=8, seq_len=64)),
    (dict(d_model=32, glu_hidden=64, conv_groups=4, n_recursions=4), dict(batch_size=8, seq_len=256, curriculum=(64, 256))),
    (dict(d_model=64, glu_hidden=128, conv_groups=4, head="hier"), dict(batch_size=16, seq_len=128))])
def test_the_memory_estimate_is_within_a_small_factor_of_the_real_peak(model, run_):
    """The estimate is what the code allocates, not a guess: between 1x and 2x the peak that
    tracemalloc measures (NumPy reports its arrays to it) over training steps and an evaluation."""
    code, out, err = cli(["-c", MEASURE.format(root=ROOT, model=model, run=run_)], ROOT)
    assert code == 0, err
    peak, estimate = map(int, out.split())
    assert peak <= estimate <= 2 * peak, (peak / 2 ** 20, estimate / 2 ** 20)


def craft(src, dst, change):
    arrays, meta = read_npz(src)
    change(arrays, meta)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(dst, **arrays)


def _set(key, value):
    return lambda arrays, meta: meta.__setitem__(key, value)


CRAFTED = {
    "config a string": _set("config", "hello"),
    "a damaged rng": _set("rng", {"bit_generator": "PCG64", "state": "x"}),
    "a string step": _set("step", "7"),
    "huge dilations": lambda a, m: m["config"].__setitem__("dilations", [1, 4, 10 ** 12]),
    "float16 weights": lambda a, m: a.__setitem__("param/block.glu.up.w", a["param/block.glu.up.w"].astype(np.float16)),
    "complex weights": lambda a, m: a.__setitem__("param/block.glu.up.w", a["param/block.glu.up.w"].astype(np.complex64)),
    "a damaged --data": lambda a, m: m["train"].__setitem__("data", 5),
    "a config of other types": lambda a, m: m["config"].__setitem__("d_model", "big"),
    "meta not an .npy": None,
    "complex optimizer moments": lambda a, m: a.__setitem__("opt/adamw/m/embed.w", a["opt/adamw/m/embed.w"] * 1j),
    "a step count that is text": lambda a, m: a.__setitem__("opt/muon/t/block.glu.up.w", np.array("x")),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        corpus = write_corpus(str(root))
        assert train.main(["--data", corpus, "--out", "run", "--max-steps", "2"] + TINY) == 0
    finally:
        os.chdir(cwd)
    return root


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_damaged_or_crafted_checkpoints_get_one_line(trained, tmp_path, capsys, case):
    from nanoternary import generate
    folder = tmp_path / "c"
    folder.mkdir()
    path = str(folder / "latest.npz")
    if CRAFTED[case] is None:                         # a meta member that is not an .npy at all
        import zipfile
        with zipfile.ZipFile(str(trained / "run" / "latest.npz")) as z:
            items = [(i, z.read(i.filename)) for i in z.infolist()]
        with zipfile.ZipFile(path, "w") as z:
            for i, data in items:
                z.writestr(i, b"not an npy" if i.filename == "meta.npy" else data)
    else:
        craft(str(trained / "run" / "latest.npz"), path, CRAFTED[case])
    os.chdir(trained)
    assert train.main(["--resume", str(folder), "--max-steps", "5"]) == 1
    err = capsys.readouterr().err
    assert one_line(err), err
    assert generate.main(["export", "--checkpoint", str(folder), "--out", str(tmp_path / "p.npz")]) in (0, 1)
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") <= 1, err
    code, out, err = cli([SAMPLE, "--checkpoint", str(folder), "--max-new-tokens", "2"], str(tmp_path))
    assert code in (0, 1) and "Traceback" not in err, err
    assert code == 0 or err.strip().startswith("error:") and err.count("\n") == 1, err


@pytest.mark.parametrize("args", [["-m", "nanoternary.generate", "bench", "--tokens", "-1"],
                                  ["-m", "nanoternary.generate", "bench", "--prompt-len", "0"],
                                  ["-m", "nanoternary.data", "--threads", "-1"],
                                  ["-m", "nanoternary.data", "--threads", "1000000"],
                                  ["-m", "nanoternary.data", "--seed", "-1"],
                                  ["-m", "nanoternary.gradcheck", "--tol", "nan"],
                                  ["-m", "nanoternary.tools.bench", "--loss-frac", "0"],
                                  ["-m", "nanoternary.evaluate", "--data", "x.txt", "--seq-len", "0"]])
def test_commands_check_their_numbers(tmp_path, args):
    code, out, err = cli(args, str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and args[-2] in err and "Traceback" not in err, err
    assert not os.listdir(tmp_path)


def test_sample_on_a_terminal_that_cannot_encode_what_the_model_says(trained):
    env = {**ENV, "PYTHONIOENCODING": "cp1252"}
    r = subprocess.run([sys.executable, SAMPLE, "--checkpoint", "run", "--prompt", "日本語 ☃ ü", "--max-new-tokens",
                        "5"], cwd=str(trained), capture_output=True, env=env, timeout=120)
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    out = r.stdout.decode("cp1252")
    assert "\\u65e5" in out and "ü" in out            # escaped where cp1252 has no character, kept where it has


# ------------------------------------------------------------------------------------- resumable runs


def test_the_same_bytes_resume_from_any_folder_by_any_path(corpus, capsys):
    assert train.main(["--data", "corpus.parquet", "--out", "r", "--max-steps", "2"] + TINY) == 0
    capsys.readouterr()
    os.utime(corpus, (time.time() + 100, time.time() + 100))          # touch: the same bytes
    os.makedirs("elsewhere")
    os.chdir("elsewhere")                                              # the saved relative --data is absolute
    assert train.main(["--resume", os.path.join("..", "r"), "--max-steps", "3", "--cache-dir",
                       os.path.join("..", "data")]) == 0
    shutil.copy(corpus, "copy.parquet")                                # another path to the same bytes
    assert train.main(["--resume", os.path.join("..", "r"), "--data", "copy.parquet", "--max-steps", "4",
                       "--cache-dir", os.path.join("..", "data")]) == 0
    os.chdir("..")
    assert [r["step"] for r in read_log("r")] == [1, 2, 3, 4]
    assert len([d for d in os.listdir(os.path.join("data", "tokens")) if "-" in d]) == 1     # one cache
    # other bytes are refused, naming the flags that make the data
    other = write_corpus(os.path.abspath("elsewhere"), seed=5)
    capsys.readouterr()
    assert train.main(["--resume", "r", "--data", other, "--max-steps", "5"]) == 1
    err = capsys.readouterr().err
    assert one_line(err) and "same --data" in err, err
    # the files moved (the run's --data is now the copy): the message says how to point at them
    os.replace(os.path.join("elsewhere", "copy.parquet"), "moved.parquet")
    capsys.readouterr()
    assert train.main(["--resume", "r", "--max-steps", "5"]) == 1
    err = capsys.readouterr().err
    assert one_line(err) and "pass --data with their new path" in err, err
    assert train.main(["--resume", "r", "--data", "moved.parquet", "--max-steps", "5"]) == 0


def test_a_folder_with_only_best_npz(corpus, capsys):
    """A run killed after its first evaluation and before its first save has best.npz alone."""
    assert train.main(["--data", corpus, "--out", "b", "--max-steps", "2"] + TINY) == 0
    os.remove(os.path.join("b", "latest.npz"))
    code, out, err = cli([SAMPLE, "--checkpoint", "b", "--max-new-tokens", "2"], os.getcwd())
    assert code == 0 and "best.npz" in err, err
    assert train.main(["--data", corpus, "--out", "b", "--max-steps", "2"] + TINY) == 1
    assert "--resume" in capsys.readouterr().err
    assert train.main(["--resume", "b", "--max-steps", "3"]) == 0
    assert load_checkpoint("b")[1]["step"] == 3


def full_disk_supported():
    if not shutil.which("unshare") or os.geteuid() != 0:
        return False
    return subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(not full_disk_supported(), reason="needs root and unshare to mount a small tmpfs")
def test_a_full_disk_while_saving(corpus, tmp_path):
    """A real full disk: --out on a 15 MB tmpfs, in a mount namespace of this test's own. The first
    checkpoint (~9 MB) fits; the second cannot be written beside it."""
    os.makedirs("full")
    cmd = " ".join([sys.executable, TRAIN, "--data", corpus, "--out", "full/run", "--max-steps", "6",
                    "--save-interval", "2", "--eval-interval", "1000"] + TINY)
    script = f"mount -t tmpfs -o size=15m tmpfs full && {cmd}; echo status=$?; " \
             f"{sys.executable} -c \"from nanoternary.checkpoint import load_checkpoint; " \
             f"print('step', load_checkpoint('full/run')[1]['step']); import os; print(os.listdir('full/run'))\""
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=ENV,
                       timeout=300)
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "No space left on device" in err[0] and "full/run/latest.npz (step 2)" in err[0], err
    assert "intact" in err[0] and "free" in err[0] and "needs about" in err[0] and "--resume" in err[0]
    assert "status=1" in r.stdout and "step 2" in r.stdout and ".tmp" not in r.stdout, r.stdout


def test_the_cache_folder_is_a_flag_of_train_py_too(corpus, capsys):
    assert train.main(["--data", corpus, "--out", "c", "--max-steps", "1", "--cache-dir", "elsewhere"] + TINY) == 0
    assert os.path.isdir(os.path.join("elsewhere", "tokens")) and not os.path.exists("data")
    with open("afile", "w") as f:
        f.write("x")
    assert train.main(["--data", corpus, "--out", "d", "--max-steps", "1", "--cache-dir", "afile"] + TINY) == 1
    err = capsys.readouterr().err
    assert one_line(err) and "--cache-dir of train.py" in err, err
    assert not os.path.exists("d")


def test_messages_for_small_data(corpus, capsys):
    pq.write_table(pa.table({"text": ["the cat sat on the mat. " * 100]}), "one.parquet")
    for flags, words in ((["--data", "one.parquet"], ["1 document", "at least 2"]),
                         (["--data", corpus, "--seq-len", "20000", "--val-fraction", "0.5"],
                          ["validation split", "--seq-len", "larger --val-fraction"]),
                         (["--data", corpus, "--seq-len", "4000", "--val-fraction", "0.9"],
                          ["training split", "--seq-len", "smaller --val-fraction"])):
        assert train.main(flags + ["--out", "s"] + TINY[:TINY.index("--seq-len")] +
                          TINY[TINY.index("--seq-len") + 2:]) == 1
        err = capsys.readouterr().err
        assert one_line(err) and all(w in err for w in words), err
    assert not os.path.exists("s")


def test_a_batch_that_does_not_split_names_a_size_that_does():
    cfg = train.TrainConfig(batch_size=2, seq_len=32, curriculum=(16, 32, 64))
    assert "use --batch-size 4" in run.batch_split_error(cfg, 2)           # 2 is 1 sequence of 64
    assert "use --batch-size 4" in run.batch_split_error(train.TrainConfig(batch_size=3, seq_len=32), 2)
    assert run.batch_split_error(train.TrainConfig(batch_size=4, seq_len=32), 2) is None


def test_a_divergence_names_the_setting_and_numpy_stays_quiet(corpus, capsys):
    assert train.main(["--data", corpus, "--out", "w", "--max-steps", "20", "--weight-decay", "1e30"] + TINY) == 1
    err = capsys.readouterr().err
    assert one_line(err) and "--weight-decay 1e+30 (default 0.1)" in err and "Warning" not in err, err


def test_signals_and_exit_status(corpus, capsys, monkeypatch):
    real = train.train_step

    def signalled(signum, at, times=1):
        def step(*args):
            out = real(*args)
            if args[-1].step + 1 == at:
                for _ in range(times):
                    os.kill(os.getpid(), signum)
            return out
        return step
    monkeypatch.setattr(train, "train_step", signalled(signal.SIGTERM, 2))
    assert train.main(["--data", corpus, "--out", "t", "--max-steps", "9"] + TINY) == 143
    assert load_checkpoint("t")[1]["step"] == 2 and "stopped by SIGTERM" in capsys.readouterr().out
    # a second signal stops at once: nothing saved then, and the message says what is there
    monkeypatch.setattr(train, "train_step", signalled(signal.SIGINT, 2, times=2))
    assert train.main(["--data", corpus, "--out", "u", "--max-steps", "9"] + TINY) == 130
    assert "no checkpoint was saved" in capsys.readouterr().err and not os.path.exists("u")
    monkeypatch.setattr(train, "train_step", signalled(signal.SIGTERM, 4, times=2))
    assert train.main(["--data", corpus, "--out", "t", "--resume", "--max-steps", "9"] + TINY) == 143
    assert "the checkpoints saved are intact (t/latest.npz" in capsys.readouterr().err
    # SIGTERM before training (the data being prepared): stopped at once, cleanly, nothing left
    monkeypatch.setattr(train, "train_step", real)
    real_prepare = run.prepare

    def killed(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_prepare(*a, **k)
    monkeypatch.setattr(run, "prepare", killed)
    assert train.main(["--data", corpus, "--out", "v", "--max-steps", "9"] + TINY) == 143
    assert not os.path.exists("v")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL          # the handler is given back


def test_out_of_memory_in_a_step_is_one_line(corpus, capsys, monkeypatch):
    """The estimate passed and the machine disagreed (another process took the memory meanwhile)."""
    real = train.train_step

    def short_of_memory(*args):
        if args[-1].step == 3:
            raise MemoryError("Unable to allocate 8.00 GiB")
        return real(*args)
    monkeypatch.setattr(train, "train_step", short_of_memory)
    assert train.main(["--data", corpus, "--out", "o", "--max-steps", "9", "--save-interval", "2"] + TINY) == 1
    err = capsys.readouterr().err
    assert one_line(err) and "out of memory at step 3" in err and "--batch-size" in err, err
    assert load_checkpoint("o")[1]["step"] == 2


# ------------------------------------------------------------------------------------- litter


def test_a_failed_run_leaves_no_folder(corpus, capsys):
    os.makedirs("mine")                                   # a folder the user made stays, without a lock
    for out in ("new", "mine"):
        assert train.main(["--data", "typo.parquet", "--out", out] + TINY) == 1
    assert not os.path.exists("new") and os.listdir("mine") == []


def test_stale_caches_are_listed_and_removed(corpus, capsys):
    prepare(corpus, verbose=False)
    os.makedirs("other")
    prepare(write_corpus(os.path.abspath("other"), seed=3), verbose=False)   # another file's: current
    write_corpus(os.path.dirname(corpus), seed=9)         # the file now holds other bytes
    capsys.readouterr()
    prepare(corpus, verbose=False)                        # a new cache; the old one is noted
    err = capsys.readouterr().err
    assert "1 cache(s)" in err and "can never be used again" in err and "--remove-stale" in err, err
    listed = caches.list_caches(os.path.join("data", "tokens"))
    assert sorted(c["state"] for c in listed) == ["current", "current", "stale"]
    code, out, err = cli(["-m", "nanoternary.data", "--caches", "--json"], os.getcwd())
    assert code == 0 and [c["state"] for c in json.loads(out)] == [c["state"] for c in listed]
    code, out, err = cli(["-m", "nanoternary.data", "--caches"], os.getcwd())
    assert code == 0 and "holds other bytes now" in out and "--remove-stale removes the stale ones" in out, out
    code, out, err = cli(["-m", "nanoternary.data", "--remove-stale"], os.getcwd())
    assert code == 0 and "removed 1 cache(s)" in out, out
    assert [c["state"] for c in caches.list_caches(os.path.join("data", "tokens"))] == ["current", "current"]
    assert prepare(corpus, verbose=False).cached


KILLED_BEFORE_META = """
import os, signal, sys
sys.path.insert(0, {root!r})
from nanoternary import tokens
tokens.promote_meta = lambda path: os.kill(os.getpid(), signal.SIGKILL)   # the moment before meta.json
tokens.prepare({corpus!r}, verbose=False)
"""


def test_token_files_survive_a_kill_just_before_meta_json(corpus, capsys):
    code, out, err = cli(["-c", KILLED_BEFORE_META.format(root=ROOT, corpus=corpus)], os.getcwd())
    assert code == -signal.SIGKILL
    (folder,) = [d for d in os.listdir(os.path.join("data", "tokens")) if "-" in d]
    names = os.listdir(os.path.join("data", "tokens", folder))
    assert "meta.json" not in names and "meta.json.pending" in names and "train.bin" in names
    data = prepare(corpus, verbose=False)
    assert data.cached and "completed" in capsys.readouterr().err     # checked, trusted, not tokenized again
    assert os.path.exists(os.path.join(data.path, "meta.json"))


def test_a_reader_that_goes_away_is_no_error(corpus):
    """`python -m nanoternary.data ... | head -1`: the pipe closes before the table is printed."""
    p = subprocess.Popen([sys.executable, "-m", "nanoternary.data", "--data", corpus, "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=os.getcwd())
    p.stdout.close()                                      # the reader is gone before the output comes
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and "Traceback" not in err, err


def test_a_dictionary_encoded_text_column(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    texts = ["the cat sat on the mat", "a dog", "the cat sat on the mat"] * 10
    pq.write_table(pa.table({"text": pa.array(texts).dictionary_encode()}), "cat.parquet")
    data = prepare("cat.parquet", verbose=False)
    plain = prepare(write_plain(texts), verbose=False)
    assert data.meta["documents"] == 30 and np.array_equal(np.asarray(data.train), np.asarray(plain.train))


def write_plain(texts):
    pq.write_table(pa.table({"text": texts}), "plain.parquet")
    return "plain.parquet"


def test_check_replaceable_and_existing_kind(tmp_path):
    from nanoternary.checkpoint import check_replaceable, existing_kind
    m = Model(train.ModelConfig(d_model=16, glu_hidden=24, conv_groups=4, dilations=(1, 2)), seed=0)
    from nanoternary.checkpoint import save_checkpoint
    from nanoternary.pack import export_packed
    full, packed, other, damaged = (str(tmp_path / n) for n in ("f.npz", "p.npz", "o.npz", "d.npz"))
    save_checkpoint(full, m.params, {"config": m.cfg.to_dict(), "step": 1})
    export_packed(m, packed)
    with open(other, "w") as f:
        f.write("my notes")
    with open(damaged, "wb") as f:
        f.write(open(full, "rb").read()[:1000])
    assert [existing_kind(p) for p in (full, packed, other, damaged, str(tmp_path), str(tmp_path / "x"))] == \
        ["full", "packed", "other", "damaged", "folder", None]
    check_replaceable(damaged, "full")
    for path, kind in ((full, "packed"), (packed, "full"), (other, "full"), (str(tmp_path), "packed")):
        with pytest.raises(CheckpointError):
            check_replaceable(path, kind)
