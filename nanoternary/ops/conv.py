"""Causal, dilated, grouped 1-D convolution over time: the ConvMixer's token mixing.

    y[b, t, o] = sum_k sum_i  w[o, i, k] * x[b, t - (K-1-k)*D, g(o)*Ci + i]

with Ci = C_in/G input channels per group, g(o) the group of output channel o, and x taken as zero
before t = 0 (left padding only, P = (K-1)*D steps), so y[t] never sees x after t: causal. Tap k = K-1
is the current step, tap 0 looks back (K-1)*D steps. Weight layout (C_out, C_in/G, K) is PyTorch's
Conv1d. G = C gives a depthwise conv, G = 1 a dense one.

Fast path, without copying the input into columns (im2col): pad x on the left once, then view it
per group, x_g[g, b] = x_pad[b, :, g*Ci:(g+1)*Ci] (a strided view, no copy). Each tap is one batched
matmul over groups and batch on a time-shifted window of that view, accumulated:

    y_g[g, b] = sum_k x_g[g, b, k*D : k*D+T] @ W_k[g]        W_k[g] (Ci, Co) = w[g*Co:(g+1)*Co, :, k].T

BLAS reads each (T, Ci) window in place (its rows are C_in apart in memory). `conv1d_forward_naive`
is the plain-loop version of the equation above that the tests check this against.
"""
import numpy as np


def split_weight(w, groups):
    # w (C_out, Ci, K) -> (G, K, Ci, Co): one (Ci, Co) matrix per group and tap, contiguous
    # (matmul copies a strided weight for every batch element, which costs more than the product)
    C_out, Ci, K = w.shape
    return np.ascontiguousarray(w.reshape(groups, C_out // groups, Ci, K).transpose(0, 3, 2, 1))


def _group_view(a, groups):
    # a (B, L, G*Ci) -> view (G, B, L, Ci): group g's channels, no copy
    B, L, C = a.shape
    return a.reshape(B, L, groups, C // groups).transpose(2, 0, 1, 3)


def conv1d_forward(x, w, dilation=1, groups=1):
    # x (B,T,C_in), w (C_out, C_in/G, K) -> y (B,T,C_out)
    """Causal dilated grouped conv (equation in the module docstring).
    Caches (x_pad, W, dilation, groups): the left-padded input and the per-group, per-tap weights."""
    B, T, C_in = x.shape
    C_out, Ci, K = w.shape
    G, D = groups, dilation
    if C_in != G * Ci or C_out % G:
        raise ValueError(f"conv1d: C_in={C_in}, C_out={C_out}, weight {w.shape}, groups={G} do not fit")
    P = (K - 1) * D
    xp = np.zeros((B, P + T, C_in), dtype=x.dtype)                  # left padding: P zeros
    xp[:, P:] = x
    xg = _group_view(xp, G)                                          # (G, B, P+T, Ci) view
    W = split_weight(w, G)                                          # (G, K, Ci, Co)
    yg = np.matmul(xg[:, :, 0:T], W[:, 0, None])                     # tap 0: (G,B,T,Ci) @ (G,1,Ci,Co)
    for k in range(1, K):
        yg += np.matmul(xg[:, :, k * D:k * D + T], W[:, k, None])
    y = yg.transpose(1, 2, 0, 3).reshape(B, T, C_out)                # back to (B, T, G*Co)
    return y, (xp, W, D, G)


def conv1d_backward(dy, cache):
    """Forward was y_g[g, b] = sum_k x_g[g, b, kD : kD+T] @ W_k[g].

    dW_k[g] = sum_b x_g[g, b, kD : kD+T]^T @ dy_g[g, b]
    dx_g[g, b, kD : kD+T] += dy_g[g, b] @ W_k[g]^T          (every tap adds into its shifted window)
    dx = dx_g without the P padding steps, back in (B, T, C_in) layout.
    """
    xp, W, D, G = cache
    B, PT, C_in = xp.shape
    K, Ci, Co = W.shape[1], W.shape[2], W.shape[3]
    T = dy.shape[1]
    P = PT - T
    xg = _group_view(xp, G)                                                     # (G,B,P+T,Ci)
    dyg = _group_view(dy, G)                                                    # (G,B,T,Co) view
    WT = np.ascontiguousarray(W.transpose(0, 1, 3, 2))                         # (G,K,Co,Ci)
    dW = np.empty_like(W)                                                       # (G,K,Ci,Co)
    dxg = np.zeros((G, B, PT, Ci), dtype=dy.dtype)
    for k in range(K):
        win = xg[:, :, k * D:k * D + T]                                         # (G,B,T,Ci)
        dW[:, k] = np.matmul(win.transpose(0, 1, 3, 2), dyg).sum(axis=1)
        dxg[:, :, k * D:k * D + T] += np.matmul(dyg, WT[:, k, None])
    dx = dxg[:, :, P:].transpose(1, 2, 0, 3).reshape(B, T, C_in)
    dw = dW.transpose(0, 3, 2, 1).reshape(G * Co, Ci, K)                        # undo split_weight
    return dx, dw


def conv1d_forward_naive(x, w, dilation=1, groups=1):
    # x (B,T,C_in), w (C_out, C_in/G, K) -> y (B,T,C_out); plain loops, for tests only
    """The equation in the module docstring, one multiply-add at a time."""
    B, T, C_in = x.shape
    C_out, Ci, K = w.shape
    Co = C_out // groups
    y = np.zeros((B, T, C_out), dtype=x.dtype)
    for b in range(B):
        for t in range(T):
            for o in range(C_out):
                g = o // Co
                for k in range(K):
                    src = t - (K - 1 - k) * dilation
                    if src < 0:
                        continue  # left padding: zeros before the sequence starts
                    for i in range(Ci):
                        y[b, t, o] += w[o, i, k] * x[b, src, g * Ci + i]
    return y
