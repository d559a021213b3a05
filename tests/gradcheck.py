"""Float64 central-difference gradient checking, shared by the op and model tests.

    numerical_grad(f, x)           d f / d x by central differences, one element at a time
    check_grad(name, analytic, numeric, tol)
                                   fails loudly: the tensor's name, the worst relative error and its
                                   index, and the first differing values

Relative error of a tensor = max_i |a_i - n_i| / max(max_i |n_i|, 1e-12): relative to the tensor's
scale, so elements whose true gradient is ~0 do not produce meaningless huge ratios.
"""
import numpy as np

H = 1e-6  # float64 step: truncation error ~ H^2, round-off ~ 1e-16 / H, both far below 1e-6


def numerical_grad(f, x, h=H):
    """d f(x) / d x, for a scalar function f of the array x (perturbed in place, then restored)."""
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
    a, n = np.asarray(analytic, np.float64), np.asarray(numeric, np.float64)
    if a.shape != n.shape:
        raise AssertionError(f"shape mismatch: analytic {a.shape} vs numeric {n.shape}")
    diff = np.abs(a - n)
    scale = max(np.abs(n).max(initial=0.0), 1e-12)
    worst = np.unravel_index(np.argmax(diff), diff.shape) if diff.size else ()
    return diff.max(initial=0.0) / scale, worst


def check_grad(name, analytic, numeric, tol=1e-6):
    err, worst = rel_error(analytic, numeric)
    if not err < tol:
        a = np.asarray(analytic).reshape(-1)[:6]
        n = np.asarray(numeric).reshape(-1)[:6]
        raise AssertionError(
            f"gradient of {name}: relative error {err:.3e} > {tol:.0e} at index {worst} "
            f"(analytic {np.asarray(analytic)[worst]:.8g}, numeric {np.asarray(numeric)[worst]:.8g})\n"
            f"  first analytic values: {a}\n  first numeric values:  {n}")
    return err


def check_op(name, forward, backward, inputs, rng, tol=1e-6, names=None):
    """Gradient-check an op pair: L = sum(forward(*inputs) * R) for a fixed random R.

    forward(*inputs) -> (y, cache); backward(R, cache) -> grads in the order of `inputs`
    (entries of `inputs` that are None in `names` are not checked, e.g. integer indices).
    """
    y, cache = forward(*inputs)
    R = rng.standard_normal(np.shape(y))
    grads = backward(R, cache)
    if not isinstance(grads, tuple):
        grads = (grads,)
    names = names or [f"input{i}" for i in range(len(inputs))]
    errs = {}
    for x, g, nm in zip(inputs, grads, names):
        if nm is None:
            continue
        num = numerical_grad(lambda: float(np.sum(forward(*inputs)[0] * R)), x)
        errs[nm] = check_grad(f"{name}: {nm}", g, num, tol)
    return errs
