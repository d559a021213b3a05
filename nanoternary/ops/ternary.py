"""The ternary linear layer: weights in {-1, 0, +1}, so the product needs only additions and
subtractions.

Training keeps a float "latent" weight W (O, I) and quantizes it on every forward, as the reference
(FlashLM v3) does, with the absmean threshold:

    a   = mean(|W|)                                   one number per matrix
    W_t = +1 where W > a,  -1 where W < -a,  0 elsewhere
    y   = x @ W_t^T            (optionally times a: the BitNet b1.58 per-tensor scale, off by default)

The quantizer's true derivative is zero almost everywhere, so the backward uses the
straight-through estimator (STE, Bengio et al. 2013): it treats W_t as if it were W, passing the
gradient of W_t unchanged to the latent W (`ternary_ste_backward`, one line).

Two kernels compute the same forward product (tests prove them equal):
    "blas"    one GEMM on W_t stored as floats: the fast path for training.
    "addsub"  for each output o: sum of x[i] where W_t[o, i] = +1, minus sum of x[i] where
              W_t[o, i] = -1. Gathers and segment sums, literally additions and subtractions with
              no multiplication: the arithmetic that makes ternary models cheap at inference.
"""
import numpy as np


def ternary_quantize(w, scale=False):
    # w (O,I) float -> wt (O,I) in {-1,0,+1} (same dtype), s scalar
    """W_t = +1 where W > a, -1 where W < -a, else 0, with a = mean(|W|).
    Returns (W_t, s): s = a when `scale` (BitNet b1.58's per-tensor scale), else 1."""
    a = np.mean(np.abs(w))
    wt = (w > a).astype(w.dtype) - (w < -a).astype(w.dtype)
    return wt, (w.dtype.type(a) if scale else w.dtype.type(1.0))


def ternary_ste_backward(dwt):
    """Straight-through estimator: pretend dW_t/dW = 1, so the latent weight gets dW_t unchanged."""
    dw = dwt  # STE
    return dw


def ternary_linear_forward(x, wt, s=1.0, kernel="blas", plan=None):
    # x (N,I), wt (O,I) ternary, s scalar -> y (N,O)
    """y = s * (x @ W_t^T). Caches (x, W_t, s).

    kernel "blas": one GEMM. kernel "addsub": masked sums from `plan` (made by addsub_plan(W_t)
    when not given), no multiplication except the optional scale s.
    """
    if kernel == "blas":
        y = x @ wt.T
    elif kernel == "addsub":
        y = addsub_matmul(x, plan if plan is not None else addsub_plan(wt))
    else:
        raise ValueError(f"unknown ternary kernel {kernel!r}: use 'blas' or 'addsub'")
    if s != 1.0:
        y *= s
    return y, (x, wt, s)


def ternary_linear_backward(dy, cache):
    """Forward was y = s * x @ W_t^T.
    dx   = s * dy @ W_t            (the same ternary matrix: additions and subtractions again)
    dW_t = s * dy^T @ x            (summed over all N rows); the caller applies the STE to get dW.
    """
    x, wt, s = cache
    dx = dy @ wt
    dwt = dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])
    if s != 1.0:
        dx *= s
        dwt *= s
    return dx, dwt


# ----------------------------------------------------------------------------------------------
# the add/subtract kernel

ADDSUB_VALUES = 1 << 20     # values gathered at once (4 MB of float32): rows go in chunks of this


def addsub_plan(wt):
    # wt (O,I) in {-1,0,+1} -> plan (idx, starts, I): where the +1s and -1s of each row are
    """Precompute, once per weight matrix, one signed index list. With xx = [x, -x, 0] (2I + 1
    values: the input, its negation and a zero), row o's +1 columns i are listed as i and its -1
    columns as I + i, row after row; an all-zero row gets the index 2I (the zero). starts[o] is
    where row o's run begins. This is all the kernel needs: the values are implied by the sign,
    so nothing is ever multiplied."""
    O, I = wt.shape
    rows, cols = np.nonzero(wt)                                # row-major: row by row
    cols = np.where(wt[rows, cols] > 0, cols, I + cols)        # -1s point into the -x half
    empty = np.flatnonzero(~wt.any(axis=1))
    rows = np.concatenate([rows, empty])
    cols = np.concatenate([cols, np.full(empty.size, 2 * I)])
    order = np.argsort(rows, kind="stable")
    counts = np.bincount(rows, minlength=O)                    # >= 1 for every row now
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    return cols[order].astype(np.intp), starts.astype(np.intp), I


def addsub_matmul(x, plan):
    # x (N,I) -> y (N,O)
    """y[n, o] = sum_{i: W_t[o,i] = +1} x[n, i]  -  sum_{i: W_t[o,i] = -1} x[n, i]
               = sum of xx[n, j] over row o's signed indices j, with xx = [x, -x, 0]:
    one gather (np.take) and one segmented sum (np.add.reduceat) per chunk of rows."""
    idx, starts, I = plan
    x2 = x.reshape(-1, I)
    N = x2.shape[0]
    y = np.empty((N, starts.size), dtype=x.dtype)
    step = max(1, ADDSUB_VALUES // max(idx.size, 1))
    for n in range(0, N, step):
        xn = x2[n:n + step]
        xx = np.zeros((xn.shape[0], 2 * I + 1), dtype=x.dtype)  # [x, -x, 0]
        xx[:, :I] = xn
        np.subtract(0, xn, out=xx[:, I:2 * I])                 # -x: a subtraction from zero
        np.add.reduceat(np.take(xx, idx, axis=1), starts, axis=1, out=y[n:n + step])
    return y.reshape(x.shape[:-1] + (starts.size,))
