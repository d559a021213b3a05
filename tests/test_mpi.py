"""Training over MPI (nanoternary/fast/dist.py, train.py under mpiexec): 2 processes train the same
model as 1 process with the same global batch; a failing or killed rank ends the whole job with a
message; resume under MPI, also with another number of processes. Skipped without mpi4py and an
mpiexec (pip install -e ".[mpi]")."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("mpi4py")
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
if MPIEXEC is None:
    pytest.skip("no mpiexec (pip install -e \".[mpi]\" brings one)", allow_module_level=True)

from test_train import ROOT, TINY, read_log, write_corpus  # noqa: E402

from nanoternary.model import Model  # noqa: E402

i = TINY.index("--threads")
TINY_MPI = TINY[:i] + TINY[i + 2:] + ["--eval-interval", "3", "--save-interval", "2"]    # batch 4 x 32


def run(cwd, args, n=None, env=None, timeout=240):
    cmd = ([MPIEXEC, "-n", str(n)] if n else []) + [sys.executable, os.path.join(ROOT, "train.py")] + args
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(str(tmp_path))


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-12), ("float32", 2e-5)])
def test_two_processes_train_the_same_model_as_one(corpus, tmp_path, dtype, rtol):
    """The same global batch of 4 sequences: 2 processes of 1 thread (2 sequences each, one Allreduce)
    against 1 process of 2 threads (2 shards of 2 sequences): the same losses, the same weights, up to
    the order of the sums (float64: 1e-12; float32: a few float32 roundings, 2e-5)."""
    args = ["--data", corpus, "--max-steps", "5", "--dtype", dtype, "--loss-frac", "0.5"] + TINY_MPI
    one = run(tmp_path, args + ["--out", "one", "--threads", "2"])
    two = run(tmp_path, args + ["--out", "two"], n=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stdout + two.stderr
    assert "2 processes x 1 thread(s)" in two.stdout and "rank 1 pid" in two.stdout
    report = open(tmp_path / "two" / "report.md").read()             # written by rank 0, once
    assert "**Finished (5 steps)**" in report and "(2 process(es) x 1 thread(s))" in report
    l1, l2 = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [r["step"] for r in l1] == [r["step"] for r in l2] == [1, 2, 3, 4, 5]
    for a, b in zip(l1, l2):
        for key in ("train_loss", "val_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= max(rtol, 1e-5) * abs(a[key]), (key, a, b)   # the log rounds to 5 digits
    m1, m2 = Model.load(str(tmp_path / "one")), Model.load(str(tmp_path / "two"))
    assert m1.dtype == np.dtype(dtype)
    for k, v in m1.params.items():
        err = np.abs(m2.params[k] - v).max() / max(np.abs(v).max(), 1e-30)
        assert err <= rtol * 50, f"{k}: weights differ by {err:.2e} (relative)"   # after 5 updates


def test_two_processes_train_the_same_model_as_one_with_the_adaptive_head(corpus, tmp_path):
    """The adaptive head (fast/adaptive_head.py, its rows split between the processes, its cluster map
    made on rank 0 and the same everywhere), counted positions and smoothing: float64, to 1e-12."""
    args = ["--data", corpus, "--max-steps", "4", "--dtype", "float64", "--loss-frac", "0.5", "--label-smoothing",
            "0.1", "--head", "adaptive", "--adaptive-cutoffs", "8,24,50257"] + TINY_MPI
    one = run(tmp_path, args + ["--out", "one", "--threads", "2"])
    two = run(tmp_path, args + ["--out", "two"], n=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stdout + two.stderr
    l1, l2 = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [r["train_loss"] for r in l1] == pytest.approx([r["train_loss"] for r in l2], rel=1e-5)   # 5 digits logged
    m1, m2 = Model.load(str(tmp_path / "one")), Model.load(str(tmp_path / "two"))
    assert np.array_equal(m1.class_map.order, m2.class_map.order)
    for k, v in m1.params.items():
        err = np.abs(m2.params[k] - v).max() / max(np.abs(v).max(), 1e-30)
        assert err <= 1e-12 * 50, f"{k}: weights differ by {err:.2e} (relative)"


def test_resume_under_mpi_equals_the_uninterrupted_run_and_n_may_change(corpus, tmp_path):
    args = ["--data", corpus, "--dtype", "float64"] + TINY_MPI
    assert run(tmp_path, args + ["--out", "full", "--max-steps", "6"], n=2).returncode == 0
    assert run(tmp_path, args + ["--out", "cut", "--max-steps", "4"], n=2).returncode == 0
    res = run(tmp_path, args + ["--out", "cut", "--max-steps", "6", "--resume"], n=2)
    assert res.returncode == 0, res.stdout + res.stderr
    full, cut = read_log(tmp_path / "full"), read_log(tmp_path / "cut")
    assert [r["train_loss"] for r in cut] == [r["train_loss"] for r in full]
    # the same checkpoint continued by one process with the same global batch
    shutil.copytree(tmp_path / "cut", tmp_path / "solo")
    res = run(tmp_path, args + ["--out", "solo", "--max-steps", "8", "--resume"])
    assert res.returncode == 0, res.stderr
    assert [r["step"] for r in read_log(tmp_path / "solo")][-1] == 8


def test_a_batch_that_does_not_split_is_refused(corpus, tmp_path):
    res = run(tmp_path, ["--data", corpus, "--out", "x", "--max-steps", "2"] + TINY + ["--batch-size", "3"], n=2)
    assert res.returncode != 0
    assert "--batch-size 3" in res.stderr and "2 equal parts" in res.stderr, res.stderr


def test_a_rank_that_fails_ends_the_job_with_its_rank_and_cause(corpus, tmp_path):
    """Rank 1 raises at its 5th step (a fault injected through sitecustomize): rank 0, waiting for it
    in the Allreduce (or still writing the checkpoint of step 4), must not hang; the message names
    rank 1 and the error; the last complete checkpoint is intact and resumable."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('PMI_RANK') == '1':\n"
        "    from nanoternary.fast import step\n"
        "    real, calls = step.part_loss_and_grads, []\n"
        "    def broken(*a, **k):\n"
        "        calls.append(1)\n"
        "        if len(calls) == 5:\n"
        "            raise MemoryError('injected fault')\n"
        "        return real(*a, **k)\n"
        "    step.part_loss_and_grads = broken\n")
    t0 = time.time()
    res = run(tmp_path, ["--data", corpus, "--out", "f", "--max-steps", "50"] + TINY_MPI, n=2,
              env={"PYTHONPATH": os.pathsep.join([str(tmp_path / "inject"), ROOT])}, timeout=120)
    assert time.time() - t0 < 120
    assert res.returncode != 0
    assert "rank 1: failed (MemoryError: injected fault)" in res.stderr, res.stderr[-2000:]
    assert Model.load(str(tmp_path / "f")).meta["step"] in (2, 4)
    res = run(tmp_path, ["--data", corpus, "--out", "f", "--max-steps", "6", "--resume"] + TINY_MPI, n=2)
    assert res.returncode == 0, res.stderr


