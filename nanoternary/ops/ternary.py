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


def addsub_plan(wt):
    # wt (O,I) in {-1,0,+1} -> plan: for each sign, the input columns of every output row
    """Precompute, once per weight matrix, where the +1s and -1s are.

    For the +1s: `cols` lists their column indices row after row (np.nonzero walks row-major),
    `counts[o]` how many row o has. Same for the -1s. This is all the kernel needs: the values are
    implied by the sign, so nothing is ever multiplied.
    """
    O = wt.shape[0]
    plan = {"out_features": O}
    for sign, mask in (("plus", wt > 0), ("minus", wt < 0)):
        _, cols = np.nonzero(mask)
        plan[sign] = (cols.astype(np.intp), mask.sum(axis=1))
    return plan


def _segment_sums(vals, counts):
    # vals (N, nnz), counts (O,) with sum(counts) == nnz -> (N, O): sum of each run of columns
    out = np.zeros_like(vals, shape=(vals.shape[0], counts.shape[0]))
    nonempty = counts > 0
    if vals.shape[1] == 0:
        return out
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))[nonempty]
    # add.reduceat sums vals[:, starts[j]:starts[j+1]]; empty runs are skipped (reduceat would
    # return one element for them instead of zero), and the last run ends at nnz as it should.
    out[:, nonempty] = np.add.reduceat(vals, starts, axis=1)
    return out


def addsub_matmul(x, plan):
    # x (N,I) -> y (N,O)
    """y[n, o] = sum_{i: W_t[o,i] = +1} x[n, i]  -  sum_{i: W_t[o,i] = -1} x[n, i]."""
    x2 = x.reshape(-1, x.shape[-1])
    plus_cols, plus_counts = plan["plus"]
    minus_cols, minus_counts = plan["minus"]
    y = _segment_sums(x2[:, plus_cols], plus_counts)        # the additions
    y -= _segment_sums(x2[:, minus_cols], minus_counts)     # the subtractions
    return y.reshape(x.shape[:-1] + (plan["out_features"],))
