"""Data parallelism inside one process: the work of a training step spread over the CPU's cores.

NumPy runs elementwise operations (the norms, gates, softmax exps of this model) on ONE core, and
BLAS runs each matrix product on all of them. On a 2-core machine that leaves half the machine idle
for much of a training step. Instead, `Model.loss_and_grads` cuts the batch into one shard per core
and runs each shard's forward, then the head (split by rows, or by classes for the hier head), then
each shard's backward, each piece in its own thread with BLAS at one thread per call: data-parallel
training across cores, as one would across devices. Each worker computes the gradient of its
shard's share of the loss, and the shards' gradients are summed. NumPy releases Python's GIL inside
its loops and BLAS calls, so the threads really run at the same time.

That needs control of the BLAS thread count, which NumPy does not expose. NumPy's wheels bundle
OpenBLAS, whose `openblas_set_num_threads` we call through ctypes (the library is found among the
process's loaded libraries in /proc/self/maps). Where that is not possible (another BLAS, another
OS), `blas_control()` is None and everything runs in one thread: same results, one core for
elementwise work. The thread count is process-wide: call these functions from one thread at a
time (the training loop), and not from inside a task they run.
"""
import contextlib
import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

from . import profile

_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
            "openblas_set_num_threads64_", "openblas_set_num_threads")
_GETTERS = ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
            "openblas_get_num_threads64_", "openblas_get_num_threads")
_control = None
_lock = threading.Lock()
_pool = None
_threads = None          # set_threads(n); None: one per core


def blas_control():
    """(set_threads, get_threads) for NumPy's bundled OpenBLAS, or None when it cannot be found."""
    global _control
    if _control is None:
        _control = False
        import numpy  # noqa: F401  (loads the BLAS library)
        try:
            with open("/proc/self/maps") as f:
                libs = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
        except OSError:
            libs = []
        for path in libs:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            setter = next((getattr(lib, s) for s in _SETTERS if hasattr(lib, s)), None)
            getter = next((getattr(lib, g) for g in _GETTERS if hasattr(lib, g)), None)
            if setter is not None and getter is not None:
                setter.argtypes = [ctypes.c_int]
                getter.restype = ctypes.c_int
                _control = (setter, getter)
                break
    return _control or None


def available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def set_threads(n):
    """Use n worker threads from now on (None or 0: one per core). train.py --threads, bench --threads."""
    global _threads
    _threads = n or None


def default_workers():
    """Worker threads: set_threads(n), else NANOTERNARY_THREADS, else the cores we may use;
    1 without BLAS control."""
    env = os.environ.get("NANOTERNARY_THREADS")
    n = _threads or (int(env) if env else available_cores())
    return max(1, n) if blas_control() is not None else 1


@contextlib.contextmanager
def blas_threads(n):
    """Run the block with BLAS limited to n threads per call (no-op without BLAS control)."""
    ctl = blas_control()
    if ctl is None:
        yield
        return
    setter, getter = ctl
    with _lock:
        old = getter()
        setter(n)
    try:
        yield
    finally:
        with _lock:
            setter(old)


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


def parallel_ranges(fn, n, min_size=1 << 20):
    """fn(lo, hi) over consecutive pieces of range(n), one per worker, in parallel: for elementwise
    work on big arrays (the optimizer's update of the 12.9M-entry embedding). Small n: one call."""
    workers = default_workers()
    if n < min_size or workers == 1:
        fn(0, n)
        return
    bounds = [n * i // workers for i in range(workers + 1)]
    _run(fn, list(zip(bounds[:-1], bounds[1:])))


def add_into(a, b):
    """a += b, the work shared between the cores when the arrays are big (the embedding's gradient)."""
    fa, fb = a.reshape(-1), b.reshape(-1)

    def add(lo, hi):
        fa[lo:hi] += fb[lo:hi]
    parallel_ranges(add, fa.size)
