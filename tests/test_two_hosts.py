"""Training across two machines, for real: two network namespaces joined by a veth pair, each with
its own host name, address and disk (nanoternary/tools/twohosts.py), MPICH's `mpiexec -f hosts`
with a launcher that enters a namespace where it would run ssh, and UCX held to TCP as between two
real machines. What must hold:

- 2 hosts, 1 process each, batch 8, 5 float64 steps: the same losses and weights as 1 process; the
  gradients crossed the veth (its byte counters); each host built its own data/ cache, and --out is
  on host1's disk only (host2's holds its corpus and its cache, nothing else);
- other data on host2 (its corpus edited) is refused before training;
- the link cut mid-run, or host2's process killed: the job ends by itself within a bounded time
  with one line naming the lost rank and host; host1's last checkpoint is intact and one process
  resumes it; a Ctrl-C while the job waits for a lost host ends it at once with the same line.

Needs root and iproute2 (`ip`, `tc`) and util-linux's `unshare`; skipped otherwise, with the reason.
Select with `python -m pytest -m twohosts`, skip with `-m "not twohosts"`."""
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
from nanoternary.tools import twohosts  # noqa: E402

REASON = twohosts.why_not()
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
pytestmark = [pytest.mark.twohosts,
              pytest.mark.skipif(REASON is not None, reason=f"two hosts in namespaces: {REASON}"),
              pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install -e \".[mpi]\" brings one)")]

from test_train import ROOT, TINY, write_corpus  # noqa: E402

from nanoternary.model import Model  # noqa: E402

i = TINY.index("--threads")
ARGS = (TINY[:i] + TINY[i + 2:] + ["--threads", "1", "--batch-size", "8", "--eval-interval", "3",
                                   "--save-interval", "2", "--data", "corpus.parquet", "--out", "out"])
TRAIN = [sys.executable, os.path.join(ROOT, "train.py")]


@pytest.fixture
def hosts(tmp_path):
    with twohosts.TwoHosts(str(tmp_path / "hosts")) as h:
        for disk in h.disks.values():
            write_corpus(disk)                 # the same corpus, at the same path, on each host's disk
        yield h


