"""Gradient checks you can run: every op, both heads and the whole model against float64 central
differences, with the worst relative error of each gradient and OK / NOT OK.

    python -m nanoternary.gradcheck            # a table, exit status 1 if anything is NOT OK
    python -m nanoternary.gradcheck conv       # only the checks whose name contains "conv"

Edit an op's backward, run this, and see at once what broke. tests/ call the same checks.

A central difference: d f / d x_i ~ (f(x + h e_i) - f(x - h e_i)) / 2h, with h = 1e-6 in float64
(truncation error ~h^2, round-off ~1e-16/h: both far below the tolerance 1e-6). The relative error
of a tensor is max_i |analytic_i - numeric_i| / max_i |numeric_i|: relative to the tensor's scale,
so elements whose true gradient is ~0 do not give meaningless huge ratios.

Each op is checked on L = sum(forward(inputs) * R) for a fixed random R, so the backward is fed
dy = R: every output element matters, with a different weight.
"""

import numpy as np

from .config import OneLineParser, number, run_cli
from .model import Model, ModelConfig
from .ops.conv import conv1d_backward, conv1d_forward
from .ops.embedding import embedding_backward, embedding_forward
from .ops.gates import relu2_glu_backward, relu2_glu_forward, sigmoid_gate_backward, sigmoid_gate_forward
from .ops.head import cross_entropy_backward, cross_entropy_forward, softmax_ce_backward, softmax_ce_forward
from .classmap import ClassMap
from .ops.hier_head import hier_ce_backward, hier_ce_forward
from .ops.norm import rmsnorm_backward, rmsnorm_forward
from .ops.ternary import ternary_linear_backward, ternary_linear_forward, ternary_quantize

H = 1e-6
TOL = 1e-6


def numerical_grad(f, x, h=H):
    """d f() / d x for a scalar function f of the array x (perturbed in place, then restored)."""
    g = np.zeros_like(x, dtype=np.float64)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * h)
    return g


def rel_error(analytic, numeric):
    """-> (worst relative error, index of the worst element)."""
    a, n = np.asarray(analytic, np.float64), np.asarray(numeric, np.float64)
    if a.shape != n.shape:
        raise AssertionError(f"shape mismatch: analytic {a.shape} vs numeric {n.shape}")
    diff = np.abs(a - n)
    scale = max(np.abs(n).max(initial=0.0), 1e-12)
    worst = tuple(int(i) for i in np.unravel_index(np.argmax(diff), diff.shape)) if diff.size else ()
    return diff.max(initial=0.0) / scale, worst


def check_grad(name, analytic, numeric, tol=TOL):
    """The relative error, or an AssertionError naming the tensor, the worst element and the first values."""
    err, worst = rel_error(analytic, numeric)
    if not err < tol:
        raise AssertionError(
            f"gradient of {name}: relative error {err:.3e} > {tol:.0e} at index {worst} "
            f"(analytic {np.asarray(analytic)[worst]:.8g}, numeric {np.asarray(numeric)[worst]:.8g})\n"
            f"  first analytic values: {np.asarray(analytic).reshape(-1)[:6]}\n"
            f"  first numeric values:  {np.asarray(numeric).reshape(-1)[:6]}")
    return err


def op_errors(forward, backward, inputs, names, rng):
    """{input name: relative error} for an op pair: forward(*inputs) -> (y, cache),
    backward(dy, cache) -> gradients in the order of `inputs` (a None name is not checked)."""
    y, cache = forward(*inputs)
    R = rng.standard_normal(np.shape(y))
    grads = backward(R, cache)
    grads = grads if isinstance(grads, tuple) else (grads,)
    f = lambda: float(np.sum(forward(*inputs)[0] * R))
    return {nm: rel_error(g, numerical_grad(f, x))[0] for x, g, nm in zip(inputs, grads, names) if nm}


# ------------------------------------------------------------------------------------------------
# the checks: name -> function(rng) -> {tensor: relative error}


