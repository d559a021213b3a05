"""The nanoternary language model: FlashLM v3's architecture, forward and backward by hand.

    x = E[idx]                                        embedding (V, C), tied with the output head
    repeat n_recursions (2) times, with the SAME weights:
        h = RMSNorm(x)                                ConvMixer
        for each dilation D in (1, 4, 64):
            u = RMSNorm(h)
            h = h + sigmoid(conv_gate_D(u)) * conv_value_D(u)     causal, kernel 4, 16 groups
        x = x + ternary_out(h)                        256 -> 256
        u = RMSNorm(x)                                TernaryGLU
        x = x + ternary_down(relu(ternary_gate(u))^2 * ternary_up(u))     256 -> 683 -> 256
    h = RMSNorm(x)
    loss = cross-entropy(h @ E^T, targets)            full 50,257-way softmax (or the hier head)

`Model.forward_hidden` is that list of op calls up to the final RMSNorm (`_block_forward` one
application of the block); `Model._backward_hidden` and `_block_backward` are the same lists reversed,
line for line. `loss_and_grads` puts them together with the head and the embedding's backward, and
spreads the work over the cores. Parameters and their gradients are flat dicts with the same keys,
e.g. "block.mix.conv0.gate.w"; see `param_shapes` for all of them. Usage (see ../shared/DESIGN.md):

    model = Model(ModelConfig(), seed=0)              # float32; dtype=np.float64 for grad checks
    loss, grads = model.loss_and_grads(idx, targets)  # idx, targets (B, T) ints
"""
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from .ops.conv import conv1d_backward, conv1d_forward
from .ops.embedding import embedding_backward, embedding_forward
from .ops.gates import (relu2_glu_backward, relu2_glu_forward, sigmoid_gate_backward,
                        sigmoid_gate_forward)
from .ops.head import log_softmax, max_row_norm, softmax_ce_forward, softmax_ce_fused
from .ops.norm import rmsnorm_backward, rmsnorm_forward
from .ops.ternary import (ternary_linear_backward, ternary_linear_forward, ternary_quantize,
                          ternary_ste_backward)
from .parallel import add_into, default_workers, run_shards
from .profile import section


@dataclass
class ModelConfig:
    """The architecture. Defaults are the reference, FlashLM v3 (13.6M parameters)."""
    vocab_size: int = 50257         # GPT-2's tokenizer; <|endoftext|> = 50256
    d_model: int = 256              # C: width of the residual stream and of the tied embedding
    glu_hidden: int = 683           # H: TernaryGLU inner width (256 * 8/3)
    n_recursions: int = 2           # the one weight-shared block is applied this many times
    dilations: tuple = (1, 4, 64)   # one ConvMixer layer per dilation
    kernel_size: int = 4            # K: taps per causal conv
    conv_groups: int = 16           # G: grouped convs, C/G channels per group
    ternary: bool = True            # False: plain float weights (for finite-difference checks)
    ternary_scale: bool = False     # True: BitNet b1.58's per-tensor scale mean(|W|) on the output
    head: str = "full"              # "full" 50,257-way softmax, or "hier" two-level class softmax
    hier_classes: int = 0           # hier head: number of classes; 0 -> round(sqrt(vocab_size))
    head_chunk: int = 1024          # rows of logits computed at a time (memory: chunk x V floats)

    def __post_init__(self):
        self.dilations = tuple(int(d) for d in self.dilations)
        if self.head not in ("full", "hier"):
            raise ValueError(f"head must be 'full' or 'hier', not {self.head!r}")
        if self.d_model % self.conv_groups:
            raise ValueError(f"d_model={self.d_model} must be divisible by conv_groups={self.conv_groups}")

    @property
    def receptive_field(self):
        """Tokens of context one output can see: 1 + n_recursions * sum((K-1) * D)."""
        return 1 + self.n_recursions * sum((self.kernel_size - 1) * d for d in self.dilations)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config fields {sorted(unknown)}")
        return cls(**d)


