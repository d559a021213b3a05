"""RMSNorm (Zhang & Sennrich, 2019): rescale each row to unit root-mean-square, then a gain.

    r = 1 / sqrt(mean(x^2) + eps)          one number per row
    y = x * r * g
"""
import numpy as np

EPS = 1e-6  # as in the reference (FlashLM v3) and the PyTorch peer


def rmsnorm_forward(x, g, eps=EPS):
    # x (..., C), g (C,) -> y (..., C)
    """y = x * r * g with r = 1/sqrt(mean(x^2) + eps). Caches (x*r, r, g)."""
    C = x.shape[-1]
    ms = np.vecdot(x, x)[..., None] / C                                  # mean(x^2), no x*x temporary
    r = 1.0 / np.sqrt(ms + eps)                                          # (..., 1)
    xhat = x * r
    y = xhat * g
    return y, (xhat, r, g)


def rmsnorm_backward(dy, cache):
    """Forward was y = xhat * g with xhat = x * r, r = (mean(x^2) + eps)^(-1/2).

    dg = sum over rows of dy * xhat.
    dx: let dxhat = dy * g. x reaches y directly and through r:
        term 1 (direct):   dxhat * r
        term 2 (through r): dr/dx_j = -r^3 x_j / C, so sum_i dxhat_i x_i * (-r^3 x_j / C)
                          = -r * xhat_j * mean_i(dxhat_i * xhat_i)
    """
    xhat, r, g = cache
    C = xhat.shape[-1]
    dg = np.einsum("nc,nc->c", dy.reshape(-1, C), xhat.reshape(-1, C))  # sum over rows of dy * xhat
    dxhat = dy * g
    mean_dot = np.vecdot(dxhat, xhat)[..., None] / C
    dx = xhat * mean_dot                                                 # term 2 ...
    np.subtract(dxhat, dx, out=dx)                                       # ... + term 1
    dx *= r
    return dx, dg
