"""Data parallelism across processes, and machines, with MPI: one more level of what threads.py does
across the cores of one process.

    mpiexec -n 2 python train.py ...                      # pip install -e ".[mpi]" first

Every process (a "rank") holds the whole model and the same optimizer state. At each step every rank
draws the same global batch from the same seeded generator and takes its own rows; it computes the
gradient of its rows' share of the loss (each share divided by the count of the whole batch, so the
shares add up to the mean); the gradients are summed over the ranks, and every rank applies the
same update. So N processes train the same model as one process with the same global batch, up to
the order of floating-point sums.

    comm = world()              # Single() without mpiexec: nothing imported, nothing changes
    comm.rank, comm.size
    comm.watch(timeout)         # from now on a lost rank ends the job within `timeout` seconds
    loss, grads = comm.sum_grads(loss, grads, wire)   # the sums over the ranks (fast/step.py)
    comm.send_early(dE, wire)   # dE's sum starts now, in a thread; sum_grads(..., rows) waits for it
    comm.bcast(value)           # rank 0's value on every rank (the run's control: clock, Ctrl-C)
    comm.allreduce_(buf)        # buf := its sum over the ranks, in place
    comm.fail(message)          # a failing rank stops the whole job instead of leaving it hanging

What crosses the wire. With the embedding trained, 13.6M gradients (54 MB in float32) are summed at
every step; on a 1 Gbit/s link that takes longer than the step's compute. Two things help, and both
leave every rank with the same update:

- Overlap. The tied embedding's gradient has two parts: the head's (dE = dlogits^T h, 12.9M
  numbers, final as soon as the head's backward is done, FIRST) and the lookup's (the rows of the
  batch's tokens, final LAST, after the body's backward). So the head's dE goes on the wire in a
  thread while the body's backward runs (fast/step.py calls `head_done`), and the lookup's rows
  follow with the core's gradients, summed as a small dense block over the global batch's tokens.
- A 16-bit wire (`wire="bfloat16"`): each number crosses in 2 bytes, half the bytes, the sums
  made in float32 (ring_allreduce_); off by default (docs/mpi.md: its effect on the loss).

A lost rank (its machine or the link to it gone, its process killed) leaves the others waiting in a
collective call forever: MPI has no timeout. comm.watch(timeout) starts watchdog.py's Watchdog: a
side connection to rank 0 and a thread that ends the job, with one line naming the lost rank and its
host, when a peer falls silent for `timeout` seconds or its connection closes, or at once on a
Ctrl-C while a peer is silent.

Launched by mpiexec is told by the environment variables it sets (MPICH's PMI_SIZE, Open MPI's
OMPI_COMM_WORLD_SIZE, PMIx's PMIX_RANK); only then is mpi4py imported.
"""
import os
import socket
import sys
import threading
import time

import numpy as np

from .profile import section
from .watchdog import Watchdog

POLL = 2e-4             # seconds between tests of a pending MPI operation (waiting without a busy core)
SEGMENT = 1 << 21       # numbers per message of the bfloat16 ring (4 MB: measured best on 1 and 10 Gbit/s)
WIRES = ("full", "bfloat16")


