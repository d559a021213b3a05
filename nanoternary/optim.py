"""Optimizers, learning-rate schedules, gradient clipping and a weight EMA, by hand in NumPy.

The reference (FlashLM v3) trains with:

    NorMuon  lr 0.02   the 2-D latent weights of the ternary core (momentum orthogonalised by a
                       5-step Newton-Schulz iteration, then normalised per row)
    AdamW    lr 3e-4   everything else: the tied embedding, the 3-D conv weights, the RMSNorm gains
             betas (0.9, 0.95), weight decay 0.1 (here on matrices only, not on the 1-D gains)
    warmup-stable-decay schedule, global gradient-norm clip 1.0, EMA of the weights 0.999

AdamW follows torch.optim.AdamW (Loshchilov & Hutter 2019), Muon is Keller Jordan's (2024,
modded-nanogpt), NorMuon the reference's; tests/test_peer.py checks both against PyTorch.
Everything works on flat dicts with the model's keys, updated in place: train.py's
build_optimizers and train_step show the use. Each elementwise update is one method on whole
arrays (AdamW.update, EMA.update_one); nanoternary/fast/optim.py runs the same update faster.
"""
import math
from contextlib import contextmanager

import numpy as np


def split_params(params):
    """-> (NorMuon's names, AdamW's names). NorMuon gets the 2-D weights of the core (the ternary
    latents mix.out, glu.gate, glu.up, glu.down); AdamW the rest: the tied embedding and the hier
    head's class vectors (orthogonalising a matrix whose rows are tokens makes no sense), the 3-D
    conv kernels and the 1-D gains."""
    muon = [k for k, p in params.items() if p.ndim == 2 and k.split(".")[0] not in ("embed", "head")]
    return muon, [k for k in params if k not in muon]


