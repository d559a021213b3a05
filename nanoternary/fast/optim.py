"""The optimizers, fast: the same lines as optim.py, run on cache-sized pieces shared between the
cores (AdamW, the EMA: bit for bit the same), or one matrix per core (NorMuon).

AdamW's update is 13 elementwise operations, each rounded to the parameter's dtype. As NumPy calls
over the whole 50257 x 256 embedding each would stream 51 MB from memory, and each `a * b` would
allocate a 51 MB temporary. Done CHUNK elements at a time, the 13 passes run on a 128 KB piece that
stays in the L2 cache, only the first touch of each array goes to memory, and the one temporary is
a small buffer (measured here: 140 ms -> 63 ms per AdamW step of the float32 embedding, on one core).

That still leaves 13 NumPy passes through the cache, and they, not memory, set the time: the update
of the embedding ran at about 2x its memory bound (the bound: it must read p, g, m, v and write p,
m, v, 7 x 51.5 MB = 360 MB, at the bandwidth tools/roofline.py measures). No arrangement of NumPy
calls does better, since each of the 13 roundings is its own call. With numba installed
(`pip install -e ".[fast]"`), the same 13 operations run as one compiled loop (`_adamw_loop_py`, compiled): each
element read once, updated in registers with the same roundings in the same order -- numba's
default keeps IEEE semantics: no fused multiply-add, no reassociation -- and written once. Bit for
bit the same result (tests/test_fast.py runs all three ways: the compiled loop, the loop as plain
Python, the NumPy pieces), and at its memory bound: `python -m nanoternary.tools.roofline` times
both side by side (its two "AdamW update, embedding" rows; one core): 2.0-2.2x the bound with the
NumPy pieces, 0.5-0.6x with the compiled loop, 3.5x faster (measured on a loaded machine, where
its bandwidth measure a + b -> c reads low; the loop moves its 360 MB at 22-40 GB/s).
Without numba the NumPy pieces run.
The pieces are split between the cores (threads.parallel_ranges).

NorMuon's update of a matrix is mostly its Newton-Schulz products, (256 x 683) matrices too small
for BLAS to keep two cores busy; FastNorMuon runs the matrices' updates in parallel instead, one
thread per core with single-threaded BLAS.

    adam = FastAdamW(params, lr=3e-3)     # the same constructor, state and results as optim.AdamW
"""
import math

import numpy as np

from ..optim import EMA, AdamW, NorMuon
from .profile import section
from .threads import default_workers, parallel_ranges, run_shards

CHUNK = 32768  # elements per piece (128 KB of float32, fits in L2)


def _adamw_loop_py(P, G, M, V, b1, c1, b2, c2, shrink, step_size, eps_hat):
    # P, G, M, V (n,) one dtype; the scalars of that dtype -> P, M, V updated in place
    """optim.AdamW.update, one element at a time: the same operations, rounded in the same order."""
    for i in range(P.shape[0]):
        g = G[i]
        m = M[i] * b1 + g * c1                     # m = b1 m + (1 - b1) g
        v = V[i] * b2 + (g * g) * c2               # v = b2 v + (1 - b2) g^2
        M[i] = m
        V[i] = v
        P[i] = P[i] * shrink - step_size * (m / (np.sqrt(v) + eps_hat))


_UNSET = object()
_adamw_loop = _UNSET       # the compiled loop, None without numba; made on first use (importing numba
                           # takes about half a second, which a process that never updates should not pay)


def _compiled_loop():
    """numba's compilation of _adamw_loop_py, or None when numba is not installed. error_model="numpy"
    lets a division by 0 give inf as NumPy does (numba's default, Python's ZeroDivisionError check,
    would stop the loop from being vectorised); nogil: the threads of parallel_ranges run at once;
    cache: compiled once per machine, not once per process."""
    global _adamw_loop
    if _adamw_loop is _UNSET:
        try:
            import numba
        except ImportError:        # the optional extra: without it, the NumPy pieces
            _adamw_loop = None
        else:
            _adamw_loop = numba.njit(nogil=True, error_model="numpy", cache=True)(_adamw_loop_py)
    return _adamw_loop