def launched_size():
    """How many processes mpiexec started, from its environment (1 when it did not start this one;
    2 means "several, ask MPI" under a PMIx launcher, which does not say how many)."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 2 if "PMIX_RANK" in os.environ else 1


class Single:
    """The world of one process: every collective operation is the identity."""
    rank, size, local_size = 0, 1, 1

    def bcast(self, value):
        return value

    def allreduce_(self, buf):
        return buf

    def sum_grads(self, loss, grads, wire="full", rows=None):
        return loss, grads

    def barrier(self):
        pass

    def watch(self, timeout):
        pass

    def fail(self, message, code=1):
        print(message, file=sys.stderr, flush=True)


class MPIWorld:
    """MPI's COMM_WORLD, through mpi4py, with what training needs of it."""

    def __init__(self):
        from mpi4py import MPI
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.local_size = self.comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size()   # ranks on this machine
        self.hosts = self.comm.allgather((socket.gethostname(), os.getpid()))
        self.background = self.comm.Dup()         # for the sum that runs in a thread (send_early)
        self.watchdog, self._grads, self.pending, self.timing = None, None, None, {}

    def bcast(self, value):
        return self.comm.bcast(value, root=0)

    def allreduce_(self, buf):
        """buf (contiguous float array) := its sum over all ranks, in place."""
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return buf

    def send_early(self, dE, wire="full"):
        """Start summing dE (the head's part of the embedding's gradient) over the ranks, in a thread,
        while the caller goes on with the backward; sum_grads(..., rows) waits for it."""
        self.pending, self.t_early = Pending(self, dE, wire), time.perf_counter()

    def sum_grads(self, loss, grads, wire="full", rows=None):
        """(the loss, the gradients) summed over the ranks: one sum of one buffer (GradBuffer, kept
        from step to step); the gradients come back as views of the buffer. After send_early(dE),
        grads["embed.w"] holds the lookup's gradient in the embedding's rows `rows` only: it is
        summed with the rest and added to dE's sum, which becomes grads["embed.w"]. self.timing:
        the backward that ran beside dE's sum (overlap_s), the wait here (wait_s, dE_wait_s)."""
        t0, pending, self.pending = time.perf_counter(), self.pending, None
        with section("allreduce"):
            dE = pending.wait() if pending is not None else None
            t1 = time.perf_counter()
            if self._grads is None or not self._grads.fits(grads) or self._grads.wire != wire:
                self._grads = GradBuffer(grads, wire=wire)
            grads, (loss,) = self._grads.allreduce(self, grads, [loss])
        self.timing = {"overlap_s": t0 - self.t_early if dE is not None else 0.0,
                       "wait_s": time.perf_counter() - t0, "dE_wait_s": t1 - t0}
        if dE is not None:
            grads = dict(grads)
            dE[rows] += grads["embed.w"]                # distinct rows: no np.add.at needed
            grads["embed.w"] = dE
        return float(loss), grads

    def barrier(self):
        self.comm.Barrier()

    def watch(self, timeout):
        """From now on, a rank that is lost ends the job within `timeout` seconds (0: never watch).
        Every rank calls it at the same point."""
        if timeout and self.watchdog is None:
            self.watchdog = Watchdog(self, timeout)

    def fail(self, message, code=1):
        """Print the message and end every process of the job (MPI_Abort): the others may be waiting
        in a collective call for this one, forever."""
        print(f"rank {self.rank}: {message}; stopping all {self.size} processes", file=sys.stderr, flush=True)
        if self.watchdog is not None:
            self.watchdog.say(b"f")               # "I end the job": the others need not report me lost
        if self.rank:
            time.sleep(0.5)     # the message travels through mpiexec's proxy on this machine: an abort overtakes it
        self.comm.Abort(code)

    def wait(self, requests):
        """Wait for nonblocking MPI operations without keeping a core busy (MPI's own Wait polls
        flat out, which takes a core from the compute that the wait overlaps)."""
        while not self.MPI.Request.Testall(requests):
            time.sleep(POLL)


# ------------------------------------------------------------------------------------ the 16-bit wire

HALF = 1 if sys.byteorder == "little" else 0    # where a float32's upper 16 bits sit in its two uint16s