def check_rmsnorm(rng):
    return op_errors(rmsnorm_forward, rmsnorm_backward, [rng.standard_normal((2, 3, 7)), rng.standard_normal(7)],
                     ["x", "g"], rng)


def check_ternary_linear(rng, scale=0.37):
    wt, _ = ternary_quantize(rng.standard_normal((4, 6)))
    return op_errors(lambda x, w: ternary_linear_forward(x, w, scale), ternary_linear_backward,
                     [rng.standard_normal((5, 6)), wt], ["x", "W_t"], rng)


def check_conv(rng, B=2, T=9, C_in=6, C_out=4, G=2, K=3, D=2):
    x, w = rng.standard_normal((B, T, C_in)), rng.standard_normal((C_out, C_in // G, K))
    return op_errors(lambda x, w: conv1d_forward(x, w, D, G), conv1d_backward, [x, w], ["x", "w"], rng)


def check_sigmoid_gate(rng):
    return op_errors(sigmoid_gate_forward, sigmoid_gate_backward,
                     [3 * rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 3, 5))], ["a", "v"], rng)


def check_relu2_glu(rng):
    a = rng.standard_normal((6, 9))
    a[np.abs(a) < 1e-3] = 0.5           # away from the kink at 0 (where the derivative is 0 anyway)
    return op_errors(relu2_glu_forward, relu2_glu_backward, [a, rng.standard_normal((6, 9))], ["a", "u"], rng)


def check_embedding(rng):
    idx = np.array([[0, 2, 2], [4, 2, 0]])        # token 2 three times: the repeats must add up
    return op_errors(lambda E: embedding_forward(idx, E), lambda dy, c: embedding_backward(dy, c),
                     [rng.standard_normal((5, 3))], ["E"], rng)


def check_cross_entropy(rng, eps=0.1, z=0.05):
    y = rng.integers(0, 11, 6)
    return op_errors(lambda l: cross_entropy_forward(l, y, eps, z), cross_entropy_backward,
                     [rng.standard_normal((6, 11))], ["logits"], rng)


def check_full_head(rng, eps=0.1, z=0.05):
    y = rng.integers(0, 13, 10)
    return op_errors(lambda h, E: softmax_ce_forward(h, E, y, eps, z),
                     lambda d, c: softmax_ce_backward(float(d), c),
                     [rng.standard_normal((10, 4)), rng.standard_normal((13, 4))], ["h", "E"], rng)


def check_hier_head(rng, eps=0.1, z=0.05):
    V, C, n_cls, N = 29, 5, 5, 12
    cmap = ClassMap.from_counts(rng.integers(0, 100, V) ** 2, n_cls)
    y = rng.integers(0, V, N)
    inputs = [rng.standard_normal((N, C)), rng.standard_normal((V, C)), rng.standard_normal((n_cls, C))]
    return op_errors(lambda h, E, Wc: hier_ce_forward(h, E, Wc, cmap, y, eps, z),
                     lambda d, c: hier_ce_backward(float(d), c), inputs, ["h", "E", "W_c"], rng)


TINY = dict(vocab_size=23, d_model=8, glu_hidden=12, n_recursions=2, dilations=(1, 3), kernel_size=3, conv_groups=2)


def tiny_model(seed=0, **kw):
    """A float64 model small enough for finite differences: quantization off (the quantizer is a
    step function; its gradient is the STE's by definition), which is also the float core that
    train.py --no-ternary trains; weights moved off their init values."""
    cfg = ModelConfig(**{**TINY, "ternary": False, **kw})
    m = Model(cfg, seed=seed, dtype=np.float64)
    r = np.random.default_rng(seed + 1)
    for k, v in m.params.items():
        v += 0.3 * r.standard_normal(v.shape) * (1 if k.endswith(".g") else np.abs(v).mean() + 0.1)
    return m