class AdamW:
    """AdamW with bias-corrected moments and decoupled weight decay, as torch.optim.AdamW.

    For each owned parameter p with gradient g, at its own step count t = 1, 2, ...:

        p = p * (1 - lr * wd)                 decoupled decay, on matrices only (p.ndim >= 2)
        m = b1 * m + (1 - b1) * g             first moment (mean of g)
        v = b2 * v + (1 - b2) * g^2           second moment (mean of g^2), elementwise
        p = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    The step count is per parameter, so a parameter left out of grads for a while (the frozen
    embedding) starts its bias correction at t = 1 when it joins, as in torch.
    """

    kind = "AdamW"

    def __init__(self, params, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        self.names = list(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.m = {k: np.zeros_like(p) for k, p in params.items()}
        self.v = {k: np.zeros_like(p) for k, p in params.items()}
        self.t = {k: 0 for k in self.names}

    def step(self, params, grads, lr=None):
        """Update the owned params in place. lr overrides the base lr (for schedules)."""
        lr = float(self.lr if lr is None else lr)
        for k in self.names:
            g = grads.get(k)
            if g is None:
                continue
            if g.shape != params[k].shape:
                raise ValueError(f"AdamW: gradient of {k} has shape {g.shape}, parameter {params[k].shape}")
            self.t[k] += 1
            self.update(params[k], g, self.m[k], self.v[k], lr, self.t[k], params[k].ndim >= 2)

    def update(self, p, g, m, v, lr, t, decay):
        """One AdamW step of one parameter p (gradient g, moments m and v, step count t), in place."""
        b1, b2 = self.betas
        # The last line of the update, p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps) with the
        # bias corrections bc = 1 - beta^t (m and v start at 0, so early on they are too small by
        # exactly that factor), rearranged to save a pass (Kingma & Ba, sec. 2):
        #     p -= step_size * m / (sqrt(v) + eps_hat),  step_size = lr sqrt(bc2) / bc1,  eps_hat = eps sqrt(bc2)
        bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t
        step_size, eps_hat = lr * math.sqrt(bc2) / bc1, self.eps * math.sqrt(bc2)
        if decay:
            p *= 1.0 - lr * self.weight_decay         # decoupled weight decay, independent of g
        m *= b1
        m += (1.0 - b1) * g                           # m = b1 m + (1 - b1) g
        v *= b2
        v += (1.0 - b2) * (g * g)                     # v = b2 v + (1 - b2) g^2
        p -= step_size * (m / (np.sqrt(v) + eps_hat))


NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic, tuned to converge fast, not exactly


def newton_schulz5(G, steps=5, eps=1e-7):
    # G (R, C) -> X (R, C), approximately U V^T where G = U S V^T
    """Approximate the orthogonal factor of G (all singular values pushed toward 1).

    With X = G / ||G||_F (so every singular value is <= 1), each iteration applies the odd
    polynomial f(x) = a x + b x^3 + c x^5 to the singular values without an SVD:

        A = X X^T;  B = b A + c A A;  X = a X + B X      (= U f(S) V^T)

    The coefficients make f steep at 0 (slope a = 3.4) and then keep it oscillating around 1
    rather than converging exactly: after five steps every singular value above about 1% of
    ||G||_F lands between 0.68 and 1.2, enough for an update direction and cheaper than an exact
    orthogonalisation. When R > C we iterate on X^T so that A is the smaller Gram matrix.
    """
    a, b, c = NS_COEFFS
    X = G / (np.linalg.norm(G) + eps)
    transposed = X.shape[0] > X.shape[1]
    if transposed:
        X = X.T
    for _ in range(steps):
        A = X @ X.T                  # (r, r), r = min(R, C)
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.T if transposed else X


class NorMuon:
    """NorMuon: orthogonalised momentum with a per-row second moment, for matrices.

    For each owned weight W (R, C) with gradient g:

        m = mu * m + (1 - mu) * g                    momentum (an EMA of the gradient)
        O = newton_schulz5(m)                        (R, C), ~ U V^T of m: all directions equal
        v = beta2 * v + (1 - beta2) * mean(O^2, 1)   (R,) per-row second moment, no bias correction
        O = O / (sqrt(v) + eps)                      each row (output neuron) to a similar size
        W = W - lr * 0.2 * sqrt(R*C) / ||O||_F * O   update of RMS exactly 0.2 * lr per entry

    Why: the gradient of a weight matrix is typically dominated by a few directions (it is nearly
    low rank); replacing the momentum by its orthogonal factor U V^T (Muon) gives every direction
    the same step size. The rows can still differ a lot in size; NorMuon divides each row by a
    running RMS, as Adam does per entry but per neuron. The final rescale fixes the overall size:
    an RMS of 0.2 per entry (what AdamW updates typically have), times lr.
    """

    kind = "NorMuon"

    def __init__(self, params, lr=0.02, momentum=0.95, beta2=0.999, ns_steps=5, eps=1e-8):
        for k, p in params.items():
            if p.ndim != 2:
                raise ValueError(f"NorMuon is for matrices; {k} has shape {p.shape} (give it to AdamW)")
        self.names = list(params)
        self.lr, self.momentum, self.beta2, self.ns_steps, self.eps = lr, momentum, beta2, ns_steps, eps
        self.m = {k: np.zeros_like(p) for k, p in params.items()}
        self.v = {k: np.zeros(p.shape[0], dtype=p.dtype) for k, p in params.items()}
        self.t = {k: 0 for k in self.names}          # not used by the math; kept for inspection

    def step(self, params, grads, lr=None):
        """Update the owned params in place. lr overrides the base lr (for schedules)."""
        lr = float(self.lr if lr is None else lr)
        for k in self.names:
            if grads.get(k) is not None:
                self.t[k] += 1
                self.update(params[k], grads[k], self.m[k], self.v[k], lr)

    def update(self, p, g, m, v, lr):
        """One NorMuon step of one matrix p (gradient g, momentum m, row second moment v), in place."""
        m *= self.momentum
        m += (1.0 - self.momentum) * g                          # momentum, not Nesterov
        O = newton_schulz5(m, self.ns_steps)
        v *= self.beta2
        v += (1.0 - self.beta2) * np.mean(O * O, axis=1)        # per-row second moment
        O /= (np.sqrt(v) + self.eps)[:, None]                   # each row by its running RMS
        scale = 0.2 * math.sqrt(O.size) / (np.linalg.norm(O) + self.eps)
        p -= (lr * scale * O).astype(p.dtype, copy=False)       # RMS 0.2 * lr per entry


# ----------------------------------------------------------------------------------------------
# learning-rate schedules: a multiplier in [0, 1] for the base learning rate, from the fraction of
# the run done (`progress`: of the steps, tokens or wall clock, whichever limit is nearest) and a
# warmup that counts steps: (step+1)/warmup capped at 1, so step 0 already moves a little


def wsd(progress, step, warmup, decay_frac=0.1):
    """Warmup-stable-decay: 1 until the last `decay_frac` of the run, then linearly down to 0."""
    d = 1.0
    if decay_frac > 0 and progress >= 1.0 - decay_frac:
        d = max(0.0, (1.0 - progress) / decay_frac)
    return _warmup(step, warmup) * d


def cosine(progress, step, warmup, min_ratio=0.1):
    """A half cosine from 1 to min_ratio over the run: min_ratio + (1 - min_ratio)(1 + cos(pi p))/2."""
    p = min(1.0, max(0.0, progress))
    return _warmup(step, warmup) * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p)))


