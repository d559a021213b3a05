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

Read `Model.forward` and `Model.backward`: embedding, body, head, and the same three reversed. The
body (`body_forward`: the block n times and the final norm) and the block are plain functions of
the parameters, so that generation (generate.py) runs the very same code one position at a time.
Everything runs in one thread, straight through: this is the model as it is written on paper.
nanoternary/fast/ runs the same functions on several cores with a fused head, and
tests/test_fast.py proves it equal to this file.

Parameters and gradients are flat dicts with the same keys, e.g. "block.mix.conv0.gate.w" (see
`param_shapes`). Gradients are returned, never stored on the model.

    model = Model(ModelConfig(), seed=0)              # float32; dtype=np.float64 for grad checks
    loss, grads = model.loss_and_grads(idx, targets)  # idx, targets (B, T) ints
    model = Model.load("out")                         # a checkpoint (checkpoint.py reads the file)
"""
import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .classmap import ClassMap
from .config import check, setting
from .ops.conv import conv1d_backward, conv1d_forward
from .ops.embedding import embedding_backward, embedding_forward
from .ops.gates import relu2_glu_backward, relu2_glu_forward, sigmoid_gate_backward, sigmoid_gate_forward
from .ops.head import log_softmax, nll, softmax_ce_backward, softmax_ce_forward
from .ops.hier_head import hier_ce_backward, hier_ce_forward, hier_log_probs, hier_nll
from .ops.norm import rmsnorm_backward, rmsnorm_forward
from .ops.ternary import ternary_linear_backward, ternary_linear_forward, ternary_quantize, ternary_ste_backward


@dataclass
class ModelConfig:
    """The architecture. Defaults are the reference, FlashLM v3 (13.6M parameters)."""
    vocab_size: int = setting(50257, "V: GPT-2's tokenizer; <|endoftext|> = 50256", range="[2, 65536]",
                              cli=False, group="model")
    d_model: int = setting(256, "C: width of the residual stream and of the tied embedding", range="[1, inf)")
    glu_hidden: int = setting(683, "H: TernaryGLU inner width (256 * 8/3)", range="[1, inf)")
    n_recursions: int = setting(2, "applications of the one weight-shared block", range="[1, inf)")
    dilations: tuple = setting((1, 4, 64), "one ConvMixer layer per dilation, comma-separated", range="[1, inf)")
    kernel_size: int = setting(4, "K: taps per causal conv", range="[1, inf)")
    conv_groups: int = setting(16, "G: groups of the convs, d_model/G channels each", range="[1, inf)")
    ternary: bool = setting(True, "the core's four matrices ternary {-1,0,+1} (default); --no-ternary: plain "
                            "float weights, all else the same, to measure what ternary costs")
    ternary_scale: bool = setting(False, "BitNet b1.58's per-tensor scale mean|W| on the ternary outputs")
    head: str = setting("full", "output head: the full 50,257-way softmax, or the hierarchical one",
                        choices=("full", "hier"))
    hier_classes: int = setting(0, "hier head: number of classes; 0 -> round(sqrt(vocab_size))", range="[0, inf)")

    def __post_init__(self):
        self.dilations = tuple(int(d) for d in self.dilations)
        check(self)
        if self.d_model % self.conv_groups:
            raise ValueError(f"--d-model {self.d_model} must be divisible by --conv-groups {self.conv_groups}")
        if self.hier_classes > self.vocab_size:
            raise ValueError(f"--hier-classes must be at most the vocabulary size {self.vocab_size}")

    @property
    def receptive_field(self):
        """Tokens of context one output can see: 1 + n_recursions * sum((K-1) * D)."""
        return 1 + self.n_recursions * sum((self.kernel_size - 1) * d for d in self.dilations)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        d = {k: v for k, v in d.items() if k != "head_chunk"}     # a speed setting of older versions
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
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
    shapes.update({"block.mix.out.w": (C, C), "block.norm_glu.g": (C,), "block.glu.gate.w": (H, C),
                   "block.glu.up.w": (H, C), "block.glu.down.w": (C, H), "norm_f.g": (C,)})
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


def quantize(params, cfg):
    """name -> (W_t, s) for the four ternary matrices: quantized once per forward, used by every
    application of the block. ternary=False keeps the float weights (W, 1)."""
    return {name: ternary_quantize(params[name], cfg.ternary_scale) if cfg.ternary else (params[name], 1.0)
            for name in TERNARY}


# ---------------------------------------------------------------------------------- the body
# p: the parameters, q: their quantized ternary matrices (quantize), cfg: the ModelConfig.
# Backward functions add their weight gradients into `grads`: the block is applied n_recursions
# times with the same weights, so each application's gradients are summed there.


def body_forward(x, p, q, cfg, convs=None):
    # x (B,T,C) -> h (B*T, C), cache: the block n_recursions times, then the final RMSNorm
    """`convs`: for each application of the block, the conv functions of its ConvMixer layers
    (mixer_forward); None: conv1d_forward everywhere. generate.py passes ring-buffered ones."""
    caches = []
    for r in range(cfg.n_recursions):                                    # the SAME weights each time
        x, c = block_forward(x, p, q, cfg, convs[r] if convs else None)
        caches.append(c)
    h, c_norm = rmsnorm_forward(x, p["norm_f.g"])
    return h.reshape(-1, cfg.d_model), (caches, c_norm)


def body_backward(dh, cache, p, cfg):
    # dh (B*T, C) -> dx (B,T,C), grads of the body's parameters (block.*, norm_f.g): body_forward reversed
    caches, c_norm = cache
    grads = {k: np.zeros_like(v) for k, v in p.items() if k.startswith("block.")}
    dx, grads["norm_f.g"] = rmsnorm_backward(dh.reshape(c_norm[0].shape), c_norm)
    for c in reversed(caches):
        dx = block_backward(dx, c, cfg, grads)                           # gradients summed in grads
    return dx, grads


def block_forward(x, p, q, cfg, convs=None):
    # x (B,T,C) -> x (B,T,C), cache: one application of the weight-shared block
    """x = x + ConvMixer(RMSNorm(x)); x = x + TernaryGLU(RMSNorm(x))."""
    h, c_norm_mix = rmsnorm_forward(x, p["block.norm_mix.g"])
    m, c_mix = mixer_forward(h, p, q, cfg, convs)
    x = x + m                                                            # residual
    u, c_norm_glu = rmsnorm_forward(x, p["block.norm_glu.g"])
    d, c_glu = glu_forward(u, q)
    x = x + d                                                            # residual
    return x, (c_norm_mix, c_mix, c_norm_glu, c_glu)


def block_backward(dx, cache, cfg, grads):
    # dx (B,T,C) -> dx (B,T,C): block_forward reversed
    c_norm_mix, c_mix, c_norm_glu, c_glu = cache
    du = glu_backward(dx, c_glu, grads)                                  # x = x + d, d = glu(u)
    dxn, dg = rmsnorm_backward(du, c_norm_glu)
    grads["block.norm_glu.g"] += dg
    dx = dx + dxn                                                        # x reached the output twice
    dh = mixer_backward(dx, c_mix, cfg, grads)                           # x = x + m, m = mixer(h)
    dxn, dg = rmsnorm_backward(dh, c_norm_mix)
    grads["block.norm_mix.g"] += dg
    return dx + dxn


def mixer_forward(h, p, q, cfg, convs=None):
    # h (B,T,C) -> m (B,T,C), cache: the ConvMixer
    """For each dilation D: u = RMSNorm(h); h = h + sigmoid(conv_gate(u)) * conv_value(u).
    Then m = ternary_out(h). `convs`: one conv function per layer, with conv1d_forward's signature
    (default conv1d_forward for all): generate.py passes ones that read a ring buffer."""
    B, T, C = h.shape
    convs = convs or [conv1d_forward] * len(cfg.dilations)
    G = cfg.conv_groups
    caches = []
    for i, D in enumerate(cfg.dilations):
        u, c_norm = rmsnorm_forward(h, p[f"block.mix.norm{i}.g"])
        a, c_gate = convs[i](u, p[f"block.mix.conv{i}.gate.w"], D, G)
        v, c_value = convs[i](u, p[f"block.mix.conv{i}.value.w"], D, G)
        z, c_sig = sigmoid_gate_forward(a, v)
        h = h + z                                    # residual
        caches.append((c_norm, c_gate, c_value, c_sig))
    m, c_out = ternary_linear_forward(h.reshape(B * T, C), *q["block.mix.out.w"])
    return m.reshape(B, T, C), (caches, c_out)


def mixer_backward(dm, cache, cfg, grads):
    # dm (B,T,C) -> dh (B,T,C): mixer_forward reversed
    caches, c_out = cache
    B, T, C = dm.shape
    dh, dwt = ternary_linear_backward(dm.reshape(B * T, C), c_out)
    grads["block.mix.out.w"] += ternary_ste_backward(dwt)
    dh = dh.reshape(B, T, C)
    for i in reversed(range(len(caches))):
        c_norm, c_gate, c_value, c_sig = caches[i]
        da, dv = sigmoid_gate_backward(dh, c_sig)    # h = h + z: dz = dh, and dh flows on
        du, dw = conv1d_backward(dv, c_value)
        grads[f"block.mix.conv{i}.value.w"] += dw
        du2, dw = conv1d_backward(da, c_gate)
        grads[f"block.mix.conv{i}.gate.w"] += dw
        du += du2                                    # u fed both convs
        dhn, dg = rmsnorm_backward(du, c_norm)
        grads[f"block.mix.norm{i}.g"] += dg
        dh = dh + dhn
    return dh


def glu_forward(u, q):
    # u (B,T,C) -> d (B,T,C), cache: the TernaryGLU, down(relu(gate(u))^2 * up(u))
    B, T, C = u.shape
    u = u.reshape(B * T, C)
    a, c_gate = ternary_linear_forward(u, *q["block.glu.gate.w"])       # (N, H)
    b, c_up = ternary_linear_forward(u, *q["block.glu.up.w"])           # (N, H)
    z, c_act = relu2_glu_forward(a, b)
    d, c_down = ternary_linear_forward(z, *q["block.glu.down.w"])       # (N, C)
    return d.reshape(B, T, C), (c_gate, c_up, c_act, c_down)


def glu_backward(dd, cache, grads):
    # dd (B,T,C) -> du (B,T,C): glu_forward reversed
    c_gate, c_up, c_act, c_down = cache
    B, T, C = dd.shape
    dz, dwt = ternary_linear_backward(dd.reshape(B * T, C), c_down)
    grads["block.glu.down.w"] += ternary_ste_backward(dwt)
    da, db = relu2_glu_backward(dz, c_act)
    du, dwt = ternary_linear_backward(db, c_up)
    grads["block.glu.up.w"] += ternary_ste_backward(dwt)
    du2, dwt = ternary_linear_backward(da, c_gate)
    grads["block.glu.gate.w"] += ternary_ste_backward(dwt)
    du += du2                                                            # u fed both gate and up
    return du.reshape(B, T, C)


# ---------------------------------------------------------------------------------- the model


class Model:
    """Parameters in `self.params` (name -> array), the config in `self.cfg`, and for the hier head
    its class map in `self.hier`. The model's own generator `self.rng` draws the initial weights
    and, unless a generator is passed, the positions counted by loss_frac. `Model.load(path)` (a
    checkpoint written by train.py) is checkpoint.load_model: the file format is checkpoint.py's."""

    def __init__(self, cfg=None, seed=0, dtype=np.float32, class_map=None):
        self.cfg = cfg if cfg is not None else ModelConfig()
        self.dtype = np.dtype(dtype)
        self.rng = np.random.default_rng(seed)
        self.params = init_params(self.cfg, self.rng, self.dtype)
        self.hier = None
        if self.cfg.head == "hier":
            self.hier = class_map if class_map is not None else ClassMap.default(
                self.cfg.vocab_size, n_hier_classes(self.cfg))

    # ------------------------------------------------------------------ forward and backward

    def forward(self, idx, targets, rows=None, label_smoothing=0.0, z_loss=0.0):
        # idx, targets (B,T) int, rows (n,) distinct positions in [0, B*T) or None -> loss, cache
        """The mean loss over the counted positions (all of them when rows is None)."""
        p = self.params
        x, c_embed = embedding_forward(self.check_ids(idx), p["embed.w"])    # (B,T,C)
        h, c_body = body_forward(x, p, quantize(p, self.cfg), self.cfg)     # (B*T, C)
        y = np.asarray(targets).reshape(-1)
        if rows is not None:                                              # only these positions count
            h, y = h[rows], y[rows]
        loss, c_head = self.head_forward(h, y, label_smoothing, z_loss)
        return loss, (c_embed, c_body, c_head, rows)

    def backward(self, cache):
        # -> grads: name -> gradient of the loss, for every parameter
        c_embed, c_body, c_head, rows = cache
        dh, grads_head = self.head_backward(c_head)
        if rows is not None:                                              # uncounted rows get zero
            dh_rows, dh = dh, np.zeros((c_embed[0].size, dh.shape[1]), dh.dtype)
            dh[rows] = dh_rows                                            # rows are distinct
        dx, grads = body_backward(dh, c_body, self.params, self.cfg)
        dE_lookup = embedding_backward(dx, c_embed)
        grads["embed.w"] = grads_head.pop("embed.w") + dE_lookup          # tied: head + lookup
        grads.update(grads_head)
        return grads

    def head_forward(self, h, y, label_smoothing=0.0, z_loss=0.0):
        # h (n,C), y (n,) -> loss (mean over the n rows), cache
        E = self.params["embed.w"]
        if self.cfg.head == "full":
            return softmax_ce_forward(h, E, y, label_smoothing, z_loss)
        return hier_ce_forward(h, E, self.params["head.class_w"], self.hier, y, label_smoothing, z_loss)

    def head_backward(self, cache):
        # -> dh (n,C), {"embed.w": the head's dE, "head.class_w": dWc for the hier head}
        if self.cfg.head == "full":
            dh, dE = softmax_ce_backward(1.0, cache)
            return dh, {"embed.w": dE}
        dh, dE, dWc = hier_ce_backward(1.0, cache)
        return dh, {"embed.w": dE, "head.class_w": dWc}

    # ------------------------------------------------------------------ the interface

    def loss_and_grads(self, idx, targets, *, label_smoothing=0.0, z_loss=0.0, loss_frac=1.0, rng=None,
                       train_embed=True):
        """Mean cross-entropy over the counted positions and its gradient for every parameter.

        Defaults differentiate exactly `loss()`. Training-only options (the reference's recipe):
        label_smoothing, z_loss, and loss_frac < 1 (a random fraction of positions, drawn from
        `rng`, default the model's own generator). train_embed=False: no "embed.w" in grads (the
        frozen phase; nanoternary/fast/ then also skips computing it).
        """
        idx, targets = np.asarray(idx), np.asarray(targets)
        rows = self.counted_rows(targets.size, loss_frac, rng)
        loss, cache = self.forward(idx, targets, rows, label_smoothing, z_loss)
        grads = self.backward(cache)
        if not train_embed:
            del grads["embed.w"]
        return float(loss), grads

    def counted_rows(self, n, loss_frac, rng=None):
        """None (every position), or a sorted random loss_frac of range(n) drawn from rng."""
        if loss_frac >= 1.0:
            return None
        rng = rng if rng is not None else self.rng
        return np.sort(rng.choice(n, size=max(1, int(round(n * loss_frac))), replace=False))

    def hidden(self, idx):
        # idx (B,T) int -> h (B*T, C): what the head sees (embedding and body, no caches kept)
        p = self.params
        return body_forward(embedding_forward(self.check_ids(idx), p["embed.w"])[0], p, quantize(p, self.cfg),
                            self.cfg)[0]

    def nll(self, idx, targets):
        # idx, targets (B,T) -> (B,T) float64: -log p(target) at every position
        targets = np.asarray(targets)
        h, E = self.hidden(idx), self.params["embed.w"]
        if self.cfg.head == "full":
            out = nll(h, E, targets.reshape(-1))
        else:
            out = hier_nll(h, E, self.params["head.class_w"], self.hier, targets.reshape(-1))
        return out.reshape(targets.shape)

    def loss(self, idx, targets):
        """Mean negative log-likelihood in nats per token: no smoothing, every position."""
        return float(self.nll(idx, targets).mean())

    def log_probs(self, idx):
        # idx (B,T) -> (B,T,V) log-probabilities of the next token (all B*T*V of them)
        B, T = np.shape(idx)
        h, E = self.hidden(idx), self.params["embed.w"]
        if self.cfg.head == "full":
            return log_softmax(h @ E.T).reshape(B, T, -1)
        return hier_log_probs(h, E, self.params["head.class_w"], self.hier).reshape(B, T, -1)

    def check_ids(self, idx):
        idx = np.asarray(idx)
        if idx.ndim != 2:
            raise ValueError(f"idx must be (B, T) token ids, got shape {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.cfg.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}), got [{idx.min()}, {idx.max()}]")
        return idx

    def param_counts(self):
        """Parameters per component, in the order of the architecture diagram."""
        groups = {"embedding (tied)": 0, "convmixer": 0, "glu": 0, "norms": 0, "head": 0}
        for name, w in self.params.items():
            key = ("embedding (tied)" if name == "embed.w" else "head" if name.startswith("head")
                   else "norms" if name.endswith(".g") else "convmixer" if ".mix." in name else "glu")
            groups[key] += w.size
        groups = {k: v for k, v in groups.items() if v}
        groups["total"] = sum(groups.values())
        return groups

    def summary(self):
        return "\n".join(f"{k:>18}: {v:>12,}" for k, v in self.param_counts().items())
