"""Optimizers, learning-rate schedules, gradient clipping and a weight EMA, by hand in NumPy.

What the reference (FlashLM v3) trains with, and what this file gives:

    NorMuon  lr 0.02   the 2-D latent weights of the ternary core (momentum orthogonalised by a
                       5-step Newton-Schulz iteration, then normalised per row)
    AdamW    lr 3e-4   everything else: the tied embedding, the 3-D conv weights, the RMSNorm gains
             betas (0.9, 0.95), weight decay 0.1 on matrices only (none on norms and gains)
    warmup-stable-decay schedule, global gradient-norm clip 1.0, EMA of the weights 0.999

NorMuon follows the reference recipe as our PyTorch peer writes it (nanoternary/tools/torch_peer.py)
line for line, since that is what our runs are compared with; AdamW follows
`torch.optim.AdamW` (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019), and
Muon is Keller Jordan's (2024, modded-nanogpt).

Everything works on flat dicts with the model's keys,

    params: dict[str, np.ndarray]   updated IN PLACE, in the parameters' own dtype
    grads:  dict[str, np.ndarray]   same keys (a key missing from grads, or None, is skipped)

and an optimizer owns the names it was constructed with, so the two optimizers split one dict:

    muon_names, adam_names = split_params(model.params)          # the peer's split, see there
    muon = NorMuon({k: model.params[k] for k in muon_names})
    adam = AdamW({k: model.params[k] for k in adam_names})
    ...
    mult = wsd(step, total_steps, warmup=200)                    # schedule multiplier in [0, 1]
    clip_grad_norm(grads, 1.0)
    muon.step(model.params, grads, lr=0.02 * mult)
    adam.step(model.params, grads, lr=3e-4 * mult)

state_dict() of each returns a flat dict {str: np.ndarray | int | float | str} whose keys look like
"m/block.glu.gate.w"; it goes into np.savez as it is (prefix the keys, e.g. "adamw/", to keep
two optimizers in one file) and load_state_dict() takes the arrays np.load gives back.

Each optimizer's elementwise update is one method (`AdamW.update`, `EMA.update_one`) written on
whole arrays; nanoternary/fast/optim.py runs the same lines on cache-sized pieces shared between
the cores (bit-for-bit the same result: tests/test_fast.py).
"""
import math
from contextlib import contextmanager

import numpy as np

# ----------------------------------------------------------------------------------------------
# shared helpers


def _num(x):
    """A number stored by state_dict comes back from np.load as a 0-d array: make it Python."""
    return np.asarray(x).item()


def _check_state(kind, d, expected, strict, scalars=()):
    """Raise a readable error when a state dict does not fit this optimizer: another kind,
    missing entries, or (with strict) entries for names it does not own."""
    if "kind" in d and str(_num(d["kind"])) != kind:
        raise ValueError(f"{kind}.load_state_dict: this is the state of a {_num(d['kind'])}")
    missing = [k for k in expected if k not in d]
    if missing:
        raise KeyError(f"{kind}.load_state_dict: missing {len(missing)} entries, e.g. {missing[:3]}")
    if strict:
        extra = sorted(set(d) - set(expected) - {"kind", *scalars})
        if extra:
            raise KeyError(f"{kind}.load_state_dict: {len(extra)} unexpected entries, e.g. {extra[:3]} "
                           "(the state of other parameters?)")


def _load_array(kind, name, src, dst):
    """Copy a saved moment into the live one, checking the shape."""
    src = np.asarray(src)
    if src.shape != dst.shape:
        raise ValueError(f"{kind}.load_state_dict: {name} has shape {src.shape}, expected {dst.shape}")
    np.copyto(dst, src, casting="same_kind")


def default_decay(name, p):
    """The default weight-decay rule: decay matrices and conv kernels (ndim >= 2), never the
    1-D RMSNorm gains (shrinking a gain just rescales a layer; nothing is regularised)."""
    return p.ndim >= 2


def split_params(params, adamw_prefixes=("embed", "head"), conv_to_normuon=False):
    """Split parameter names between NorMuon and AdamW -> (normuon_names, adamw_names).

    The peer's split (the default): NorMuon gets the 2-D weights of the core, i.e. the latent
    weights of the ternary linears (mix.out, glu.gate, glu.up, glu.down); AdamW gets the rest:
    the tied embedding and any head matrix (names whose first part is in `adamw_prefixes`;
    orthogonalising a 50257-row embedding makes no sense, each row is one token), the 3-D conv
    kernels (C_out, C_in/G, K) and the 1-D gains.

    conv_to_normuon=True also gives the 3-D conv kernels to NorMuon, which then treats each as the
    matrix (C_out, C_in/G * K) (one row per output channel). Not the peer's recipe.
    """
    muon, adam = [], []
    for name, p in params.items():
        core = name.split(".")[0] not in adamw_prefixes
        if core and (p.ndim == 2 or (conv_to_normuon and p.ndim == 3)):
            muon.append(name)
        else:
            adam.append(name)
    return muon, adam


