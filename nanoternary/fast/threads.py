"""Data parallelism inside one process: the work of a training step spread over the CPU's cores.

NumPy runs elementwise operations (the norms, gates, softmax exps of this model) on ONE core, and
BLAS runs each matrix product on all of them. On a 2-core machine that leaves half the machine idle
for much of a training step. Instead, fast/step.py cuts the batch into one shard per core and runs
each shard's forward, then the head, then each shard's backward, each piece in its own thread with
BLAS at one thread per call: data-parallel training across cores, as one would across machines.
NumPy releases Python's GIL inside its loops and BLAS calls, so the threads really run at once.

The BLAS thread count is set with threadpoolctl (it knows OpenBLAS, MKL, BLIS and Accelerate).
Where no BLAS library can be controlled, everything runs in one thread: same results, one core for
elementwise work. The count is process-wide: call these functions from one thread at a time (the
training loop), and not from inside a task they run.
"""
import contextlib
import os
from concurrent.futures import ThreadPoolExecutor, wait

from threadpoolctl import ThreadpoolController

from . import profile

_blas = None             # threadpoolctl's controller of the BLAS libraries, made on first use
_pool = None
_threads = None          # set_threads(n); None: one per core
_limit = None            # the BLAS thread limit of set_threads(n)


def blas():
    """threadpoolctl's controller of this process's BLAS libraries (possibly none of them)."""
    global _blas
    if _blas is None:
        import numpy  # noqa: F401  (loads the BLAS library)
        _blas = ThreadpoolController().select(user_api="blas")
    return _blas


def blas_threads_now():
    """BLAS threads per call now (the first library's), or None when there is no BLAS to control."""
    info = blas().info()
    return info[0]["num_threads"] if info else None


def available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def set_threads(n):
    """Use n cores from now on: n worker threads, and BLAS at n threads per call outside them
    (None or 0: every core, BLAS as it was). train.py --threads, bench --threads."""
    global _threads, _limit
    if _limit is not None:
        _limit.restore_original_limits()
    _threads = n or None
    _limit = blas().limit(limits=n) if n else None


def default_workers():
    """Worker threads: set_threads(n), else NANOTERNARY_THREADS, else the cores we may use;
    1 when BLAS cannot be limited to one thread per call."""
    env = os.environ.get("NANOTERNARY_THREADS")
    n = _threads or (int(env) if env else available_cores())
    return max(1, n) if blas().lib_controllers else 1


@contextlib.contextmanager
def blas_threads(n):
    """Run the block with BLAS limited to n threads per call (restored afterwards, also on errors)."""
    with blas().limit(limits=n):
        yield


def _get_pool(n):
    global _pool
    if _pool is None or _pool._max_workers < n:
        if _pool is not None:
            _pool.shutdown(wait=True)     # its threads, and their per-thread buffers, go away
        _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="nanoternary")
    return _pool


def _run(fn, arg_lists):
    """fn(*args) for each args in the pool; all of them finish before this returns or raises."""
    name = profile.current()              # workers' time outside their own sections counts here
    task = (lambda *a: _in_section(name, fn, a)) if name else fn
    with profile.section(None):           # the caller only waits: that is no CPU work
        futures = [_get_pool(len(arg_lists)).submit(task, *a) for a in arg_lists]
        wait(futures)
    return [f.result() for f in futures]  # re-raises a worker's exception, after all have finished


def _in_section(name, fn, args):
    with profile.section(name):
        return fn(*args)


def run_shards(fn, shards):
    """[fn(*s) for s in shards], one thread per shard, each BLAS call single-threaded."""
    if len(shards) == 1:
        return [fn(*shards[0])]
    with blas_threads(1):
        return _run(fn, shards)


def split(n, parts):
    """[(lo, hi), ...]: range(n) in `parts` consecutive pieces of nearly equal size (none empty)."""
    parts = max(1, min(parts, n))
    bounds = [n * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def parallel_ranges(fn, n, min_size=1 << 20):
    """fn(lo, hi) over consecutive pieces of range(n), one per worker, in parallel: for elementwise
    work on big arrays (the optimizer's update of the 12.9M-entry embedding). Small n: one call."""
    workers = default_workers()
    if n < min_size or workers == 1:
        fn(0, n)
        return
    _run(fn, split(n, workers))


def add_into(a, b):
    """a += b, the work shared between the cores when the arrays are big (the embedding's gradient)."""
    fa, fb = a.reshape(-1), b.reshape(-1)

    def add(lo, hi):
        fa[lo:hi] += fb[lo:hi]
    parallel_ranges(add, fa.size)
