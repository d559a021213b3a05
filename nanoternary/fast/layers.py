"""The block's two sublayers, fused: the same math as model.mixer_forward / glu_forward and their
backwards, in fewer and larger products. fast/step.py runs the model's own block with these in
place of the plain ones (model.block_forward's `layers`); tests/test_fast.py proves them equal.

The ConvMixer. Each layer's two convs (gate and value) read the same normalised input u, and each
is K taps of G small (C/G x C/G) products: 2 K G = 128 products of 16 x 16 for every layer, too
small for BLAS to run near its peak. Here the K time-shifted windows of u are stacked side by side
(the "taps", (G, B*T, K*C/G)) and multiplied once by the gate's and the value's weights stacked
together (G, K*C/G, 2*C/G): G products of (B*T x 64) @ (64 x 32). The same FLOPs, a few large
products; the stacking costs K copies of u. The backward is the same two products transposed, and
the shifted windows of the taps' gradient are added back into du.

The TernaryGLU. gate and up read the same u: one (N, C) @ (C, 2H) product instead of two, and in the
backward one product for both weights' gradients and one for du.
"""
import numpy as np

from ..ops.gates import relu2_glu_backward, relu2_glu_forward, sigmoid_gate_backward, sigmoid_gate_forward
from ..ops.norm import rmsnorm_backward, rmsnorm_forward
from ..ops.ternary import ternary_linear_backward, ternary_linear_forward, ternary_ste_backward


def _taps(xp, T, K, D, G):
    # xp (B, P+T, C) padded input -> (G, B*T, K*Ci): row (b, t) of group g holds its K taps side by side
    B, _, C = xp.shape
    Ci = C // G
    X = np.empty((G, B, T, K, Ci), dtype=xp.dtype)
    for k in range(K):                       # tap k of position t is x[t - (K-1-k) D] = xp[t + k D]
        X[:, :, :, k, :] = xp[:, k * D:k * D + T].reshape(B, T, G, Ci).transpose(2, 0, 1, 3)
    return X.reshape(G, B * T, K * Ci)


def _pair_weight(wg, wv, G):
    # wg, wv (C_out, Ci, K) -> (G, K*Ci, 2*Co): rows (k, i) as in _taps, columns [gate | value]
    C_out, Ci, K = wg.shape
    Co = C_out // G
    split = lambda w: w.reshape(G, Co, Ci, K).transpose(0, 3, 2, 1).reshape(G, K * Ci, Co)
    return np.concatenate([split(wg), split(wv)], axis=2)