# ----------------------------------------------------------------------------------------------
# AdamW


class _MomentState:
    """state_dict / load_state_dict shared by AdamW and NorMuon: per owned name a first moment m,
    a second moment v and a step count t. The flat dict format:
    {"kind": "AdamW" | "NorMuon", "m/<name>": array, "v/<name>": array, "t/<name>": int}.
    Hyperparameters are not stored: they come from the run's config."""

    def state_dict(self):
        d = {"kind": self.kind}
        for k in self.names:
            d["m/" + k], d["v/" + k], d["t/" + k] = self.m[k].copy(), self.v[k].copy(), self.t[k]
        return d

    def load_state_dict(self, d, strict=True):
        """Restore moments and step counts (copied, shapes checked). With strict, entries for
        names this optimizer does not own are an error."""
        expected = [f"{s}/{k}" for k in self.names for s in ("m", "v", "t")]
        _check_state(self.kind, d, expected, strict)
        for k in self.names:
            _load_array(self.kind, "m/" + k, d["m/" + k], self.m[k])
            _load_array(self.kind, "v/" + k, d["v/" + k], self.v[k])
            self.t[k] = int(_num(d["t/" + k]))


class AdamW(_MomentState):
    """AdamW with bias-corrected moments and decoupled weight decay, as torch.optim.AdamW.

    For each owned parameter p with gradient g, at its own step count t = 1, 2, ...:

        p = p * (1 - lr * wd)                 decoupled decay, only where decay(name) is true
        m = b1 * m + (1 - b1) * g             first moment (mean of g)
        v = b2 * v + (1 - b2) * g^2           second moment (mean of g^2), elementwise
        p = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    The step count is per parameter, so a parameter that is skipped for a while (the frozen
    embedding of the first 1000 steps: leave it out of grads) starts its bias correction at t = 1
    when it joins, as in torch.

    decay: None for `default_decay` (ndim >= 2), or a callable name -> bool.
    """

    kind = "AdamW"

    def __init__(self, params, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, decay=None):
        self.names = list(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.decays = {k: (default_decay(k, p) if decay is None else bool(decay(k)))
                       for k, p in params.items()}
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
            self.update(params[k], g, self.m[k], self.v[k], lr, self.t[k], self.decays[k])

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


# ----------------------------------------------------------------------------------------------
# NorMuon

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic, tuned to converge fast, not exactly


def newton_schulz5(G, steps=5, eps=1e-7):
    # G (R, C) -> X (R, C), approximately U V^T where G = U S V^T
    """Approximate the orthogonal factor of G (all singular values pushed toward 1).

    With X = G / ||G||_F (so every singular value is <= 1), each iteration applies the odd
    polynomial f(x) = a x + b x^3 + c x^5 to the singular values without an SVD:

        A = X X^T;  B = b A + c A A;  X = a X + B X      (= U f(S) V^T)

    The coefficients make f steep at 0 (slope a = 3.4) and then keep it oscillating around 1
    rather than converging exactly: after five steps every singular value above about 1% of
    ||G||_F lands between 0.68 and 1.2 (smaller ones less far), which is enough for an update
    direction and cheaper than an exact orthogonalisation. When R > C we iterate on X^T so that
    A is the smaller C x C Gram matrix.
    """
    a, b, c = NS_COEFFS
    X = G / (np.linalg.norm(G) + eps)
    transposed = X.shape[0] > X.shape[1]
    if transposed:
        X = X.T
    for _ in range(steps):
        A = X @ X.T                  # (r, r), r = min(R, C)
        B = A @ A                    # (r, r)
        B *= c
        B += b * A                   # B = b A + c A^2
        X = a * X + B @ X            # (r, max(R, C))
    return X.T if transposed else X


class NorMuon(_MomentState):
    """NorMuon: orthogonalised momentum with a per-row second moment, for matrices.

    For each owned weight W (R, C) with gradient g (the peer's recipe, exactly):

        m = mu * m + (1 - mu) * g                    momentum (an EMA of the gradient)
        O = newton_schulz5(m)                        (R, C), ~ U V^T of m: all directions equal
        v = beta2 * v + (1 - beta2) * mean(O^2, 1)   (R,) per-row second moment, no bias correction
        O = O / (sqrt(v) + eps)                      each row (output neuron) to a similar size
        W = W - lr * 0.2 * sqrt(R*C) / ||O||_F * O   update of RMS exactly 0.2 * lr per entry

    Why: the gradient of a weight matrix is typically dominated by a few directions (it is nearly
    low rank); replacing the momentum by its orthogonal factor U V^T (Muon) gives every direction
    the same step size. After that the rows can still differ a lot in size; NorMuon divides each
    row by a running RMS, like Adam does per entry but per neuron. The final rescale fixes the
    overall size: an RMS of 0.2 per entry (what AdamW updates typically have), times lr. So with
    the step lr = 0.02 every entry moves about 0.004, whatever the gradient's scale.

    3-D conv kernels (C_out, C_in/G, K), if given (see split_params(conv_to_normuon=True)), are
    treated as the matrix (C_out, C_in/G * K). The peer gives NorMuon only 2-D matrices.
    weight_decay (default 0, as the peer) is decoupled: W *= 1 - lr * weight_decay.
    """

    kind = "NorMuon"

    def __init__(self, params, lr=0.02, momentum=0.95, beta2=0.999, ns_steps=5, eps=1e-8,
                 weight_decay=0.0):
        for k, p in params.items():
            if p.ndim < 2:
                raise ValueError(f"NorMuon is for matrices; {k} has shape {p.shape} (give it to AdamW)")
        self.names = list(params)
        self.lr, self.momentum, self.beta2 = lr, momentum, beta2
        self.ns_steps, self.eps, self.weight_decay = ns_steps, eps, weight_decay
        self.m = {k: np.zeros_like(p) for k, p in params.items()}
        self.v = {k: np.zeros(p.shape[0], dtype=p.dtype) for k, p in params.items()}
        self.t = {k: 0 for k in self.names}  # not used by the math; kept for inspection

    def step(self, params, grads, lr=None):
        """Update the owned params in place. lr overrides the base lr (for schedules)."""
        lr = float(self.lr if lr is None else lr)
        mu, b2 = self.momentum, self.beta2
        for k in self.names:
            g = grads.get(k)
            if g is None:
                continue
            p, m, v = params[k], self.m[k], self.v[k]
            self.t[k] += 1
            R = p.shape[0]
            # m = mu*m + (1-mu)*g   (the peer's EMA momentum, not Nesterov)
            m *= mu
            m += (1.0 - mu) * g
            # O ~ U V^T of the momentum, as a matrix (R, C) (a view for conv kernels)
            O = newton_schulz5(m.reshape(R, -1), self.ns_steps)
            # v = b2*v + (1-b2) * mean over the row of O^2   (R,)
            v *= b2
            v += (1.0 - b2) * np.mean(O * O, axis=1)
            # each row divided by its running RMS
            O /= (np.sqrt(v) + self.eps)[:, None]
            # rescale so that ||update||_F = 0.2 * sqrt(numel): RMS 0.2 per entry
            scale = 0.2 * math.sqrt(O.size) / (np.linalg.norm(O) + self.eps)
            if self.weight_decay:
                p *= 1.0 - lr * self.weight_decay
            p -= (lr * scale * O).reshape(p.shape).astype(p.dtype, copy=False)


# ----------------------------------------------------------------------------------------------
# learning-rate schedules: each returns a multiplier in [0, 1] for the base learning rate


def _warmup(step, warmup):
    """Linear warmup as the peer: (step+1)/warmup, so step 0 already moves a little."""
    return 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)


