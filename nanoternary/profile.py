"""Where the time goes: named sections, timed exclusively, summed over threads.

    from nanoternary import profile
    with profile.section("glu"):            # in the model: a region of the step
        ...
    @profile.timed("norms")                 # on an op: every call of it
    def rmsnorm_forward(...): ...

    profile.enable(); ...run steps...; shares = profile.shares()   # name -> fraction of time

Exclusive: time spent in a section nested inside another (a norm inside the GLU) counts for the
inner one only, so the shares add up to 1. Timing is per thread and then summed, so with the batch
split across cores (parallel.py) a share is a fraction of the CPU time of the step. Disabled (the
default), a section costs one function call and a flag test.
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


def _charge(name, now, start):
    with _lock:
        _times[name] += now - start


@contextlib.contextmanager
def section(name):
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
