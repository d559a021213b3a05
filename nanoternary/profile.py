"""Where the time goes: named sections, timed exclusively, summed over threads.

    from nanoternary import profile
    with profile.section("glu"):            # in the model: a region of the step
        ...
    @profile.timed("norms")                 # on an op: every call of it
    def rmsnorm_forward(...): ...

    profile.enable(); ...run steps...; shares = profile.shares()   # name -> fraction of time

Exclusive: time spent in a section nested inside another (a norm inside the GLU) counts for the
inner one only, so the shares add up to 1. Timing is per thread and then summed, so with the work
spread over cores (parallel.py) a share is a fraction of the CPU time of the step: a worker thread
charges its time to its own sections, or else to the section that started it, and the thread that
waits for the workers charges nothing meanwhile (`section(None)`). A BLAS call that itself uses
several threads (NorMuon's products, made outside the workers) counts once, as wall time.
Disabled (the default), a section costs a function call, a context manager and a flag test.
"""
import contextlib
import functools
import threading
import time
from collections import defaultdict

_enabled = False
_times = defaultdict(float)
_lock = threading.Lock()
_local = threading.local()


def enable(on=True):
    global _enabled
    _enabled = on


def enabled():
    return _enabled


def reset():
    with _lock:
        _times.clear()


def times():
    with _lock:
        return dict(_times)


def shares():
    t = times()
    total = sum(t.values()) or 1.0
    return {k: v / total for k, v in sorted(t.items(), key=lambda kv: -kv[1])}


def current():
    """The innermost section of this thread, or None."""
    stack = getattr(_local, "stack", None)
    return stack[-1][0] if _enabled and stack else None


def _charge(name, now, start):
    if name is not None:
        with _lock:
            _times[name] += now - start


@contextlib.contextmanager
def section(name):
    """Charge the time inside to `name` (None: charge it to nothing)."""
    if not _enabled:
        yield
        return
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    now = time.perf_counter()
    if stack:                                   # pause the enclosing section
        parent, start = stack[-1]
        _charge(parent, now, start)
    stack.append([name, now])
    try:
        yield
    finally:
        now = time.perf_counter()
        _, start = stack.pop()
        _charge(name, now, start)
        if stack:
            stack[-1][1] = now                  # the enclosing section resumes


def timed(name):
    """Decorator: every call of the function is a `section(name)`."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*a, **k):
            if not _enabled:
                return fn(*a, **k)
            with section(name):
                return fn(*a, **k)
        return inner
    return wrap