def _chunks(lo, hi):
    """Slices covering range(lo, hi), CHUNK elements at a time."""
    for i in range(lo, hi, CHUNK):
        yield slice(i, min(i + CHUNK, hi))


def _flat(a):
    """A flat view of a C-contiguous array, so that writes to the view update the array."""
    if not a.flags.c_contiguous:
        raise ValueError("parameters must be C-contiguous to be updated in place")
    return a.reshape(-1)


class FastAdamW(AdamW):
    def step(self, params, grads, lr=None):
        with section("optimizer"):
            super().step(params, grads, lr)

    def update(self, p, g, m, v, lr, t, decay):
        b1, b2 = self.betas
        bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t
        step_size, eps_hat = lr * math.sqrt(bc2) / bc1, self.eps * math.sqrt(bc2)
        shrink = 1.0 - lr * self.weight_decay if decay else None
        P, G, M, V = _flat(p), np.ravel(g), _flat(m), _flat(v)
        loop = _compiled_loop()
        if loop is not None and P.dtype in (np.float32, np.float64) and G.dtype == P.dtype:
            f = P.dtype.type               # the constants rounded as NumPy rounds a Python float here
            consts = (f(b1), f(1.0 - b1), f(b2), f(1.0 - b2), f(1.0 if shrink is None else shrink),
                      f(step_size), f(eps_hat))      # p * 1 == p exactly: no decay
            parallel_ranges(lambda lo, hi: loop(P[lo:hi], G[lo:hi], M[lo:hi], V[lo:hi], *consts), P.size)
            return

        def piece(lo, hi):
            buf = np.empty(min(CHUNK, hi - lo), dtype=P.dtype)
            for s in _chunks(lo, hi):                  # optim.AdamW.update, line for line
                p_, g_, m_, v_, tmp = P[s], G[s], M[s], V[s], buf[:s.stop - s.start]
                if shrink is not None:
                    p_ *= shrink
                m_ *= b1
                np.multiply(g_, 1.0 - b1, out=tmp)
                m_ += tmp
                v_ *= b2
                np.multiply(g_, g_, out=tmp)
                tmp *= 1.0 - b2
                v_ += tmp
                np.sqrt(v_, out=tmp)
                tmp += eps_hat
                np.divide(m_, tmp, out=tmp)
                tmp *= step_size
                p_ -= tmp
        parallel_ranges(piece, P.size)


class FastEMA(EMA):
    def update(self, params):
        with section("optimizer"):
            super().update(params)

    def update_one(self, s, p, d):
        S, P = _flat(s), np.ravel(p)

        def piece(lo, hi):
            buf = np.empty(min(CHUNK, hi - lo), dtype=S.dtype)
            for c in _chunks(lo, hi):                  # optim.EMA.update_one: s -= (1-d)(s - p)
                tmp = buf[:c.stop - c.start]
                np.subtract(S[c], P[c], out=tmp)
                tmp *= 1.0 - d
                S[c] -= tmp
        parallel_ranges(piece, S.size)


class FastNorMuon(NorMuon):
    def step(self, params, grads, lr=None):
        lr = float(self.lr if lr is None else lr)
        names = [k for k in self.names if grads.get(k) is not None]
        workers = min(default_workers(), len(names)) or 1
        groups = [[] for _ in range(workers)]
        load = [0] * workers
        for k in sorted(names, key=lambda k: -params[k].size):      # largest first, to the least loaded
            i = load.index(min(load))
            groups[i].append(k)
            load[i] += params[k].size

        def update(group):
            for k in group:
                self.t[k] += 1
                self.update(params[k], grads[k], self.m[k], self.v[k], lr)
        with section("optimizer"):
            run_shards(update, [(g,) for g in groups if g])
