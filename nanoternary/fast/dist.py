"""Data parallelism across processes, and machines, with MPI: one more level of what threads.py does
across the cores of one process.

    mpiexec -n 2 python train.py ...                      # pip install -e ".[mpi]" first

Every process (a "rank") holds the whole model and the same optimizer state. At each step every rank
draws the same global batch from the same seeded generator and takes its own rows; it computes the
gradient of its rows' share of the loss (each share divided by the count of the whole batch, so the
shares add up to the mean); one in-place Allreduce sums the gradients, and every rank applies the
same update. So N processes train the same model as one process with the same global batch, up to
the order of floating-point sums.

    comm = world()              # Single() without mpiexec: nothing imported, nothing changes
    comm.rank, comm.size
    loss, grads = comm.sum_grads(loss, grads)   # the sums over the ranks: one Allreduce (fast/step.py)
    comm.bcast(value)           # rank 0's value on every rank (the run's control: clock, Ctrl-C)
    comm.fail(message)          # a failing rank stops the whole job instead of leaving it hanging

Launched by mpiexec is told by the environment variables it sets (MPICH's PMI_SIZE, Open MPI's
OMPI_COMM_WORLD_SIZE, PMIx's PMIX_RANK); only then is mpi4py imported.
"""
import os
import socket
import sys

import numpy as np

from .profile import section


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

    def sum_grads(self, loss, grads):
        return loss, grads

    def barrier(self):
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
        self._grads = None

    def bcast(self, value):
        return self.comm.bcast(value, root=0)

    def allreduce_(self, buf):
        """buf (contiguous float array) := its sum over all ranks, in place."""
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return buf

    def sum_grads(self, loss, grads):
        """(the loss, the gradients) summed over the ranks: one Allreduce of one buffer (GradBuffer,
        kept from step to step); the gradients come back as views of the buffer."""
        if self._grads is None or not self._grads.fits(grads):
            self._grads = GradBuffer(grads)
        with section("allreduce"):
            grads, (loss,) = self._grads.allreduce(self, grads, [loss])
        return float(loss), grads

    def barrier(self):
        self.comm.Barrier()

    def fail(self, message, code=1):
        """Print the message and end every process of the job (MPI_Abort): the others may be waiting
        in a collective call for this one, forever."""
        print(f"rank {self.rank}: {message}; stopping all {self.size} processes", file=sys.stderr, flush=True)
        self.comm.Abort(code)


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


class GradBuffer:
    """One contiguous buffer holding every gradient of a step (in a fixed order) and a few scalars,
    so that the sum over ranks is one Allreduce of a few large messages rather than one per tensor."""

    def __init__(self, grads, n_scalars=1):
        self.names = sorted(grads)
        self.shapes = {k: grads[k].shape for k in self.names}
        sizes = [grads[k].size for k in self.names]
        self.offsets = np.concatenate(([0], np.cumsum(sizes))).astype(int)
        self.buf = np.empty(self.offsets[-1] + n_scalars, dtype=grads[self.names[0]].dtype)
        self.n_scalars = n_scalars

    def fits(self, grads):
        return sorted(grads) == self.names

    def allreduce(self, comm, grads, scalars):
        """-> (summed grads as views of the buffer, summed scalars)."""
        for k, a, b in zip(self.names, self.offsets[:-1], self.offsets[1:]):
            self.buf[a:b] = grads[k].reshape(-1)
        self.buf[self.offsets[-1]:] = scalars
        comm.allreduce_(self.buf)
        out = {k: self.buf[a:b].reshape(self.shapes[k]) for k, a, b in zip(self.names, self.offsets[:-1],
                                                                           self.offsets[1:])}
        return out, self.buf[self.offsets[-1]:].copy()
