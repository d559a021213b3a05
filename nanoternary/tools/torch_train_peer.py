"""Train the PyTorch peer (torch_peer.py) with the reference's recipe, for a wall-clock budget, on
the same data as train.py: the figure our own runs are compared with.

    python -m nanoternary.tools.torch_train_peer --minutes 20 --out out/peer.jsonl
    python -m nanoternary.tools.torch_train_peer --data 'corpus/*.parquet' --minutes 20 --out peer.jsonl

Run it from the repository root, like train.py: the data come through nanoternary's own pipeline
(nanoternary.data.prepare, token cache in data/tokens/), so the peer trains on exactly train.py's
train split (default data: FineWeb-Edu, or offline Python's own documentation; --data as train.py's,
repeatable paths or globs; the split is train.py's default, 5% of documents with data seed 0) and is
evaluated on the same kind of validation set as train.py builds: 32,768 tokens in windows of 256,
batches of 8, drawn with the run's --seed (nanoternary.data.val_windows).

The recipe (FlashLM v3's):
    NorMuon lr 0.02 for the 2-D core weights (the ternary latents mix.out, glu.gate/up/down);
    torch AdamW lr 3e-4, betas (0.9, 0.95), weight decay 0.1 for the rest (embedding, conv
    kernels, RMSNorm gains: all decayed, as the reference peer does; nanoternary's AdamW spares
    the 1-D gains);
    warmup 200 steps, then constant, then linear decay to 0 over the last 10% of the budget;
    gradient-norm clip 1.0; label smoothing 0.1 and z-loss 1e-4 in the training loss; the loss on
    a random 25% of positions; batch 4 x grad-accum 4 x seq 128. The embedding is random and trained
    from the start (GPT-2's cannot be fetched offline).

Output, one JSON line per record in --out: {step, tokens, elapsed, train_loss} at step 1 and every
100 steps (train_loss: the training objective, with smoothing and z-loss, averaged over the
micro-batches), with val_loss (mean NLL in nats/token, no smoothing, every position) at step 1 and
every 500 steps, and a last line with val_loss and "final": true (also printed). Elapsed time
includes the evaluations.

Like torch_peer.py, a second implementation to measure against (as llm.c keeps a PyTorch
reference); nothing in the nanoternary package imports it. Needs torch (`pip install -e ".[peer]"`).
"""
import argparse
import json
import math
import time

import numpy as np
import torch

from nanoternary.data import get_batch, prepare, val_windows
from nanoternary.tools.torch_peer import TorchFlashLM

# the recipe
LR_MUON, LR_ADAM, BETAS, WEIGHT_DECAY = 0.02, 3e-4, (0.9, 0.95), 0.1
WARMUP, DECAY_FRAC, CLIP = 200, 0.1, 1.0
LABEL_SMOOTHING, Z_LOSS, LOSS_FRAC = 0.1, 1e-4, 0.25
BATCH, GRAD_ACCUM, SEQ_LEN = 4, 4, 128
# evaluation, as train.py's defaults: eval_tokens 32768 in windows of seq_len 256, batches of 8
EVAL_TOKENS, EVAL_SEQ_LEN, EVAL_BATCH = 32768, 256, 8
LOG_EVERY, EVAL_EVERY = 100, 500


