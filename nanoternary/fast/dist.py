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
    dp = DataParallel(comm, wire="full")
    loss, grads = dp.loss_and_grads(model, [(x, y, rows)])   # the global batch's; the same everywhere
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
- A 16-bit wire (`wire="bfloat16"` or `"float16"`): each number crosses in 2 bytes, the sums are
  made in float32 (ring_allreduce_), half the bytes; off by default (docs/mpi.md: its effect on the
  loss).

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

from ..optim import accumulate
from . import step
from .profile import section
from .watchdog import Watchdog

POLL = 2e-4             # seconds between tests of a pending MPI operation (waiting without a busy core)
SEGMENT = 1 << 20       # numbers per message of the 16-bit ring
WIRES = ("full", "bfloat16", "float16")


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
        self.background = self.comm.Dup()         # for the reduction that runs in a thread
        self.watchdog = None

    def bcast(self, value):
        return self.comm.bcast(value, root=0)

    def allreduce_(self, buf):
        """buf (contiguous float array) := its sum over all ranks, in place."""
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return buf

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


def encode(x, wire):
    # x (n,) float -> (n + 2,) uint16: the numbers in 2 bytes each, after a 2-number header (a float32 scale)
    """bfloat16: the upper half of each float32, rounded to the nearest (ties to even): float32's
    range, 8 bits of precision. float16: x * s in IEEE half precision, s a power of two chosen so
    that the largest |x| lands near 2**14 (float16 alone overflows past 65504 and loses everything
    below 6e-8, where small gradients live); 11 bits of precision, a range of 2**-24 .. 2**15 of
    the largest. The header carries s (1 for bfloat16)."""
    x32 = np.asarray(x, dtype=np.float32)
    out = np.empty(x32.size + 2, dtype=np.uint16)
    scale = np.float32(1.0)
    if wire == "bfloat16":
        u = x32.view(np.uint32)
        r = u >> 16                           # the upper half, truncated ...
        r &= 1
        r += 0x7FFF                           # ... plus just under half a unit, or half when it is odd:
        r += u                                # round to nearest, ties to even
        r >>= 16
        out[2:] = r
    else:
        top = float(np.max(np.abs(x32))) if x32.size else 0.0
        if np.isfinite(top) and top > 0:
            scale = np.float32(2.0 ** (14 - np.frexp(top)[1]))     # top * scale in [2**13, 2**14)
        out[2:] = (x32 * scale).astype(np.float16).view(np.uint16)
    out[:2] = np.array([scale], dtype=np.float32).view(np.uint16)
    return out


def decode(h, wire):
    # h (n + 2,) uint16 -> (n,) float32: encode's numbers back
    scale = h[:2].copy().view(np.float32)[0]
    if wire == "bfloat16":
        out = h[2:].astype(np.uint32)
        out <<= 16                            # the upper half back in place, the lower half zeros
        return out.view(np.float32)
    out = h[2:].view(np.float16).astype(np.float32)
    out /= scale
    return out