def read_log(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def start(hosts, args):
    """train.py under mpiexec on the two hosts, in the background -> Popen (output: one text stream)."""
    return hosts.popen(hosts.mpiexec(TRAIN + ARGS + args, mpiexec=MPIEXEC), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)


def wait_for_step(hosts, step, p, timeout=60):
    """Until host1's log.jsonl reaches `step` (the run is going and has saved a checkpoint)."""
    log = os.path.join(hosts.disks["host1"], "out", "log.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if p.poll() is not None:
            raise AssertionError(f"the run ended early:\n{p.stdout.read()[-3000:]}")
        if any(r["step"] >= step for r in read_log(log)):
            return
        time.sleep(0.1)
    raise AssertionError(f"no step {step} in {timeout} s")


def lost_lines(out):
    return [line for line in out.splitlines() if "lost rank" in line]


def resumes_alone(hosts, steps):
    """host1's checkpoint, continued by one process on host1 (same global batch) to `steps`."""
    res = hosts.run(hosts.on("host1", TRAIN + ["--out", "out", "--resume", "--max-steps", str(steps)]), timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert read_log(os.path.join(hosts.disks["host1"], "out", "log.jsonl"))[-1]["step"] == steps


def test_two_hosts_train_the_same_model_as_one_process(hosts, tmp_path):
    write_corpus(str(tmp_path))
    one = subprocess.run(TRAIN + ARGS + ["--max-steps", "5", "--dtype", "float64", "--out", "one"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert one.returncode == 0, one.stderr
    before = hosts.link_bytes()
    two = hosts.run(hosts.mpiexec(TRAIN + ARGS + ["--max-steps", "5", "--dtype", "float64"], mpiexec=MPIEXEC),
                    timeout=120)
    after = hosts.link_bytes()
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    assert "rank 0 pid" in two.stdout and " on host1, rank 1 pid" in two.stdout and two.stdout.count(" on host2") == 1

    l1, l2 = read_log(tmp_path / "one" / "log.jsonl"), read_log(os.path.join(hosts.disks["host1"], "out", "log.jsonl"))
    assert [r["step"] for r in l1] == [r["step"] for r in l2] == [1, 2, 3, 4, 5]
    for a, b in zip(l1, l2):
        for key in ("train_loss", "val_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (key, a, b)   # the log rounds to 5 digits
    m1, m2 = Model.load(str(tmp_path / "one")), Model.load(os.path.join(hosts.disks["host1"], "out"))
    for k, v in m1.params.items():
        err = np.abs(m2.params[k] - v).max() / max(np.abs(v).max(), 1e-30)
        assert err <= 1e-10, f"{k}: weights differ by {err:.2e} (relative)"

    # the gradients crossed the link: 5 sums of every float64 gradient, each at least once each way
    grad_bytes = 8 * sum(v.size for v in m1.params.values())
    sent, received = after[0] - before[0], after[1] - before[1]
    assert min(sent, received) >= 0.9 * 5 * grad_bytes, (sent, received, grad_bytes)

    # each host its own disk: host1 holds the run and its own cache; host2 its corpus and its cache
    disk1, disk2 = hosts.disks["host1"], hosts.disks["host2"]
    assert {"latest.npz", "log.jsonl"} <= set(os.listdir(os.path.join(disk1, "out")))
    assert sorted(os.listdir(disk2)) == ["corpus.parquet", "data"], os.listdir(disk2)
    assert os.listdir(os.path.join(disk1, "data")) and os.listdir(os.path.join(disk2, "data"))


def test_other_data_on_the_second_host_is_refused_before_training(hosts):
    write_corpus(hosts.disks["host2"], seed=1)            # host2's corpus: other sentences
    res = hosts.run(hosts.mpiexec(TRAIN + ARGS + ["--max-steps", "5"], mpiexec=MPIEXEC), timeout=120)
    assert res.returncode != 0
    assert "rank 1 prepared other data than rank 0" in res.stderr, res.stderr[-2000:]
    assert "step" not in res.stdout.replace("steps", "")                  # no step was trained
    assert not os.path.exists(os.path.join(hosts.disks["host1"], "out", "latest.npz"))


def test_a_cut_link_ends_the_job_and_the_checkpoint_resumes_alone(hosts):
    """The cable pulled at step 4 or later: both sides hear nothing more; within --peer-timeout (5 s
    here) each stops, rank 0 with one line naming rank 1 and host2; host1's checkpoint resumes."""
    p = start(hosts, ["--max-steps", "100000", "--peer-timeout", "5"])
    wait_for_step(hosts, 4, p)
    hosts.link(False)
    t0 = time.time()
    out, _ = p.communicate(timeout=60)
    took = time.time() - t0
    assert p.returncode != 0
    lines = lost_lines(out)
    assert len(lines) == 1 and "rank 0 on host1: lost rank 1 on host2" in lines[0], out[-3000:]
    assert "no sign of life" in lines[0]
    assert 4 < took < 20, took                               # the timeout, and not much more
    step = Model.load(os.path.join(hosts.disks["host1"], "out")).meta["step"]
    assert step >= 4 and step % 2 == 0
    hosts.link(True)
    resumes_alone(hosts, step + 2)


def test_a_killed_process_on_the_second_host_ends_the_job(hosts):
    p = start(hosts, ["--max-steps", "100000"])
    for line in p.stdout:                                # "processes: rank 0 pid N on host1, rank 1 pid M on host2"
        if line.startswith("processes:"):
            pid = int(line.split("rank 1 pid ")[1].split()[0])
            break
    wait_for_step(hosts, 4, p)
    os.kill(pid, signal.SIGKILL)
    t0 = time.time()
    out, _ = p.communicate(timeout=60)
    assert time.time() - t0 < 20 and p.returncode != 0
    # whoever notices first says so: rank 0's watchdog (the connection closed), or mpiexec, whose
    # proxy on host2 saw its child die and which then kills rank 0 at once, naming the process id
    # (which the run's "processes:" line gives as rank 1's) and its host
    lines = lost_lines(out)
    ours = len(lines) == 1 and f"lost rank 1 on host2 (pid {pid}): its process ended" in lines[0]
    assert ours or not lines and f"PID {pid} RUNNING AT host2" in out, out[-3000:]
    step = Model.load(os.path.join(hosts.disks["host1"], "out")).meta["step"]
    resumes_alone(hosts, step + 2)


def test_ctrl_c_while_waiting_for_a_lost_host_stops_at_once(hosts):
    """The link cut with a long --peer-timeout (60 s): the job waits for host2; a Ctrl-C to mpiexec
    ends it within seconds, naming the lost host, instead of promising a step that cannot finish."""
    p = start(hosts, ["--max-steps", "100000", "--peer-timeout", "60"])
    wait_for_step(hosts, 4, p)
    hosts.link(False)
    time.sleep(4)                                        # host2 silent for longer than the watchdog's grace
    p.send_signal(signal.SIGINT)                         # to mpiexec, as a Ctrl-C in its terminal
    t0 = time.time()
    out, _ = p.communicate(timeout=60)
    assert time.time() - t0 < 10, out[-3000:]
    assert p.returncode != 0
    lines = lost_lines(out)
    assert len(lines) == 1 and "lost rank 1 on host2" in lines[0] and "SIGINT" in lines[0], out[-3000:]
    Model.load(os.path.join(hosts.disks["host1"], "out"))                 # intact