def wsd(step, total_steps, warmup, decay_frac=0.1):
    """Warmup-stable-decay over a known number of steps (step counts from 0).

        warmup:  (step+1)/warmup                           steps 0 .. warmup-1
        stable:  1
        decay:   (total_steps - step) / decay_steps        the last decay_steps = decay_frac*total,
                                                           0 at step == total_steps
    """
    decay_steps = max(1, round(decay_frac * total_steps)) if decay_frac > 0 else 0
    d = 1.0
    if decay_steps and step >= total_steps - decay_steps:
        d = max(0.0, (total_steps - step) / decay_steps)
    return _warmup(step, warmup) * d


def wsd_frac(progress, step, warmup, decay_frac=0.1):
    """Warmup-stable-decay for a wall-clock budget, as the peer: progress in [0, 1] is the
    fraction of the budget used; the warmup still counts steps.

        (step+1)/warmup capped at 1   times   1 while progress < 1 - decay_frac,
                                              then (1 - progress) / decay_frac, down to 0
    """
    d = 1.0
    if decay_frac > 0 and progress >= 1.0 - decay_frac:
        d = max(0.0, (1.0 - progress) / decay_frac)
    return _warmup(step, warmup) * d


def cosine(step, total_steps, warmup, min_ratio=0.1):
    """Linear warmup, then a half cosine from 1 (at step == warmup) to min_ratio (at total_steps):

        p = (step - warmup) / (total_steps - warmup) clipped to [0, 1]
        min_ratio + (1 - min_ratio) * (1 + cos(pi p)) / 2
    """
    if step < warmup:
        return _warmup(step, warmup)
    p = min(1.0, max(0.0, (step - warmup) / max(1, total_steps - warmup)))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def cosine_frac(progress, step, warmup, min_ratio=0.1):
    """The cosine schedule on the fraction of the run done (steps, tokens or wall clock), with a
    step-counted warmup: (step+1)/warmup capped at 1, times min_ratio + (1-min_ratio)(1+cos(pi p))/2."""
    p = min(1.0, max(0.0, progress))
    return _warmup(step, warmup) * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p)))