def to_bfloat16(x):
    # x (n,) float -> (n,) uint16: bfloat16, the upper half of each float32's bits, rounded to nearest
    """bfloat16 is float32 with the lower 16 bits of the significand dropped: the same sign, exponent
    and range, 8 significant bits instead of 24. Adding 0x8000 (half the lowest kept bit) to the
    bits first carries into the upper half exactly when the dropped half is at least half a unit:
    rounding to the nearest, ties (1 number in 65,536) away from zero."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32) + np.uint32(0x8000)
    return bits.view(np.uint16)[HALF::2].copy()


def from_bfloat16(h):
    # h (n,) uint16 -> (n,) float32: the upper halves back in place, the lower halves zeros
    out = np.zeros(h.size, dtype=np.float32)
    out.view(np.uint16)[HALF::2] = h
    return out


def ring_allreduce_(world, comm, x):
    """x (contiguous float array) := its sum over the ranks, in place, each number crossing as a
    bfloat16 and every sum made in float32 (x's own dtype if wider), the same bits on every rank.

    The ring of MPI's large Allreduce (P ranks, x cut in P chunks): P-1 steps of reduce-scatter,
    where each rank sends a chunk to its right neighbour and adds the one from its left into x
    (after which rank r holds the whole sum of chunk r+1), then P-1 steps of allgather, where the
    summed chunks travel round. Each rank sends 2(P-1)/P of x, here in 2 bytes a number. The owner
    of a chunk rounds its sum to bfloat16 and keeps the rounded numbers itself, so that every rank
    ends with the same bits. The chunks go in segments of SEGMENT numbers, each running the ring on
    its own as soon as its last step arrived, so that one segment's additions and conversions
    overlap the next one's transfer."""
    MPI, P, r = world.MPI, world.size, world.rank
    flat = x.reshape(-1)
    bounds = [flat.size * i // P for i in range(P + 1)]
    right, left = (r + 1) % P, (r - 1) % P

    def segment(c, j):                           # chunk c's j-th segment, as a slice of flat
        lo = bounds[c] + j * SEGMENT
        return slice(min(lo, bounds[c + 1]), min(lo + SEGMENT, bounds[c + 1]))

    # step k of the 2(P-1): reduce-scatter (k < P-1) sends chunk r-k and receives chunk r-k-1;
    # allgather (k >= P-1, s = k-P+1) sends chunk r+1-s and receives chunk r-s. What step k
    # receives is what step k+1 sends (a partial sum, then a finished one), segment by segment.
    def received(k):
        return (r - k - 1) % P if k < P - 1 else (r - (k - P + 1)) % P

    n_seg = max(1, -(-max(b - a for a, b in zip(bounds, bounds[1:])) // SEGMENT))
    sends, recvs, pending = [], [], []          # MPI requests; pending[i]: (step, segment, buffer) of recvs[i]

    def post(k, j, payload):                     # step k of segment j: send payload, receive into a buffer
        tag = k * n_seg + j
        seg = segment(received(k), j)
        h = np.empty(seg.stop - seg.start, dtype=np.uint16)
        recvs.append(comm.Irecv([h, MPI.UINT16_T], source=left, tag=tag))
        pending.append((k, j, h))
        sends.append((comm.Isend([payload, MPI.UINT16_T], dest=right, tag=tag), payload))

    for j in range(n_seg):
        post(0, j, to_bfloat16(flat[segment(r, j)]))
    while recvs:
        done = MPI.Request.Testsome(recvs)
        if not done:
            time.sleep(POLL)
            continue
        arrived = [pending[i] for i in done]
        recvs[:] = [q for i, q in enumerate(recvs) if i not in done]
        pending[:] = [q for i, q in enumerate(pending) if i not in done]
        for k, j, h in arrived:
            seg = segment(received(k), j)
            if k < P - 1:
                flat[seg] += from_bfloat16(h)                 # the sum so far, in float32
                h = to_bfloat16(flat[seg])
                if k == P - 2:                                # the whole sum: its rounded numbers, here too
                    flat[seg] = from_bfloat16(h)
            else:
                flat[seg] = from_bfloat16(h)                  # a finished sum, passed on as it came
            if k < 2 * P - 3:
                post(k + 1, j, h)
    world.wait([req for req, _ in sends])
    return x


def allreduce_(world, x, wire="full", comm=None):
    """x := its sum over the ranks, in place: MPI's Allreduce for the full wire, the bfloat16 ring
    otherwise. Waits by polling (MPIWorld.wait), so that it can run in a thread beside compute."""
    if wire not in WIRES:
        raise ValueError(f"wire {wire!r}: one of {', '.join(WIRES)}")
    comm = comm or world.comm
    if wire == "full":
        world.wait([comm.Iallreduce(world.MPI.IN_PLACE, x, op=world.MPI.SUM)])
    else:
        ring_allreduce_(world, comm, x)
    return x


class Pending:
    """allreduce_(world, x, wire) running in a thread (on world.background, a communicator of its
    own): the compute goes on meanwhile. wait() -> x summed."""

    def __init__(self, world, x, wire):
        self.x, self.error = x, None

        def run():
            try:
                allreduce_(world, x, wire, world.background)
            except BaseException as e:         # re-raised by wait()
                self.error = e
        self.thread = threading.Thread(target=run, name="nanoternary-allreduce", daemon=True)
        self.thread.start()

    def wait(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.x


class GradBuffer:
    """One contiguous buffer holding every gradient of a step (in a fixed order), so that the sum
    over ranks is one Allreduce of a few large messages rather than one per tensor; a few scalars
    (the loss) go with it, summed in float64 apart when the wire is 16-bit."""

    def __init__(self, grads, n_scalars=1, wire="full"):
        self.names = sorted(grads)
        self.shapes = {k: grads[k].shape for k in self.names}
        sizes = [grads[k].size for k in self.names]
        self.offsets = np.concatenate(([0], np.cumsum(sizes))).astype(int)
        self.wire, self.n_scalars = wire, n_scalars
        extra = n_scalars if wire == "full" else 0
        self.buf = np.empty(self.offsets[-1] + extra, dtype=grads[self.names[0]].dtype)

    def fits(self, grads):
        return sorted(grads) == self.names and all(grads[k].shape == self.shapes[k] for k in self.names)

    def allreduce(self, comm, grads, scalars):
        """-> (summed grads as views of the buffer, summed scalars)."""
        n = self.offsets[-1]
        for k, a, b in zip(self.names, self.offsets[:-1], self.offsets[1:]):
            self.buf[a:b] = grads[k].reshape(-1)
        if self.wire == "full":
            self.buf[n:] = scalars
            comm.allreduce_(self.buf)
            sums = self.buf[n:].copy()
        else:
            allreduce_(comm, self.buf, self.wire)
            sums = comm.allreduce_(np.array(scalars, dtype=np.float64))
        out = {k: self.buf[a:b].reshape(self.shapes[k]) for k, a, b in zip(self.names, self.offsets[:-1],
                                                                           self.offsets[1:])}
        return out, sums


# ------------------------------------------------------------------------------------ the run's helpers


def rank0_first(comm, fn):
    """fn() on rank 0, then, once rank 0 is done, on every other rank: for work that rank 0 leaves on
    disk for the others (the token cache), or that another machine then does for itself."""
    result = fn() if comm.rank == 0 else None
    comm.barrier()
    return result if comm.rank == 0 else fn()


def from_rank0(comm, fn, errors):
    """fn() on rank 0 alone (reading the settings, the checkpoint to resume), its result on every
    rank; an exception of the types `errors` on rank 0 is raised on every rank."""
    try:
        got = ("ok", fn()) if comm.rank == 0 else None
    except errors as e:
        got = ("error", e)
    status, value = comm.bcast(got)
    if status == "error":
        raise value
    return value


_world = None


def world():
    """The processes of this job: Single() unless mpiexec started several."""
    global _world
    if _world is None:
        if launched_size() <= 1:
            _world = Single()
        else:
            try:
                import mpi4py  # noqa: F401
            except ImportError:
                raise SystemExit(f"error: started by mpiexec as {launched_size()} processes, but mpi4py is not "
                                 "installed: pip install -e \".[mpi]\"") from None
            _world = MPIWorld()
            if _world.size == 1:
                _world = Single()
    return _world