def check_model(rng, head="full", loss_and_grads=None, **options):
    """Every parameter of the whole model. `options`: loss_and_grads' training options.
    `loss_and_grads`: another implementation to check (fast.step's), default the model's own."""
    m = tiny_model(head=head, hier_classes=5 if head == "hier" else 0)
    idx, tgt = rng.integers(0, TINY["vocab_size"], (2, 7)), rng.integers(0, TINY["vocab_size"], (2, 7))
    lag = loss_and_grads or (lambda m, *a, **k: m.loss_and_grads(*a, **k))
    seed = int(rng.integers(1 << 30))                   # the same counted positions in every call
    f = lambda: lag(m, idx, tgt, rng=np.random.default_rng(seed), **options)[0]
    _, grads = lag(m, idx, tgt, rng=np.random.default_rng(seed), **options)
    return {name: rel_error(grads[name], numerical_grad(f, p))[0] for name, p in m.params.items()}


def _fast_loss_and_grads(m, *a, **k):
    from .fast.step import loss_and_grads
    return loss_and_grads(m, *a, workers=2, chunk=5, **k)


OPTIONS = dict(label_smoothing=0.1, z_loss=0.01, loss_frac=0.5)
CHECKS = {
    "rmsnorm": check_rmsnorm,
    "ternary linear": check_ternary_linear,
    "conv (grouped, dilated)": check_conv,
    "conv (depthwise)": lambda rng: check_conv(rng, T=9, C_in=6, C_out=6, G=6, K=2, D=3),
    "conv (dense)": lambda rng: check_conv(rng, B=1, T=5, C_in=4, C_out=4, G=1, K=4, D=1),
    "conv (reach beyond the sequence)": lambda rng: check_conv(rng, T=4, C_in=4, C_out=4, G=2, K=3, D=5),
    "sigmoid gate": check_sigmoid_gate,
    "relu^2 glu": check_relu2_glu,
    "embedding (repeated ids)": check_embedding,
    "cross-entropy (smoothing, z-loss)": check_cross_entropy,
    "full head": lambda rng: check_full_head(rng, 0.0, 0.0),
    "full head (smoothing, z-loss)": check_full_head,
    "hier head": lambda rng: check_hier_head(rng, 0.0, 0.0),
    "hier head (smoothing, z-loss)": check_hier_head,
    "model, full head": check_model,
    "model, hier head": lambda rng: check_model(rng, "hier"),
    "model, full head, training options": lambda rng: check_model(rng, **OPTIONS),
    "model, hier head, training options": lambda rng: check_model(rng, "hier", **OPTIONS),
    "fast step, full head, training options": lambda rng: check_model(rng, loss_and_grads=_fast_loss_and_grads,
                                                                      **OPTIONS),
    "fast step, hier head, training options": lambda rng: check_model(rng, "hier", _fast_loss_and_grads,
                                                                      **OPTIONS),
}


def run(name, seed=0):
    """{tensor: relative error} of one check."""
    return CHECKS[name](np.random.default_rng(seed))


def main(argv=None):
    ap = OneLineParser(prog="python -m nanoternary.gradcheck", description=__doc__.split("\n\n")[0])
    ap.add_argument("only", nargs="?", default="", help="run the checks whose name contains this")
    ap.add_argument("--tol", type=number(float, "(0, inf)"), default=TOL,
                    help=f"relative error allowed (default {TOL:g})")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per gradient, not per check")
    args = ap.parse_args(argv)
    names = [n for n in CHECKS if args.only in n]
    if not names:
        ap.error(f"no check matches {args.only!r}; the checks: {', '.join(CHECKS)}")
    failed = 0
    print(f"{'check':<40} {'gradient of':<26} {'worst rel. error':>16}")
    for name in names:
        errors = run(name)
        rows = errors.items() if args.verbose else [max(errors.items(), key=lambda kv: kv[1])]
        for i, (tensor, err) in enumerate(rows):
            ok = err < args.tol
            failed += not ok
            print(f"{name if i == 0 else '':<40} {tensor:<26} {err:>16.1e}  {'OK' if ok else 'NOT OK'}", flush=True)
    print(f"\n{'all OK' if not failed else f'{failed} NOT OK'} (float64 central differences, h = {H:g}, "
          f"tolerance {args.tol:g}{'' if args.verbose else '; the worst gradient of each check, -v for all'})")
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
