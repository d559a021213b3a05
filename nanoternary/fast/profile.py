"""Where the time goes: named sections, timed exclusively, summed over threads.

    from nanoternary.fast import profile
    with profile.attached():                # time the model's op calls (and the fast layer's sections)
        ...run steps...
    profile.shares()                        # name -> fraction of the time
    with profile.attached(), profile.paused():   # or only some blocks:
        with profile.recording(): ...

The model and the ops know nothing of this: `attached()` replaces the functions model.py calls
(RMSNorm, the ConvMixer, the GLU, the embedding, the quantizer) by timed wrappers for the duration
of the block, and puts the originals back afterwards (see WRAPPED). The fast layer's own pieces
(the fused head, the shard sum) open sections themselves: `with profile.section("head forward"):`.

Exclusive: time spent in a section nested inside another (a norm inside the GLU) counts for the
inner one only, so the shares add up to 1. Timing is per thread and then summed, so with the work
spread over cores (threads.py) a share is a fraction of the CPU time of the step: a worker thread
charges its time to its own sections, or else to the section that started it, and the thread that
waits for the workers charges nothing meanwhile (`section(None)`). A BLAS call that itself uses
several threads (NorMuon's products, made outside the workers) counts once, as wall time.
Disabled (the default), a section costs a function call, a context manager and a flag test, and
the model's functions are not wrapped at all.
"""
import contextlib
import functools
import threading
import time
from collections import defaultdict

from .. import model

_enabled = False
_times = defaultdict(float)
_lock = threading.Lock()
_local = threading.local()


def enable(on=True):
    global _enabled
    _enabled = on


def enabled():
    return _enabled


@contextlib.contextmanager
def recording():
    """Time the block (within `attached()`, whose timing can be off between such blocks): train.py
    times its training steps only, not the evaluations and saves between them."""
    global _enabled
    was, _enabled = _enabled, True
    try:
        yield
    finally:
        _enabled = was


@contextlib.contextmanager
def paused():
    """Nothing inside the block is timed (evaluation during a profiled run)."""
    global _enabled
    was, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = was


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


def timed(name, fn):
    """fn, with every call of it a `section(name)`."""
    @functools.wraps(fn)
    def inner(*a, **k):
        with section(name):
            return fn(*a, **k)
    return inner


# section -> the names in model.py whose calls it times (they are looked up in model.py's namespace
# at every call, so replacing them there reaches every block of every shard)
WRAPPED = {
    "embedding": ("embedding_forward", "embedding_backward"),
    "ternary quantize": ("quantize",),
    "convmixer": ("mixer_forward", "mixer_backward"),
    "glu": ("glu_forward", "glu_backward"),
    "norms": ("rmsnorm_forward", "rmsnorm_backward"),
}


@contextlib.contextmanager
def attached():
    """Profile everything inside the block: sections on, the model's functions wrapped (WRAPPED),
    the totals reset at the start. The originals are back in place afterwards."""
    originals = {name: getattr(model, name) for names in WRAPPED.values() for name in names}
    for section_name, names in WRAPPED.items():
        for name in names:
            setattr(model, name, timed(section_name, originals[name]))
    reset()
    enable(True)
    try:
        yield
    finally:
        enable(False)
        for name, fn in originals.items():
            setattr(model, name, fn)