def newton_schulz5(G, steps=5):
    """~ the orthogonal factor U V^T of G (Keller Jordan's quintic iteration, as in Muon)."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G / (G.norm() + 1e-7)
    tr = X.size(0) > X.size(1)
    if tr:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.T if tr else X


class NorMuon(torch.optim.Optimizer):
    """Orthogonalised momentum, each row divided by its running RMS, rescaled to RMS 0.2 * lr per
    entry. nanoternary.optim.NorMuon is the same update (its docstring explains it). The per-row
    second moment is kept in the parameter's dtype (the reference's kept it in float32 always)."""

    def __init__(self, params, lr=0.02, momentum=0.95, beta2=0.999):
        super().__init__(params, dict(lr=lr, momentum=momentum, beta2=beta2))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["m"] = torch.zeros_like(p)
                    st["v"] = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
                st["m"].mul_(g["momentum"]).add_(p.grad, alpha=1 - g["momentum"])
                O = newton_schulz5(st["m"])
                st["v"].mul_(g["beta2"]).add_((O * O).mean(1), alpha=1 - g["beta2"])
                O = O / (st["v"].sqrt()[:, None] + 1e-8)
                scale = 0.2 * math.sqrt(O.numel()) / (O.norm() + 1e-8)
                p.add_(O, alpha=-g["lr"] * scale)


def lr_multiplier(step, progress):
    """Warmup (step+1)/WARMUP, then 1, then linear to 0 over the last DECAY_FRAC of the run."""
    decay = 1.0 if progress < 1 - DECAY_FRAC else max(0.0, (1 - progress) / DECAY_FRAC)
    return min(1.0, (step + 1) / WARMUP) * decay


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m nanoternary.tools.torch_train_peer",
                                 description="Train the PyTorch peer with the reference recipe.")
    ap.add_argument("--data", action="append", default=None,
                    help="paths or globs as train.py's --data (repeatable); default: train.py's default data")
    ap.add_argument("--minutes", type=float, default=20.0, help="wall-clock budget")
    ap.add_argument("--out", required=True, help="JSON-lines log")
    ap.add_argument("--seed", type=int, default=0, help="seeds the init, the batches, the positions "
                                                        "and the validation windows (as train.py's --seed)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (tests)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    data = prepare(a.data)                     # train.py's defaults: val_fraction 0.05, data seed 0
    n_windows = max(1, EVAL_TOKENS // EVAL_SEQ_LEN)
    val_set = val_windows(data.val, min(EVAL_BATCH, n_windows), EVAL_SEQ_LEN,
                          max(1, n_windows // EVAL_BATCH), seed=a.seed)
    rng = np.random.default_rng(a.seed)        # batches and counted positions

    m = TorchFlashLM()
    core2d = [p for n, p in m.named_parameters() if p.ndim == 2 and not n.startswith("embed")]
    rest = [p for p in m.parameters() if not any(p is q for q in core2d)]
    muon = NorMuon(core2d, lr=LR_MUON)
    adam = torch.optim.AdamW(rest, lr=LR_ADAM, betas=BETAS, weight_decay=WEIGHT_DECAY)
    print(f"data: {data.path} | train {len(data.train):,} tokens | val {sum(x.size for x, _ in val_set):,} "
          f"tokens in {len(val_set)} batches | model: {sum(p.numel() for p in m.parameters()):,} parameters")

    def evaluate():
        with torch.no_grad():
            return float(np.mean([m.loss(x, y).item() for x, y in val_set]))

    budget = a.minutes * 60
    step = tokens = 0
    N = BATCH * SEQ_LEN
    n_rows = max(1, int(round(N * LOSS_FRAC)))
    t0 = time.time()
    with open(a.out, "w") as log:
        def record(**rec):
            log.write(json.dumps(rec) + "\n")
            log.flush()
            return rec

        while True:
            elapsed = time.time() - t0
            if elapsed > budget or (a.max_steps is not None and step >= a.max_steps):
                break
            progress = elapsed / budget
            if a.max_steps:
                progress = max(progress, step / a.max_steps)
            mult = lr_multiplier(step, progress)
            for g in muon.param_groups:
                g["lr"] = LR_MUON * mult
            for g in adam.param_groups:
                g["lr"] = LR_ADAM * mult
            train_loss = 0.0
            for _ in range(GRAD_ACCUM):
                x, y = get_batch(data.train, BATCH, SEQ_LEN, rng)
                rows = np.sort(rng.choice(N, size=n_rows, replace=False))
                loss = m.loss(x, y, rows, label_smoothing=LABEL_SMOOTHING, z_loss=Z_LOSS)
                (loss / GRAD_ACCUM).backward()
                train_loss += loss.item() / GRAD_ACCUM
                tokens += N
            torch.nn.utils.clip_grad_norm_(m.parameters(), CLIP)
            muon.step()
            adam.step()
            muon.zero_grad(set_to_none=True)
            adam.zero_grad(set_to_none=True)
            step += 1
            if step % LOG_EVERY == 0 or step == 1:
                rec = dict(step=step, tokens=tokens, elapsed=round(time.time() - t0, 1),
                           train_loss=round(train_loss, 4))
                if step % EVAL_EVERY == 0 or step == 1:
                    rec["val_loss"] = round(evaluate(), 4)
                print(json.dumps(record(**rec)), flush=True)
        rec = record(step=step, tokens=tokens, elapsed=round(time.time() - t0, 1),   # a full record (runlog.valid),
                     train_loss=round(train_loss, 4) if step else None,              # or compare would miss it
                     val_loss=round(evaluate(), 4), final=True)
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
