"""The optimizers, fast: the same lines as optim.py, run on cache-sized pieces shared between the
cores (AdamW, the EMA: bit for bit the same), or one matrix per core (NorMuon).

AdamW's update is about a dozen elementwise passes. Over the whole 50257 x 256 embedding each pass
streams 51 MB from memory, and each `a * b` allocates a 51 MB temporary. Done CHUNK elements at a
time, the dozen passes run on a 128 KB piece that stays in the L2 cache, only the first touch of
each array goes to memory, and the one temporary is a small buffer (measured here: 140 ms -> 63 ms
per AdamW step of the float32 embedding, on one core). The pieces are split between the cores
(threads.parallel_ranges).

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