TERNARY = ("block.mix.out.w", "block.glu.gate.w", "block.glu.up.w", "block.glu.down.w")


def param_shapes(cfg):
    """name -> shape of every trainable tensor (the latent, float weights)."""
    C, H, K, G = cfg.d_model, cfg.glu_hidden, cfg.kernel_size, cfg.conv_groups
    shapes = {"embed.w": (cfg.vocab_size, C), "block.norm_mix.g": (C,)}
    for i in range(len(cfg.dilations)):
        shapes[f"block.mix.norm{i}.g"] = (C,)
        shapes[f"block.mix.conv{i}.gate.w"] = (C, C // G, K)
        shapes[f"block.mix.conv{i}.value.w"] = (C, C // G, K)
    shapes.update({
        "block.mix.out.w": (C, C),
        "block.norm_glu.g": (C,),
        "block.glu.gate.w": (H, C),
        "block.glu.up.w": (H, C),
        "block.glu.down.w": (C, H),
        "norm_f.g": (C,),
    })
    if cfg.head == "hier":
        shapes["head.class_w"] = (n_hier_classes(cfg), C)
    return shapes


def n_hier_classes(cfg):
    return cfg.hier_classes or int(round(math.sqrt(cfg.vocab_size)))


def init_params(cfg, rng, dtype=np.float32):
    """Initialisation as in the PyTorch peer: embedding N(0, 0.02); conv weights U(+-1/sqrt(fan_in))
    (PyTorch's Conv1d default); ternary latents N(0, 1/fan_in), the two that write into the residual
    stream (mix.out, glu.down) N(0, 0.01^2); norm gains 1; hier class vectors N(0, 0.02)."""
    p = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith(".g"):
            w = np.ones(shape)
        elif name in ("embed.w", "head.class_w"):
            w = rng.normal(0.0, 0.02, shape)
        elif ".conv" in name:
            bound = 1.0 / math.sqrt(shape[1] * shape[2])
            w = rng.uniform(-bound, bound, shape)
        elif name in ("block.mix.out.w", "block.glu.down.w"):
            w = rng.normal(0.0, 0.01, shape)
        else:
            w = rng.normal(0.0, 1.0 / math.sqrt(shape[1]), shape)
        p[name] = w.astype(dtype)
    return p


class Model:
    """Parameters in `self.params` (name -> array). The methods compute from them and never store
    gradients; the model's own generator `self.rng` draws the initial weights and, unless a
    generator is passed, the positions counted by loss_frac."""

    def __init__(self, cfg=None, seed=0, dtype=np.float32, class_map=None):
        self.cfg = cfg if cfg is not None else ModelConfig()
        self.dtype = np.dtype(dtype)
        self.rng = np.random.default_rng(seed)
        self.params = init_params(self.cfg, self.rng, self.dtype)
        self.workers = default_workers()     # batch shards run in parallel (parallel.py)
        self.hier = None
        if self.cfg.head == "hier":
            from .ops.hier_head import ClassMap
            self.hier = class_map if class_map is not None else ClassMap.default(
                self.cfg.vocab_size, n_hier_classes(self.cfg))

    # ------------------------------------------------------------------ the forward, op by op

    def _quantized(self):
        """Ternary weights, quantized once per forward (of each shard) and shared by both recursions."""
        q = {}
        for name in TERNARY:
            w = self.params[name]
            q[name] = ternary_quantize(w, self.cfg.ternary_scale) if self.cfg.ternary else (w, 1.0)
        return q

    def _block_forward(self, x, q):
        # x (B,T,C) -> x (B,T,C): one application of the weight-shared block
        p, cfg = self.params, self.cfg
        B, T, C = x.shape
        G = cfg.conv_groups
        cache = {}
        with section("convmixer"):
            h, cache["norm_mix"] = rmsnorm_forward(x, p["block.norm_mix.g"])
            for i, D in enumerate(cfg.dilations):
                u, cache[f"norm{i}"] = rmsnorm_forward(h, p[f"block.mix.norm{i}.g"])
                a, cache[f"conv{i}.gate"] = conv1d_forward(u, p[f"block.mix.conv{i}.gate.w"], D, G)
                v, cache[f"conv{i}.value"] = conv1d_forward(u, p[f"block.mix.conv{i}.value.w"], D, G)
                z, cache[f"gate{i}"] = sigmoid_gate_forward(a, v)
                h += z                        # residual (in place: no cache holds this h)
            m, cache["out"] = ternary_linear_forward(h.reshape(B * T, C), *q["block.mix.out.w"])
            x = x + m.reshape(B, T, C)                                          # residual
        with section("glu"):
            u, cache["norm_glu"] = rmsnorm_forward(x, p["block.norm_glu.g"])
            u = u.reshape(B * T, C)
            a, cache["glu.gate"] = ternary_linear_forward(u, *q["block.glu.gate.w"])
            b, cache["glu.up"] = ternary_linear_forward(u, *q["block.glu.up.w"])
            z, cache["glu"] = relu2_glu_forward(a, b)
            d, cache["glu.down"] = ternary_linear_forward(z, *q["block.glu.down.w"])
            x = x + d.reshape(B, T, C)                                          # residual
        return x, cache

    def forward_hidden(self, idx):
        # idx (B,T) int -> h (B*T, C): the final RMSNorm's output, what the head reads
        idx = np.asarray(idx)
        if idx.ndim != 2:
            raise ValueError(f"idx must be (B, T) token ids, got shape {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.cfg.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}), got "
                             f"[{idx.min()}, {idx.max()}]")
        with section("ternary quantize"):
            q = self._quantized()
        with section("embedding"):
            x, c_embed = embedding_forward(idx, self.params["embed.w"])
        block_caches = []
        for _ in range(self.cfg.n_recursions):
            x, c = self._block_forward(x, q)
            block_caches.append(c)
        h, c_norm_f = rmsnorm_forward(x, self.params["norm_f.g"])
        B, T, C = h.shape
        return h.reshape(B * T, C), (c_embed, block_caches, c_norm_f, q, (B, T, C))

    # ------------------------------------------------------------------ the backward, reversed

    def _block_backward(self, dx, cache, q, grads):
        # dx (B,T,C) -> dx (B,T,C); adds this application's weight gradients into grads
        cfg = self.cfg
        B, T, C = dx.shape
        dtern = {}
        with section("glu"):                          # TernaryGLU, reversed:  x = x + d
            dd = dx.reshape(B * T, C)
            dz, dtern["block.glu.down.w"] = ternary_linear_backward(dd, cache["glu.down"])
            da, db = relu2_glu_backward(dz, cache["glu"])
            du, dtern["block.glu.up.w"] = ternary_linear_backward(db, cache["glu.up"])
            du2, dtern["block.glu.gate.w"] = ternary_linear_backward(da, cache["glu.gate"])
            du = (du + du2).reshape(B, T, C)          # u fed both gate and up
            dxn, dg = rmsnorm_backward(du, cache["norm_glu"])
            grads["block.norm_glu.g"] += dg
            dx = dx + dxn                             # residual: x reaches the output twice
        with section("convmixer"):                    # ConvMixer, reversed:  x = x + out(h)
            dh, dtern["block.mix.out.w"] = ternary_linear_backward(dx.reshape(B * T, C), cache["out"])
            dh = dh.reshape(B, T, C)
            for i in reversed(range(len(cfg.dilations))):
                dz = dh                               # h = h + z: dz = dh, and dh flows on
                da, dv = sigmoid_gate_backward(dz, cache[f"gate{i}"])
                du, dw = conv1d_backward(dv, cache[f"conv{i}.value"])
                grads[f"block.mix.conv{i}.value.w"] += dw
                du2, dw = conv1d_backward(da, cache[f"conv{i}.gate"])
                grads[f"block.mix.conv{i}.gate.w"] += dw
                dhn, dg = rmsnorm_backward(du + du2, cache[f"norm{i}"])
                grads[f"block.mix.norm{i}.g"] += dg
                dh = dh + dhn
            dxn, dg = rmsnorm_backward(dh, cache["norm_mix"])
            grads["block.norm_mix.g"] += dg
            dx = dx + dxn
        for name, dwt in dtern.items():
            grads[name] += ternary_ste_backward(dwt)  # STE: the latent weight gets dW_t
        return dx

    def _backward_hidden(self, dh, cache, grads):
        # dh (B*T, C) -> grads of the core (accumulated in place): the forward_hidden list, reversed.
        # Returns the gradients at the input of each block application; the first is the gradient
        # of the embedding lookup's output, for embedding_backward (done by the caller, which owns dE).
        c_embed, block_caches, c_norm_f, q, (B, T, C) = cache
        dx, grads["norm_f.g"] = rmsnorm_backward(dh.reshape(B, T, C), c_norm_f)
        dxs = []
        for c in reversed(block_caches):             # the same weights: gradients summed
            dx = self._block_backward(dx, c, q, grads)
            dxs.insert(0, dx)
        return dxs

    # ------------------------------------------------------------------ the interface

    def loss_and_grads(self, idx, targets, *, label_smoothing=0.0, z_loss=0.0, loss_frac=1.0,
                       rng=None, train_embed=True):
        """Mean cross-entropy over the counted positions and its gradient for every parameter.

        Defaults differentiate exactly `loss()`. Training-only options (the reference's recipe):
        label_smoothing, z_loss, and loss_frac < 1 (a random fraction of positions, drawn from
        `rng`, default the model's own generator). train_embed=False skips the embedding's gradient
        (the frozen phase) and saves one of the head's three GEMMs; grads then has no "embed.w".

        Three phases, each spread over `self.workers` cores (parallel.py): the forward of each shard
        of the batch; the head over all rows (split by rows for the full head, by classes for the
        hier head); the backward of each shard. The shards' weight gradients add up.
        """
        idx, targets = np.asarray(idx), np.asarray(targets)
        B, T = targets.shape
        rows = None
        if loss_frac < 1.0:
            rng = rng if rng is not None else self.rng
            rows = np.sort(rng.choice(B * T, size=max(1, int(round(B * T * loss_frac))), replace=False))
        shards = self._shards(B)
        # 1. forward, one shard of the batch per core
        fwd = run_shards(lambda b0, b1: self.forward_hidden(idx[b0:b1]), shards)
        h = np.concatenate([h_s for h_s, _ in fwd])                      # (N, C)
        # 2. the head over all N rows: the loss, dh, and the gradients of the head's weights
        loss, dh, head_grads = self._head_loss_and_grads(h, targets.reshape(-1), rows, label_smoothing,
                                                         z_loss, train_embed, [(a * T, b * T) for a, b in shards])

        # 3. backward, one shard per core
        def backward(i, b0, b1):
            grads = {k: np.zeros_like(v) for k, v in self.params.items() if k not in ("embed.w", "head.class_w")}
            dxs = self._backward_hidden(dh[b0 * T:b1 * T], fwd[i][1], grads)
            return grads, dxs[0]
        results = run_shards(backward, [(i, b0, b1) for i, (b0, b1) in enumerate(shards)])
        grads = results[0][0]
        with section("shard sum"):
            for grads_s, _ in results[1:]:             # data parallel: sum the shards
                for k in grads:
                    grads[k] += grads_s[k]
        grads.update(head_grads)
        if train_embed:                                # tied: the head's dE plus the lookup's
            with section("embedding"):
                dx0 = np.concatenate([dx for _, dx in results])
                embedding_backward(dx0, (idx, self.cfg.vocab_size), dE=grads["embed.w"])
        return loss, grads

    def _shards(self, B):
        bounds = np.linspace(0, B, min(self.workers, B) + 1).round().astype(int)
        return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def _head_loss_and_grads(self, h, targets, rows, label_smoothing, z_loss, train_embed, pieces):
        # h (N,C), targets (N,) -> loss, dh (N,C), {"embed.w": dE, "head.class_w": dWc as present}
        E = self.params["embed.w"]
        denom = h.shape[0] if rows is None else rows.size
        if self.cfg.head == "hier":
            from .ops.hier_head import hier_ce_fused
            loss, dh, dE, dWc = hier_ce_fused(h, E, self.params["head.class_w"], self.hier, targets, rows,
                                              label_smoothing, z_loss, need_dE=train_embed,
                                              workers=self.workers)
            return loss, dh, {"head.class_w": dWc, **({"embed.w": dE} if train_embed else {})}

        e_norm = max_row_norm(E) if denom > self.cfg.d_model else None   # for the shift-free softmax

        def piece(a, b):                               # the full head, split by rows
            r = None if rows is None else rows[(rows >= a) & (rows < b)] - a
            return softmax_ce_fused(h[a:b], E, targets[a:b], r, label_smoothing, z_loss,
                                    self.cfg.head_chunk, need_dE=train_embed, denom=denom, e_norm=e_norm)
        parts = run_shards(piece, pieces)
        loss = sum(p[0] for p in parts)
        dh = np.concatenate([p[1] for p in parts])
        if not train_embed:
            return loss, dh, {}
        dE = parts[0][2]
        with section("shard sum"):
            for p in parts[1:]:
                add_into(dE, p[2])
        return loss, dh, {"embed.w": dE}

    def nll(self, idx, targets):
        # idx, targets (B,T) -> (B,T) float64: -log p(target) at every position
        idx, targets = np.asarray(idx), np.asarray(targets)
        parts = run_shards(lambda b0, b1: self._shard_nll(idx[b0:b1], targets[b0:b1]),
                           self._shards(targets.shape[0]))
        return np.concatenate(parts).reshape(targets.shape)

    def _shard_nll(self, idx, targets):
        h, _ = self.forward_hidden(idx)
        if self.cfg.head == "full":
            return softmax_ce_forward(h, self.params["embed.w"], targets.reshape(-1), self.cfg.head_chunk)
        from .ops.hier_head import hier_nll
        return hier_nll(h, self.params["embed.w"], self.params["head.class_w"], self.hier, targets.reshape(-1))

    def loss(self, idx, targets):
        """Mean negative log-likelihood in nats per token: no smoothing, every position."""
        return float(self.nll(idx, targets).mean())

    def log_probs(self, idx):
        # idx (B,T) -> (B,T,V) log-probabilities of the next token (all B*T*V of them)
        h, (_, _, _, _, (B, T, C)) = self.forward_hidden(idx)
        if self.cfg.head == "full":
            lp = log_softmax(h, self.params["embed.w"])
        else:
            from .ops.hier_head import hier_log_probs
            lp = hier_log_probs(h, self.params["embed.w"], self.params["head.class_w"], self.hier)
        return lp.reshape(B, T, -1)

    # ------------------------------------------------------------------ sizes

    def param_counts(self):
        """Parameters per component, in the order of the architecture diagram."""
        groups = {"embedding (tied)": 0, "convmixer": 0, "glu": 0, "norms": 0, "hier head": 0}
        for name, w in self.params.items():
            key = ("embedding (tied)" if name == "embed.w" else "hier head" if name.startswith("head")
                   else "norms" if name.endswith(".g") else "convmixer" if ".mix." in name else "glu")
            groups[key] += w.size
        groups = {k: v for k, v in groups.items() if v}
        groups["total"] = sum(groups.values())
        return groups

    def summary(self):
        lines = [f"{k:>18}: {v:>12,}" for k, v in self.param_counts().items()]
        return "\n".join(lines)

    # ------------------------------------------------------------------ checkpoints

    @classmethod
    def load(cls, path, dtype=None):
        """Rebuild a model from a checkpoint written by train.py (the file, or its run folder)."""
        from .checkpoint import load_model
        return load_model(path, dtype=dtype)
