"""The PyTorch peer: the same model (FlashLM v3) written a second time, in PyTorch.

What it is for. A second, independent implementation to measure against and to check our
gradients with, as llm.c keeps its PyTorch reference (train_gpt2.py) next to the C code:
  - tests/test_peer.py loads the same weights into both and compares the loss and every gradient
    in float64 (autograd here, the hand-written backward in nanoternary/model.py);
  - `bench` prints the training tokens/s a user would get from the usual framework on the same CPU;
  - nanoternary/tools/torch_train_peer.py trains it with the reference's recipe on our data.
Nothing in the nanoternary package imports this file (torch is not a dependency of the package);
it is not part of the reading path. Needs torch (`pip install -e ".[peer]"`, see setup.cfg).

    python -m nanoternary.tools.torch_peer bench --B 8 --T 256                             # full head
    python -m nanoternary.tools.torch_peer bench --B 8 --T 256 --frac 0.004 --freeze-emb   # ~core only

    from nanoternary.model import Model, ModelConfig
    from nanoternary.tools.torch_peer import TorchFlashLM, load_params, grads_dict
    peer = TorchFlashLM(cfg).double()
    load_params(peer, model.params)                  # nanoternary's flat dict -> torch parameters
    peer.loss(idx, targets).backward()
    grads = grads_dict(peer)                         # gradients under nanoternary's keys

The architecture (nanoternary/model.py has the same diagram):

    x = E[idx]                                       tied embedding E (V, C)
    n_recursions times, the SAME block:
        x = x + ConvMixer(RMSNorm(x))
        x = x + TernaryGLU(RMSNorm(x))
    logits = RMSNorm(x) @ E^T;  loss = cross-entropy

The torch parameters are named exactly like nanoternary's flat dict ("embed.w",
"block.mix.conv0.gate.w", ...; see nanoternary.model.param_shapes), so the mapping between the two
is the identity on names; load_params / params_from / grads_dict check names and shapes.
"""
import argparse
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoternary.model import ModelConfig