def test_a_killed_rank_ends_the_job(corpus, tmp_path):
    """kill -9 of rank 1: the job ends instead of leaving rank 0 waiting forever, with a line naming
    it: rank 0's watchdog (fast/watchdog.py) or mpiexec, whichever notices first (mpiexec names the
    process id, which the run printed as rank 1's); the last checkpoint stays intact."""
    cmd = [MPIEXEC, "-n", "2", sys.executable, os.path.join(ROOT, "train.py"), "--data", corpus, "--out", "k",
           "--max-steps", "100000", "--eval-interval", "100000", "--save-interval", "2"] + TINY
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    lines = []
    pid1 = None
    deadline = time.time() + 120
    while time.time() < deadline:
        line = p.stdout.readline()
        lines.append(line)
        if line.startswith("processes:"):
            pid1 = int(line.split("rank 1 pid ")[1].split()[0])
        if line.startswith("step") and " 4 |" in line[:12]:
            break
    assert pid1, "".join(lines)
    os.kill(pid1, signal.SIGKILL)
    t0 = time.time()
    out, _ = p.communicate(timeout=60)
    assert time.time() - t0 < 60 and p.returncode != 0
    low = out.lower()
    ours = "lost rank 1 on" in out and f"(pid {pid1}): its process ended" in out     # the watchdog's line
    assert ours or str(pid1) in out and ("signal 9" in low or "killed" in low), out[-2000:]
    assert Model.load(str(tmp_path / "k")).meta["step"] >= 2


def test_ctrl_c_under_mpiexec_saves_and_stops(corpus, tmp_path):
    cmd = [MPIEXEC, "-n", "2", sys.executable, os.path.join(ROOT, "train.py"), "--data", corpus, "--out", "c",
           "--max-steps", "100000", "--eval-interval", "100000"] + TINY
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline:
        if os.path.exists(tmp_path / "c" / "log.jsonl") and len(read_log(tmp_path / "c")) >= 3:
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)                       # mpiexec passes it on to every process
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 130, out[-2000:]                 # the shell's status for SIGINT
    assert "stopped by SIGINT" in out
    m = Model.load(str(tmp_path / "c"))
    assert m.meta["step"] >= 3 and m.meta["step"] == read_log(tmp_path / "c")[-1]["step"]
    assert json.loads(open(tmp_path / "c" / "log.jsonl").readlines()[-1])["step"] == m.meta["step"]


def test_a_rank_that_has_rank0s_ctrl_c_finishes_the_step_when_its_own_copy_arrives():
    """mpiexec forwards one Ctrl-C to every rank, not at the same moment: when rank 0's has already
    reached rank 1 through sync(), rank 1's own copy is its first, not a second Ctrl-C (which would
    stop rank 1 at once and leave rank 0 waiting in the last step's collectives)."""
    from nanoternary.run import Interrupted, Run
    r = Run.__new__(Run)
    r.signal, r.received = "SIGINT", None          # rank 0's, copied by sync()
    r.on_signal(signal.SIGINT, None)               # this rank's own copy: finish the step
    assert (r.signal, r.received) == ("SIGINT", "SIGINT")
    with pytest.raises(Interrupted):               # a second one to this process: stop at once
        r.on_signal(signal.SIGINT, None)