def _warmup(step, warmup):
    return 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)


# ----------------------------------------------------------------------------------------------
# gradients: clipping and accumulation


def grad_norm(grads):
    """Global L2 norm sqrt(sum_k sum(g_k^2)) over all gradients (np.dot: no temporary)."""
    return math.sqrt(sum(float(np.dot(g.reshape(-1), g.reshape(-1))) for g in grads.values() if g is not None))


def clip_grad_norm(grads, max_norm):
    """Scale all gradients in place by max_norm / (norm + 1e-6) when the global norm exceeds
    max_norm (as torch.nn.utils.clip_grad_norm_); max_norm 0: no clipping. Returns the norm before
    clipping; a non-finite norm is returned as it is and nothing is scaled (train.py stops the run)."""
    norm = grad_norm(grads)
    if max_norm and math.isfinite(norm) and norm > max_norm:
        for g in grads.values():
            if g is not None:
                g *= max_norm / (norm + 1e-6)
    return norm


def accumulate(acc, grads, scale=1.0):
    """acc[k] += scale * grads[k] in place: gradient accumulation over n micro-batches is n calls
    with scale 1/n, starting from acc = {}. A gradient seen first is taken as it is when scale is 1
    (one micro-batch: no copy). Returns acc."""
    for k, g in grads.items():
        if g is None:
            continue
        if k not in acc:
            acc[k] = g if scale == 1.0 else scale * g
        else:
            acc[k] += scale * g
    return acc


# ----------------------------------------------------------------------------------------------
# EMA of the weights


class EMA:
    """Exponential moving average of the weights, for evaluation:

        ema = decay * ema + (1 - decay) * p          after every optimizer step

    decay = 0.999 averages over roughly the last 1 / (1 - decay) = 1000 steps. It starts at the
    initial weights, whose share after n updates is decay^n (0.999^4000 = 1.8%).
    `with ema.swapped(model.params): evaluate()` puts the averaged weights in the live arrays and
    the trained ones back afterwards.
    """

    kind = "EMA"

    def __init__(self, params, decay=0.999):
        self.decay = decay
        self.shadow = {k: p.copy() for k, p in params.items()}
        self.num_updates = 0

    def update(self, params):
        self.num_updates += 1
        for k, s in self.shadow.items():
            self.update_one(s, params[k], self.decay)

    def update_one(self, s, p, d):
        """ema = d*ema + (1-d)*p, written as ema -= (1-d)*(ema - p), in place."""
        s -= (1.0 - d) * (s - p)

    @contextmanager
    def swapped(self, params):
        """Within the block params hold the averaged weights; the trained ones come back after."""
        backup = {k: params[k].copy() for k in self.shadow}
        for k, s in self.shadow.items():
            np.copyto(params[k], s)
        try:
            yield params
        finally:
            for k, b in backup.items():
                np.copyto(params[k], b)