def conv_pair_forward(u, wg, wv, D, G):
    # u (B,T,C), wg, wv (C, C/G, K) -> a, v (B,T,C): conv1d_forward(u, wg, D, G), conv1d_forward(u, wv, D, G)
    B, T, C = u.shape
    K = wg.shape[2]
    P = (K - 1) * D
    xp = np.zeros((B, P + T, C), dtype=u.dtype)
    xp[:, P:] = u
    W = _pair_weight(wg, wv, G)
    Y = np.matmul(_taps(xp, T, K, D, G), W)                  # (G, B*T, 2Co)
    Y = Y.reshape(G, B, T, 2, C // G).transpose(3, 1, 2, 0, 4).reshape(2, B, T, C)
    return Y[0], Y[1], (xp, W, D, G)             # the taps are rebuilt in the backward (memory)


def conv_pair_backward(da, dv, cache):
    # da, dv (B,T,C) -> du (B,T,C), dwg, dwv (C, C/G, K)
    xp, W, D, G = cache
    B, T, C = da.shape
    K, Co = W.shape[1] // (C // G), W.shape[2] // 2
    Ci = C // G
    dY = np.stack([da, dv]).reshape(2, B, T, G, Co).transpose(3, 1, 2, 0, 4).reshape(G, B * T, 2 * Co)
    X = _taps(xp, T, K, D, G)
    dW = np.matmul(X.transpose(0, 2, 1), dY)                # (G, K*Ci, 2Co)
    dX = np.matmul(dY, W.transpose(0, 2, 1)).reshape(G, B, T, K, Ci)
    dxp = np.zeros_like(xp)
    for k in range(K):                                       # each tap's gradient back to its window
        dxp[:, k * D:k * D + T] += dX[:, :, :, k, :].transpose(1, 2, 0, 3).reshape(B, T, C)
    unsplit = lambda w: w.reshape(G, K, Ci, Co).transpose(0, 3, 2, 1).reshape(G * Co, Ci, K)
    return dxp[:, (K - 1) * D:], unsplit(dW[:, :, :Co]), unsplit(dW[:, :, Co:])


def mixer_forward(h, p, q, cfg, convs=None):
    # model.mixer_forward, with each layer's two convs as one conv_pair
    B, T, C = h.shape
    caches = []
    for i, D in enumerate(cfg.dilations):
        u, c_norm = rmsnorm_forward(h, p[f"block.mix.norm{i}.g"])
        a, v, c_conv = conv_pair_forward(u, p[f"block.mix.conv{i}.gate.w"], p[f"block.mix.conv{i}.value.w"],
                                         D, cfg.conv_groups)
        z, c_sig = sigmoid_gate_forward(a, v)
        h = h + z
        caches.append((c_norm, c_conv, c_sig))
    m, c_out = ternary_linear_forward(h.reshape(B * T, C), *q["block.mix.out.w"])
    return m.reshape(B, T, C), (caches, c_out)


def mixer_backward(dm, cache, cfg, grads):
    caches, c_out = cache
    B, T, C = dm.shape
    dh, dwt = ternary_linear_backward(dm.reshape(B * T, C), c_out)
    grads["block.mix.out.w"] += ternary_ste_backward(dwt)
    dh = dh.reshape(B, T, C)
    for i in reversed(range(len(caches))):
        c_norm, c_conv, c_sig = caches[i]
        da, dv = sigmoid_gate_backward(dh, c_sig)
        du, dwg, dwv = conv_pair_backward(da, dv, c_conv)
        grads[f"block.mix.conv{i}.gate.w"] += dwg
        grads[f"block.mix.conv{i}.value.w"] += dwv
        dhn, dg = rmsnorm_backward(du, c_norm)
        grads[f"block.mix.norm{i}.g"] += dg
        dh = dh + dhn
    return dh


def glu_forward(u, q):
    # model.glu_forward, with gate and up as one (C, 2H) product
    B, T, C = u.shape
    (wg, sg), (wu, su) = q["block.glu.gate.w"], q["block.glu.up.w"]
    H = wg.shape[0]
    ab, c_gu = ternary_linear_forward(u.reshape(B * T, C), np.concatenate([wg, wu]))   # (N, 2H)
    if sg != 1.0 or su != 1.0:                               # BitNet's scale: one per matrix
        ab[:, :H] *= sg
        ab[:, H:] *= su
    z, c_act = relu2_glu_forward(ab[:, :H], ab[:, H:])
    d, c_down = ternary_linear_forward(z, *q["block.glu.down.w"])
    return d.reshape(B, T, C), (c_gu, (sg, su), c_act, c_down)


def glu_backward(dd, cache, grads):
    c_gu, (sg, su), c_act, c_down = cache
    B, T, C = dd.shape
    dz, dwt = ternary_linear_backward(dd.reshape(B * T, C), c_down)
    grads["block.glu.down.w"] += ternary_ste_backward(dwt)
    da, db = relu2_glu_backward(dz, c_act)
    dab = np.concatenate([da * sg if sg != 1.0 else da, db * su if su != 1.0 else db], axis=1)   # (N, 2H)
    du, dwt = ternary_linear_backward(dab, c_gu)
    H = da.shape[1]
    grads["block.glu.gate.w"] += ternary_ste_backward(dwt[:H])
    grads["block.glu.up.w"] += ternary_ste_backward(dwt[H:])
    return du.reshape(B, T, C)


FORWARD, BACKWARD = (mixer_forward, glu_forward), (mixer_backward, glu_backward)   # for model.body_*(layers=)