EPS = 1e-6  # RMSNorm's eps, as nanoternary/ops/norm.py and the reference


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g."""

    def __init__(self, d, eps=EPS):
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.g


class TernaryLinear(nn.Module):
    """y = x @ W_t^T with W_t the absmean-threshold ternary quantization of the latent W:
    a = mean|W|, W_t = +1 where W > a, -1 where W < -a, else 0; the straight-through estimator
    W + (W_t - W).detach() passes W_t's gradient to W unchanged. scale: the output times a
    (BitNet b1.58's per-tensor scale), with a a constant in the backward, as nanoternary's
    ternary_quantize: W gets a * dy^T x. (BitNet's own code puts the STE around the scaled matrix,
    w + (a W_t - w).detach(), which gives W dy^T x without the factor a.)
    ternary=False: a plain float linear (nanoternary's ModelConfig(ternary=False))."""

    def __init__(self, i, o, std, ternary=True, scale=False):
        super().__init__()
        self.ternary, self.scale = ternary, scale
        self.w = nn.Parameter(torch.empty(o, i).normal_(0.0, std))

    def forward(self, x):
        w = self.w
        if self.ternary:
            a = w.abs().mean()
            t = (w > a).to(w.dtype) - (w < -a).to(w.dtype)
            y = F.linear(x, w + (t - w).detach())    # straight-through estimator
            return y * a.detach() if self.scale else y
        return F.linear(x, w)


class CausalConv(nn.Module):
    """Causal dilated grouped Conv1d without bias on (B, T, C): left-padded by (K-1)*D, so step t
    sees steps t, t-D, ..., t-(K-1)D. Weight (C, C/G, K) as nn.Conv1d, initialised as its default,
    U(+-1/sqrt(fan_in))."""

    def __init__(self, d, k, dilation, groups):
        super().__init__()
        self.pad, self.dilation, self.groups = (k - 1) * dilation, dilation, groups
        bound = 1.0 / (d // groups * k) ** 0.5
        self.w = nn.Parameter(torch.empty(d, d // groups, k).uniform_(-bound, bound))

    def forward(self, x):
        y = F.conv1d(F.pad(x.transpose(1, 2), (self.pad, 0)), self.w,
                     dilation=self.dilation, groups=self.groups)
        return y.transpose(1, 2)


class GatedConv(nn.Module):
    """One ConvMixer layer's two convolutions: gate and value."""

    def __init__(self, d, k, dilation, groups):
        super().__init__()
        self.gate = CausalConv(d, k, dilation, groups)
        self.value = CausalConv(d, k, dilation, groups)


class ConvMixer(nn.Module):
    """forward(h), h = RMSNorm(x) already (the block applies block.norm_mix):

        for each dilation i:  u = RMSNorm_i(h);  h = h + sigmoid(conv_gate_i(u)) * conv_value_i(u)
        return out(h)                                 (the block adds it to x)

    This is the same function as nanoternary's _block_forward, which writes h = RMSNorm(x) inside
    the mixer's section and then x = x + out(h); and the same as the reference peer's
    ConvMixer.forward(x), whose x is this h (the already normed input, its inner residual stream).
    In all three the inner residual starts from the NORMED input, not from the block's x.
    Submodules are named norm{i} and conv{i}.gate / conv{i}.value as nanoternary's keys."""

    def __init__(self, cfg):
        super().__init__()
        d, t = cfg.d_model, cfg.ternary
        self.n = len(cfg.dilations)
        for i, D in enumerate(cfg.dilations):
            self.add_module(f"norm{i}", RMSNorm(d))
            self.add_module(f"conv{i}", GatedConv(d, cfg.kernel_size, D, cfg.conv_groups))
        self.out = TernaryLinear(d, d, 0.01, t, cfg.ternary_scale)

    def forward(self, h):
        for i in range(self.n):
            norm, conv = getattr(self, f"norm{i}"), getattr(self, f"conv{i}")
            u = norm(h)
            h = h + torch.sigmoid(conv.gate(u)) * conv.value(u)
        return self.out(h)


class TernaryGLU(nn.Module):
    """down(relu(gate(u))^2 * up(u)), all three ternary."""

    def __init__(self, cfg):
        super().__init__()
        C, H, t, s = cfg.d_model, cfg.glu_hidden, cfg.ternary, cfg.ternary_scale
        self.gate = TernaryLinear(C, H, C ** -0.5, t, s)     # kaiming normal, 'linear': N(0, 1/fan_in)
        self.up = TernaryLinear(C, H, C ** -0.5, t, s)
        self.down = TernaryLinear(H, C, 0.01, t, s)          # writes into the residual stream: small

    def forward(self, u):
        return self.down(F.relu(self.gate(u)).square() * self.up(u))


class Block(nn.Module):
    """The one weight-shared block."""

    def __init__(self, cfg):
        super().__init__()
        self.norm_mix = RMSNorm(cfg.d_model)
        self.mix = ConvMixer(cfg)
        self.norm_glu = RMSNorm(cfg.d_model)
        self.glu = TernaryGLU(cfg)

    def forward(self, x):
        x = x + self.mix(self.norm_mix(x))
        return x + self.glu(self.norm_glu(x))


class Embedding(nn.Module):
    """The tied token embedding E (V, C), N(0, 0.02)."""

    def __init__(self, V, C):
        super().__init__()
        self.w = nn.Parameter(torch.empty(V, C).normal_(0.0, 0.02))

    def forward(self, idx):
        return F.embedding(idx, self.w)


class TorchFlashLM(nn.Module):
    """FlashLM v3 in PyTorch, built from a nanoternary ModelConfig (default: the reference's).
    Only the full softmax head: the hierarchical head ("hier") is ours alone."""

    def __init__(self, cfg=None):
        super().__init__()
        cfg = cfg if cfg is not None else ModelConfig()
        if cfg.head != "full":
            raise ValueError(f"the PyTorch peer implements only the full softmax head (head='full'), "
                             f"not head={cfg.head!r}")
        self.cfg = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.d_model)
        self.block = Block(cfg)
        self.norm_f = RMSNorm(cfg.d_model)

    def hidden(self, idx):
        # idx (B,T) -> h (B*T, C): the final RMSNorm's output
        x = self.embed(idx)
        for _ in range(self.cfg.n_recursions):
            x = self.block(x)                        # the same weights each time
        return self.norm_f(x).reshape(-1, self.cfg.d_model)

    def loss(self, idx, targets, rows=None, label_smoothing=0.0, z_loss=0.0):
        """Mean over the counted rows (of the flattened B*T positions; all when rows is None) of
        cross-entropy with label smoothing eps, plus z_loss * mean(lse^2) over the same rows:
        the loss nanoternary's Model.loss_and_grads differentiates with those options.
        (torch's label_smoothing gives (1-eps)*nll + eps*(lse - mean_v l_v), as ours.)"""
        idx, targets = torch.as_tensor(idx), torch.as_tensor(targets)
        h, t = self.hidden(idx), targets.reshape(-1)
        if rows is not None:
            rows = torch.as_tensor(rows)
            h, t = h[rows], t[rows]
        logits = h @ self.embed.w.T
        loss = F.cross_entropy(logits, t, label_smoothing=label_smoothing)
        if z_loss:
            loss = loss + z_loss * logits.logsumexp(-1).pow(2).mean()
        return loss


# ----------------------------------------------------------------------------------------------
# nanoternary's flat dicts <-> torch parameters (the names are the same)


def _check_names(torch_model, names, what):
    own = dict(torch_model.named_parameters())
    missing, extra = sorted(set(own) - set(names)), sorted(set(names) - set(own))
    if missing or extra:
        raise KeyError(f"{what}: parameter names differ from the torch peer's: "
                       f"missing {missing[:5]}, unexpected {extra[:5]}")
    return own


def load_params(torch_model, params):
    """Copy nanoternary's params (name -> array) into the torch model, in the model's dtype."""
    own = _check_names(torch_model, params, "load_params")
    with torch.no_grad():
        for name, p in own.items():
            src = np.asarray(params[name])
            if tuple(src.shape) != tuple(p.shape):
                raise ValueError(f"load_params: {name} has shape {src.shape}, the torch peer {tuple(p.shape)}")
            p.copy_(torch.from_numpy(np.ascontiguousarray(src)))
    return torch_model


def params_from(torch_model):
    """The torch model's parameters as nanoternary's flat dict (name -> NumPy copy)."""
    return {name: p.detach().cpu().numpy().copy() for name, p in torch_model.named_parameters()}


def grads_dict(torch_model):
    """Gradients after backward() under nanoternary's keys (parameters without a gradient, e.g. a
    frozen embedding, are left out, as nanoternary leaves out "embed.w" with train_embed=False)."""
    return {name: p.grad.detach().cpu().numpy().copy()
            for name, p in torch_model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------------------------
# the benchmark: training tokens/s of the reference-size model


def bench(B=8, T=256, frac=1.0, steps=5, freeze_emb=False):
    """Tokens/s of training steps (forward, backward, torch AdamW step of every trainable
    parameter) on random tokens, float32, the reference model; 2 untimed warm-up steps.
    frac < 1: the loss on a random max(1, int(B*T*frac)) positions, drawn every step."""
    torch.manual_seed(0)
    m = TorchFlashLM()
    m.embed.w.requires_grad_(not freeze_emb)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    V, N = m.cfg.vocab_size, B * T
    idx, tgt = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))

    def step():
        rows = torch.randperm(N)[:max(1, int(N * frac))] if frac < 1.0 else None
        loss = m.loss(idx, tgt, rows)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return B * T * steps / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m nanoternary.tools.torch_peer",
                                 description="The PyTorch peer of nanoternary's model.")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="training tokens/s (forward, backward, AdamW); the last token "
                                     "of the printed line is the number")
    b.add_argument("--B", type=int, default=8, help="batch size")
    b.add_argument("--T", type=int, default=256, help="sequence length")
    b.add_argument("--frac", type=float, default=1.0, help="fraction of positions in the loss")
    b.add_argument("--freeze-emb", action="store_true", help="no gradient for the embedding")
    b.add_argument("--steps", type=int, default=5, help="timed steps")
    b.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    tok_s = bench(a.B, a.T, a.frac, a.steps, a.freeze_emb)
    print(f"torch tok/s B={a.B} T={a.T} frac={a.frac} freeze={a.freeze_emb}: {tok_s:.0f}")


if __name__ == "__main__":
    main()
