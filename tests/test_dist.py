"""fast/dist.py's pieces: the bfloat16 wire, the ring that sums in float32 and leaves every rank
with the same bits, the data-parallel step with gradient accumulation and the head's dE
summed during the backward (the same model as one process), and --grad-wire bfloat16 in train.py.
The MPI tests run on this machine (mpiexec -n 2 or 3); tests/test_two_hosts.py runs across hosts."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from nanoternary.fast.dist import from_bfloat16, to_bfloat16

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bfloat16_rounds_to_nearest():
    x = np.array([1.0, -2.5, 3.14159265, 1e-30, -6e37, 0.0, np.inf, -np.inf], dtype=np.float32)
    h = to_bfloat16(x)
    y = from_bfloat16(h)
    assert h.dtype == np.uint16 and y.dtype == np.float32 and y.shape == x.shape
    assert np.all(np.abs(y[:6] - x[:6]) <= np.abs(x[:6]) * 2.0 ** -8), (x, y)   # 8 significant bits: half a unit
    assert y[6] == np.inf and y[7] == -np.inf and np.isnan(from_bfloat16(to_bfloat16(np.float32([np.nan])))).all()
    # 1 + 2**-8 + 2**-20 lies just above halfway between the bfloat16 neighbours 1 and 1 + 2**-7: up;
    # 1 + 2**-8 - 2**-20 just below: down; the tie 1 + 2**-8 goes away from zero, as does -(1 + 2**-8)
    near = np.array([1 + 2.0 ** -8 + 2.0 ** -20, 1 + 2.0 ** -8 - 2.0 ** -20, 1 + 2.0 ** -8, -(1 + 2.0 ** -8)],
                    dtype=np.float32)
    assert from_bfloat16(to_bfloat16(near)).tolist() == [1 + 2.0 ** -7, 1.0, 1 + 2.0 ** -7, -(1 + 2.0 ** -7)]
    # bfloat16 keeps float32's range: the tiny gradients float16 would flush to zero survive
    tiny = np.array([3e-12, -7e-20, 1e-38], dtype=np.float32)
    assert np.all(np.abs(from_bfloat16(to_bfloat16(tiny)) - tiny) <= np.abs(tiny) * 2.0 ** -8)
    assert from_bfloat16(to_bfloat16(np.zeros(0, np.float32))).size == 0


mpi4py = pytest.importorskip("mpi4py")
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install -e \".[mpi]\" brings one)")

RING = """
import sys, numpy as np
from nanoternary.fast import dist
comm = dist.world()
out = []
for dtype in (np.float32, np.float64):
    for n in (2, 7, 3 * dist.SEGMENT + 5):               # fewer numbers than ranks; several segments each
        xs = [np.random.default_rng(r).standard_normal(n).astype(dtype) * 1e-3 for r in range(comm.size)]
        x = xs[comm.rank].copy()
        dist.ring_allreduce_(comm, comm.comm, x)
        exact = np.sum([a.astype(np.float64) for a in xs], axis=0)
        err = float(np.max(np.abs(x - exact) / np.sum(np.abs(xs), axis=0)))
        same = len(set(comm.comm.allgather(x.tobytes()))) == 1
        out.append((np.dtype(dtype).name, n, err, same))
if comm.rank == 0:
    print(repr(out))
"""


@needs_mpi
@pytest.mark.parametrize("n", [2, 3])
def test_the_bfloat16_ring_sums_and_leaves_every_rank_the_same_bits(tmp_path, n):
    script = tmp_path / "ring.py"
    script.write_text(RING)
    res = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0, res.stderr[-3000:]
    for dtype, size, err, same in eval(res.stdout):
        assert same, f"{dtype}, {size} numbers: the ranks hold different sums"
        bound = n * 2.0 ** -8           # n-1 partial sums sent, and the whole one: each rounding within
                                        # half a unit of 8 significant bits, 2**-8 of sum |x|
        assert 0 < err <= bound, f"{dtype}, {size} numbers, {n} ranks: error {err:.2e} (of sum |x|) > {bound:.2e}"


def train(tmp_path, corpus, out, extra, n=None):
    from test_train import TINY
    cmd = ([MPIEXEC, "-n", str(n)] if n else []) + [sys.executable, os.path.join(ROOT, "train.py"),
                                                     "--data", corpus, "--out", out, "--max-steps", "5"]
    i = TINY.index("--threads")
    res = subprocess.run(cmd + TINY[:i] + TINY[i + 2:] + ["--threads", "1", "--eval-interval", "5"] + extra,
                         capture_output=True, text=True, cwd=tmp_path, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    from test_train import read_log
    return read_log(tmp_path / out)


@needs_mpi
def test_accumulated_micro_batches_on_two_processes_equal_one_process(tmp_path):
    """--grad-accum 2: each micro-batch summed over the processes, with its dE during its backward."""
    from test_train import write_corpus
    from nanoternary.model import Model
    corpus = write_corpus(str(tmp_path))
    extra = ["--dtype", "float64", "--grad-accum", "2", "--loss-frac", "0.5"]
    one = train(tmp_path, corpus, "one", extra)
    two = train(tmp_path, corpus, "two", extra, n=2)
    assert [r["train_loss"] for r in one] == pytest.approx([r["train_loss"] for r in two], rel=1e-5)
    m1, m2 = Model.load(str(tmp_path / "one")), Model.load(str(tmp_path / "two"))
    for k, v in m1.params.items():
        assert np.abs(m2.params[k] - v).max() <= 1e-10 * max(np.abs(v).max(), 1e-30), k


@needs_mpi
def test_the_bfloat16_wire_trains_nearly_like_the_full_one(tmp_path):
    """Same steps in float32, the gradients summed through 16 bits: losses within 1% over 5 steps
    (Adam's first steps move every weight by about lr whatever its gradient's size, so a sum near zero
    that rounds to the other sign moves its weight the other way: docs/mpi.md measures a longer run);
    the weights differ (it went through 16 bits), by a small fraction of how far they moved."""
    from test_train import write_corpus
    from nanoternary.model import Model
    corpus = write_corpus(str(tmp_path))
    fast = ["--warmup", "0", "--lr-adam", "3e-3"]
    full = train(tmp_path, corpus, "full", fast, n=2)
    half = train(tmp_path, corpus, "half", fast + ["--grad-wire", "bfloat16"], n=2)
    assert [r["train_loss"] for r in half] == pytest.approx([r["train_loss"] for r in full], rel=1e-2)
    m0 = Model.load(str(tmp_path / "full"))
    init = type(m0)(m0.cfg, seed=0, dtype=np.float32).params             # the run's seed: the weights at step 0
    m1, m2 = m0.params, Model.load(str(tmp_path / "half")).params
    moved = sum(np.abs(m1[k] - init[k]).sum() for k in m1)              # how far 5 steps took the weights
    apart = sum(np.abs(m2[k] - m1[k]).sum() for k in m1)                # and how far the two runs ended apart
    assert 0 < apart < 0.1 * moved, (apart, moved)
