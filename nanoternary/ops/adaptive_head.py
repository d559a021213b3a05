"""The adaptive softmax head (Grave et al. 2017, "Efficient softmax approximation for GPUs";
PyTorch's torch.nn.AdaptiveLogSoftmaxWithLoss). docs/heads.md compares it with the other heads.

A few thousand tokens make up most of any text (Zipf's law). The adaptive softmax gives those a full
softmax and puts the rare rest in a few tail clusters, scored only when needed through narrower
projections. The tokens, sorted by frequency, are cut at c_1 < ... < c_K = V (classmap.ClusterMap):
the shortlist holds the S = c_1 most frequent, tail cluster i the tokens ranked [c_i, c_{i+1}).
Letters: S the shortlist, J = K-1 tail clusters, d_i = C // div^i the width of tail i, n_i its size.

    head:    a   = h @ W_head^T          (S + J,)  a logit per shortlist token, then one per tail cluster
    tail i:  z_i = h @ P_i^T             (d_i,)    a projection to a narrower width, P_i (d_i, C)
             b_i = z_i @ W_i^T           (n_i,)    a logit per token of the cluster, W_i (n_i, d_i)

    log p(v) = log softmax(a)_v                                  v in the shortlist
    log p(v) = log softmax(a)_{S+i-1} + log softmax(b_i)_v       v in tail cluster i

Each factor is a normalised softmax, so the distribution is exact over all V tokens (it sums to 1)
and the NLL compares directly with the full head's. A row costs S + J dot products of width C, and a
row whose target is in tail i adds C d_i + n_i d_i multiply-adds: in training only those rows go
through tail i. Label smoothing and z-loss apply per level, as in the hier head (hier_head.py).

What is tied to the embedding E (V, C) (adaptive_weights, and adaptive_weight_grads for the
gradients): the shortlist rows of W_head ARE E's rows of those tokens, as in the full head; the tail
token vectors are the first d_i columns of their rows of E, W_i = E[cluster i, :d_i] (any (n_i, d_i)
matrix would do, and tied, a rare token's vector also learns from its uses as an input). Not tied:
the J cluster vectors ("head.cluster_w": no token stands for a cluster) and the projections P_i
("head.proj{i}.w"). Every token is in one cluster, so each row of dE gets exactly one gradient.
"""
import numpy as np

from .head import cross_entropy_backward, cross_entropy_forward, log_softmax