# ----------------------------------------------------------------------------------------------
# gradients: clipping and accumulation


def grad_norm(grads):
    """Global L2 norm sqrt(sum_k sum(g_k^2)) over all gradients (np.dot: no temporary)."""
    total = 0.0
    for g in grads.values():
        if g is not None:
            f = g.reshape(-1)
            total += float(np.dot(f, f))
    return math.sqrt(total)


def clip_grad_norm(grads, max_norm):
    """Scale all gradients in place by max_norm / (norm + 1e-6) when the global norm exceeds
    max_norm (as torch.nn.utils.clip_grad_norm_). Returns the norm before clipping.

    A non-finite norm (a NaN or inf gradient somewhere) is returned as it is and nothing is
    scaled: the caller decides (train.py stops the run).
    """
    norm = grad_norm(grads)
    if math.isfinite(norm) and norm > max_norm:
        s = max_norm / (norm + 1e-6)
        for g in grads.values():
            if g is not None:
                g *= s
    return norm


def accumulate(acc, grads, scale=1.0):
    """acc[k] += scale * grads[k] in place (acc[k] is created on first sight). Returns acc.

    Gradient accumulation over n micro-batches: start from acc = {}, call with scale = 1/n for
    each micro-batch, and step with acc: the mean gradient over n * micro-batch examples.
    """
    for k, g in grads.items():
        if g is None:
            continue
        if k not in acc:
            acc[k] = g * scale if scale != 1.0 else g.copy()
        elif scale == 1.0:
            acc[k] += g
        else:
            acc[k] += scale * g
    return acc


# ----------------------------------------------------------------------------------------------
# EMA of the weights


class EMA:
    """Exponential moving average of the weights, used for evaluation:

        ema = decay * ema + (1 - decay) * p          after every optimizer step

    decay = 0.999 averages over roughly the last 1 / (1 - decay) = 1000 steps. The average starts
    at the initial weights, whose share after n updates is decay^n (0.999^4000 = 1.8%);
    warmup=True uses min(decay, (1 + n) / (10 + n)) at update n instead, so early averages
    forget the initialisation faster (off by default).

    Use the averaged weights with `with ema.swapped(model.params): val = evaluate()`, which
    copies them into the live arrays and restores the trained ones afterwards.
    """

    kind = "EMA"

    def __init__(self, params, decay=0.999, warmup=False):
        self.decay, self.warmup = decay, warmup
        self.shadow = {k: p.copy() for k, p in params.items()}
        self.num_updates = 0

    def current_decay(self):
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    def update(self, params):
        d = self.current_decay()
        self.num_updates += 1
        for k, s in self.shadow.items():
            self.update_one(s, params[k], d)

    def update_one(self, s, p, d):
        """ema = d*ema + (1-d)*p, written as ema -= (1-d)*(ema - p), in place."""
        s -= (1.0 - d) * (s - p)

    def copy_to(self, params):
        """Overwrite params (in place) with the averaged weights."""
        for k, s in self.shadow.items():
            np.copyto(params[k], s)

    @contextmanager
    def swapped(self, params):
        """Within the block params hold the averaged weights; the trained ones come back after."""
        backup = {k: params[k].copy() for k in self.shadow}
        self.copy_to(params)
        try:
            yield params
        finally:
            for k, b in backup.items():
                np.copyto(params[k], b)

    def state_dict(self):
        """{"kind": "EMA", "decay": float, "num_updates": int, "shadow/<name>": array}."""
        d = {"kind": self.kind, "decay": self.decay, "num_updates": self.num_updates}
        for k, s in self.shadow.items():
            d["shadow/" + k] = s.copy()
        return d

    def load_state_dict(self, d, strict=True):
        """Restore the averaged weights and the update count (shapes checked)."""
        expected = ["shadow/" + k for k in self.shadow]
        _check_state(self.kind, d, expected, strict, scalars=("decay", "num_updates"))
        for k, s in self.shadow.items():
            _load_array(self.kind, "shadow/" + k, d["shadow/" + k], s)
        self.num_updates = int(_num(d.get("num_updates", 0)))