def ring_allreduce_(world, comm, x, wire):
    """x (contiguous float array) := its sum over the ranks, in place, each number crossing in 16
    bits and every sum made in float32 (x's own dtype if wider), the same result on every rank.

    A ring, as MPI's large Allreduce does it (P ranks, x cut in P chunks): P-1 steps of reduce-scatter,
    where each rank sends a chunk to its right neighbour and adds the one from its left into x (after
    which rank r holds the whole sum of chunk r+1), then P-1 steps of allgather, where the summed
    chunks travel round. Each rank sends 2(P-1)/P of x. The owner of a chunk rounds its sum to 16
    bits and uses the rounded numbers itself, so every rank ends with the same bits. Messages go in
    SEGMENT-sized pieces, so that encoding one overlaps sending the last."""
    MPI, P, r = world.MPI, world.size, world.rank
    flat = x.reshape(-1)
    bounds = [flat.size * i // P for i in range(P + 1)]
    right, left = (r + 1) % P, (r - 1) % P

    def pieces(c):                              # chunk c in segments: [(lo, hi)]
        lo, hi = bounds[c], bounds[c + 1]
        return [(a, min(a + SEGMENT, hi)) for a in range(lo, hi, SEGMENT)] or [(lo, lo)]

    def exchange(step, send_c, recv_c, outgoing):
        """Send chunk send_c's segments (outgoing(lo, hi) -> encoded) right, receive chunk recv_c's
        from the left -> [(lo, hi, encoded)] received."""
        ins = [(lo, hi, np.empty(hi - lo + 2, dtype=np.uint16)) for lo, hi in pieces(recv_c)]
        reqs = [comm.Irecv([h, MPI.UINT16_T], source=left, tag=step * 100000 + j) for j, (_, _, h) in enumerate(ins)]
        keep = []
        for j, (lo, hi) in enumerate(pieces(send_c)):
            keep.append(outgoing(lo, hi))
            reqs.append(comm.Isend([keep[-1], MPI.UINT16_T], dest=right, tag=step * 100000 + j))
        world.wait(reqs)
        return ins

    for s in range(P - 1):                      # reduce-scatter
        got = exchange(s, (r - s) % P, (r - s - 1) % P, lambda lo, hi: encode(flat[lo:hi], wire))
        for lo, hi, h in got:
            flat[lo:hi] += decode(h, wire)
    own = (r + 1) % P                           # the chunk whose whole sum is here
    encoded = {lo: encode(flat[lo:hi], wire) for lo, hi in pieces(own)}
    for lo, hi in pieces(own):
        flat[lo:hi] = decode(encoded[lo], wire)  # the rounded sum, as every other rank will have it
    for s in range(P - 1):                      # allgather: pass the rounded sums on, as received
        got = exchange(P - 1 + s, (r + 1 - s) % P, (r - s) % P, lambda lo, hi: encoded[lo])
        encoded = {}
        for lo, hi, h in got:
            flat[lo:hi] = decode(h, wire)
            encoded[lo] = h
    return x


def allreduce_(world, x, wire="full", comm=None):
    """x := its sum over the ranks, in place: MPI's Allreduce for the full wire, the 16-bit ring
    otherwise. Waits by polling (MPIWorld.wait), so that it can run in a thread beside compute."""
    comm = comm or world.comm
    if wire == "full":
        world.wait([comm.Iallreduce(world.MPI.IN_PLACE, x, op=world.MPI.SUM)])
    else:
        ring_allreduce_(world, comm, x, wire)
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


# ------------------------------------------------------------------------------------ the step


class DataParallel:
    """The training step of a global batch on every rank: each rank runs fast/step.py on its rows,
    and the loss and the gradients are summed over the ranks, so every rank ends with the loss and
    gradient of the whole batch (and applies the same update). With one process, just the step.

    wire: "full" (the gradients' own dtype), "bfloat16" or "float16" (2 bytes a number, sums in
    float32: encode, ring_allreduce_). overlap: send the head's part of the embedding's gradient
    while the body's backward runs (module docstring)."""

    def __init__(self, comm, wire="full", overlap=True):
        if wire not in WIRES:
            raise ValueError(f"wire {wire!r}: one of {', '.join(WIRES)}")
        self.comm, self.wire, self.overlap = comm, wire, overlap
        self.bucket, self.timing = None, {}

    def loss_and_grads(self, model, batches, *, label_smoothing=0.0, z_loss=0.0, train_embed=True, workers=None):
        """batches: the global micro-batches [(x, y, rows)], the same on every rank (x, y (B,T);
        rows: the counted positions of the whole micro-batch, or None for all) -> (loss, grads):
        the mean over the micro-batches of the loss of the whole batch and its gradient.
        self.timing afterwards: the seconds the backward overlapped the head's dE on the wire
        (overlap_s) and the seconds spent waiting for the sums after the backward (wait_s)."""
        comm, k = self.comm, len(batches)
        loss, grads, pending, t_head = 0.0, {}, None, None
        for i, (x, y, rows) in enumerate(batches):
            B, T = np.shape(y)
            b0, b1 = B * comm.rank // comm.size, B * (comm.rank + 1) // comm.size    # this rank's sequences
            mine = None if rows is None else rows[(rows >= b0 * T) & (rows < b1 * T)] - b0 * T
            denom = B * T if rows is None else rows.size
            early = comm.size > 1 and self.overlap and train_embed and i == k - 1

            def head_done(grads_head):            # the last micro-batch's head is done: dE goes out now
                nonlocal pending, t_head
                if k > 1:                          # with the earlier micro-batches' dE, as accumulate() adds them
                    grads_head["embed.w"] = grads.pop("embed.w") + (1.0 / k) * grads_head["embed.w"]
                pending, t_head = Pending(comm, grads_head["embed.w"], self.wire), time.perf_counter()
            out = step.part_loss_and_grads(model, x[b0:b1], y[b0:b1], mine, denom, label_smoothing=label_smoothing,
                                           z_loss=z_loss, train_embed=train_embed, workers=workers,
                                           head_done=head_done if early else None)
            l, g = out[:2]
            if early:                              # the lookup's part: rows of the global batch's tokens
                g.pop("embed.w")                   # (on the wire)
                tokens = np.unique(x)
                g["embed.lookup"] = np.zeros((tokens.size, out[2].shape[-1]), dtype=out[2].dtype)
                with section("embedding"):
                    step.embedding_backward_sorted(out[2], np.searchsorted(tokens, x[b0:b1]), g["embed.lookup"])
            loss += l / k
            grads = g if k == 1 else accumulate(grads, g, 1.0 / k)
        if comm.size == 1:
            return loss, grads
        t0 = time.perf_counter()
        with section("allreduce"):
            dE = pending.wait() if pending is not None else None
            t1 = time.perf_counter()
            if self.bucket is None or not self.bucket.fits(grads):
                self.bucket = GradBuffer(grads, wire=self.wire)
            grads, (loss,) = self.bucket.allreduce(comm, grads, [loss])
        self.timing = {"overlap_s": 0.0 if t_head is None else t0 - t_head, "wait_s": time.perf_counter() - t0,
                       "dE_wait_s": t1 - t0}
        if dE is not None:
            grads = dict(grads)
            dE[tokens] += grads.pop("embed.lookup")     # distinct tokens: one row each, no np.add.at needed
            grads["embed.w"] = dE
        return float(loss), grads


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
