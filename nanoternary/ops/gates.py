"""The two elementwise gates of the block.

ConvMixer layer:  z = sigmoid(a) * v        a = conv_gate(h), v = conv_value(h)
TernaryGLU:       z = relu(a)^2 * u         a = gate(x), u = up(x)      (squared-ReLU GLU)
"""
import numpy as np


def sigmoid(a):
    # a (...) -> s (...); written as 0.5 * (1 + tanh(a/2)), which never overflows in exp
    s = np.tanh(0.5 * a)
    s += 1.0
    s *= 0.5
    return s


def sigmoid_gate_forward(a, v):
    # a (B,T,C), v (B,T,C) -> z (B,T,C)
    """z = sigmoid(a) * v. Caches (s, v) with s = sigmoid(a)."""
    s = sigmoid(a)
    return s * v, (s, v)


def sigmoid_gate_backward(dz, cache):
    """Forward was z = s * v with s = sigmoid(a), and ds/da = s * (1 - s).
    da = dz * v * s * (1 - s);  dv = dz * s."""
    s, v = cache
    dv = dz * s
    da = dz * v * s * (1.0 - s)
    return da, dv


def relu2_glu_forward(a, u):
    # a (N,H), u (N,H) -> z (N,H)
    """z = relu(a)^2 * u. Caches (relu(a), u)."""
    r = np.maximum(a, 0.0)
    return r * r * u, (r, u)


def relu2_glu_backward(dz, cache):
    """Forward was z = r^2 * u with r = relu(a), and d(r^2)/da = 2r (zero where a < 0).
    da = dz * u * 2r;  du = dz * r^2."""
    r, u = cache
    du = dz * r * r
    da = 2.0 * dz * u * r
    return da, du