def tail_widths(C, div, n_tails):
    """(d_1, ..., d_J): d_i = C // div^i, as torch's in_features // div_value^(i+1) for its 0-based i."""
    return tuple(int(C // div ** i) for i in range(1, n_tails + 1))


def adaptive_ce_rows(h, W_head, tails, cmap, targets, label_smoothing=0.0, z_loss=0.0):
    # h (N,C), W_head (S+J,C), tails [(P_i (d_i,C), W_i (n_i,d_i))], targets (N,) token ids
    #   -> loss (N,): one loss per row, cache
    """Per-row loss of the head level plus, for rows whose target is in a tail, that tail's level."""
    eps, z = label_smoothing, z_loss
    cl = cmap.token_cluster[targets]                       # (N,) 0 = shortlist, i = tail i
    # head level: every row, over the S shortlist tokens and the J cluster logits
    loss, c_head = cross_entropy_forward(h @ W_head.T, cmap.head_targets(targets), eps, z)
    # tail level: only the rows whose target is in tail i go through tail i
    c_tails = []
    for i, (P, W) in enumerate(tails, start=1):
        r = np.flatnonzero(cl == i)                        # rows whose target is in cluster i
        zi = h[r] @ P.T                                    # (n_r, d_i) projected rows
        loss_b, c_b = cross_entropy_forward(zi @ W.T, cmap.position[targets[r]], eps, z)
        loss[r] += loss_b
        c_tails.append((r, zi, c_b))
    return loss, (h, W_head, tails, c_head, c_tails)


def adaptive_ce_forward(h, W_head, tails, cmap, targets, label_smoothing=0.0, z_loss=0.0):
    # h (N,C), W_head (S+J,C), tails [(P_i, W_i)], targets (N,) token ids -> loss scalar (mean), cache
    loss, cache = adaptive_ce_rows(h, W_head, tails, cmap, targets, label_smoothing, z_loss)
    return loss.mean(), cache


def adaptive_ce_backward(dloss, cache):
    # dloss scalar -> dh (N,C), dW_head (S+J,C), [(dP_i (d_i,C), dW_i (n_i,d_i)), ...]
    """Forward was a = h @ W_head^T; for the rows r_i of tail i, z_i = h[r_i] @ P_i^T and
    b_i = z_i @ W_i^T; loss = mean of the cross-entropies of a and of every b_i. So, with da, db_i
    from cross_entropy_backward:
        dh = da @ W_head;   dW_head = da^T @ h                    (head level, every row)
        dW_i = db_i^T @ z_i;   dz_i = db_i @ W_i                  (tail i, its rows only)
        dP_i = dz_i^T @ h[r_i];   dh[r_i] += dz_i @ P_i"""
    h, W_head, tails, c_head, c_tails = cache
    N = h.shape[0]
    drow = np.full(N, dloss / max(N, 1), dtype=h.dtype)    # d mean / d row loss
    da = cross_entropy_backward(drow, c_head)
    dh = da @ W_head
    dW_head = da.T @ h
    dtails = []
    for (P, W), (r, zi, c_b) in zip(tails, c_tails):
        db = cross_entropy_backward(drow[r], c_b)          # (n_r, n_i); zero rows when no target is here
        dz = db @ W
        dtails.append((dz.T @ h[r], db.T @ zi))            # dP_i, dW_i
        dh[r] += dz @ P                                    # r: distinct rows, so += is safe
    return dh, dW_head, dtails


def adaptive_nll(h, W_head, tails, cmap, targets):
    # h (N,C), targets (N,) token ids -> nll (N,) float64 = -log p(target), no smoothing
    return adaptive_ce_rows(h, W_head, tails, cmap, targets)[0].astype(np.float64)


def adaptive_log_probs(h, W_head, tails, cmap):
    # h (N,C) -> logp (N,V): log p(v) for every token v, indexed by token id
    """Every row through the head and every tail (the module docstring's two lines)."""
    S = cmap.shortlist_size
    logp_head = log_softmax(h @ W_head.T)                  # (N, S+J)
    out = np.empty((h.shape[0], cmap.vocab_size), dtype=h.dtype)
    out[:, cmap.members(0)] = logp_head[:, :S]
    for i, (P, W) in enumerate(tails, start=1):
        out[:, cmap.members(i)] = logp_head[:, S + i - 1:S + i] + log_softmax((h @ P.T) @ W.T)
    return out


# ------------------------------------------------------------------------------------------------
# the tie to the embedding (module docstring: what is tied and why)


def adaptive_weights(E, cluster_w, projs, cmap):
    # E (V,C), cluster_w (J,C), projs [P_i (d_i,C)] -> W_head (S+J,C), tails [(P_i, W_i (n_i,d_i))]
    """W_head = [E[shortlist]; cluster_w], W_i = E[tokens of cluster i, :d_i]: copies (gathers)."""
    if len(projs) != cmap.n_tails or cluster_w.shape[0] != cmap.n_tails:
        raise ValueError(f"adaptive head: {cmap.n_tails} tail clusters, but {cluster_w.shape[0]} cluster "
                         f"vectors and {len(projs)} projections")
    W_head = np.concatenate([E[cmap.members(0)], cluster_w])
    tails = [(P, E[cmap.members(i), :P.shape[0]]) for i, P in enumerate(projs, start=1)]
    return W_head, tails


def adaptive_weight_grads(dW_head, dtails, cmap, E_shape):
    # dW_head (S+J,C), dtails [(dP_i, dW_i)] -> dE (V,C), dcluster_w (J,C), [dP_i]
    """Forward was W_head = [E[shortlist]; cluster_w] and W_i = E[cluster i, :d_i]: each token is
    in one cluster, so every row of dE is written by exactly one of these assignments (or stays 0
    in the columns d_i.. of a tail token); a plain assignment, no np.add.at needed."""
    S = cmap.shortlist_size
    dE = np.zeros(E_shape, dtype=dW_head.dtype)
    dE[cmap.members(0)] = dW_head[:S]
    for i, (dP, dW) in enumerate(dtails, start=1):
        dE[cmap.members(i), :dW.shape[1]] = dW
    return dE, dW_head[S:], [dP for dP, _ in dtails]
