"""Train nanoternary: from text to a checkpoint in one command.

    python train.py                                  # the default recipe on the default data
    python train.py --data 'my-corpus/*.parquet' --time-budget 20 --out runs/mine
    python train.py --out runs/mine --resume         # continue an interrupted run
    python train.py --plain                          # the same steps, through the plain code
    mpiexec -n 2 python train.py ...                 # several processes (pip install -e ".[mpi]")

The last stop of the reading path, top to bottom: the settings (the architecture's are ModelConfig
in model.py), the model and its optimizers, one training step, the evaluation, the loop. A step is
Model.loss_and_grads, then the optimizers of optim.py. By default the same functions run through
nanoternary/fast/ (every core, a fused head, several processes under mpiexec; tests prove the steps
equal); --plain runs the plain code as written, in one thread. The recipe is FlashLM v3's
(reference values in brackets; docs/learning.md shows the runs behind our two changes).

What a run needs besides -- the run folder and its lock, resuming, checkpoints, log lines and
log.jsonl, Ctrl-C, several processes, errors and exit status -- is nanoternary/run.py's, and a
reader can skip it. Output, in --out: log.jsonl, latest.npz, best.npz, loss.png (with matplotlib).
"""
import contextlib
import functools
import math
import sys
import time
from dataclasses import dataclass

import numpy as np

from nanoternary import config, run
from nanoternary.checkpoint import load_model
from nanoternary.config import setting
from nanoternary.data import get_batch, val_windows
from nanoternary.fast import step as fast
from nanoternary.fast.dist import WIRES
from nanoternary.fast.optim import FastAdamW, FastEMA, FastNorMuon
from nanoternary.gpt2_embed import load_gpt2_embedding
from nanoternary.model import Model, ModelConfig, head_map
from nanoternary.optim import EMA, AdamW, NorMuon, accumulate, clip_grad_norm, cosine, split_params, wsd


@dataclass
class TrainConfig:
    """Everything that defines a run besides the architecture (ModelConfig); both are saved in
    every checkpoint. Reference values in brackets."""
    data: list = setting(None, "parquet/jsonl/txt paths or globs, repeatable (default: FineWeb-Edu, or "
                         "Python's docs when offline)", group="data")
    data_tokens: int = setting(None, "cap on tokens read (default: all; FineWeb-Edu: 32M)", range="[1, inf)")
    val_fraction: float = setting(0.05, "documents held out for validation [0.05]", range="(0, 1)")
    data_seed: int = setting(0, "seeds the train/validation split (the same for any --seed)", range="[0, inf)")
    cache_dir: str = setting("data", "where the token caches go (data/tokens/)")
    batch_size: int = setting(8, "sequences per micro-batch, all processes together", range="[1, inf)",
                              group="batches")
    seq_len: int = setting(256, "tokens per sequence (and per validation window)", range="[1, inf)")
    curriculum: tuple = setting((), "lengths over the run at constant tokens per step [64,128,256,512]",
                                range="[1, inf)")
    grad_accum: int = setting(1, "micro-batches per optimizer step", range="[1, inf)")
    lr_muon: float = setting(0.02, "NorMuon lr, the core's 2-D weights [0.02]", range="(0, inf)",
                             group="optimization")
    lr_adam: float = setting(3e-3, "AdamW lr, everything else [3e-4]", range="(0, inf)")
    core_optimizer: str = setting("normuon", "for the core's 2-D weights: NorMuon [normuon], or AdamW at --lr-adam",
                                  choices=("normuon", "adamw"))
    weight_decay: float = setting(0.1, "AdamW decoupled weight decay on matrices [0.1]", range="[0, inf)")
    schedule: str = setting("wsd", "warmup-stable-decay [wsd], or cosine", choices=("wsd", "cosine"))
    warmup: int = setting(200, "warmup steps", range="[0, inf)")
    decay_frac: float = setting(0.1, "wsd: the last fraction of the run decays linearly to 0", range="[0, 1]")
    grad_clip: float = setting(1.0, "global gradient-norm clip, 0: off [1.0]", range="[0, inf)")
    label_smoothing: float = setting(0.0, "training loss only [0.1]", range="[0, 1)")
    z_loss: float = setting(1e-4, "training loss only [1e-4]", range="[0, inf)")
    loss_frac: float = setting(None, "fraction of positions in the loss (default: 0.25 [0.25] with the full "
                               "head, 1 with the hier and adaptive heads)", range="(0, 1]")
    ema: float = setting(0.0, "EMA decay of the weights evaluated, 0: off [0.999]", range="[0, 1)")
    embed_init: str = setting("gpt2", "GPT-2's embedding, SVD-projected [gpt2], or random", choices=("gpt2", "random"))
    freeze_embed_steps: int = setting(None, "steps with a frozen embedding (default: 1000 [1000] with GPT-2's, "
                                      "0 with a random one or a checkpoint's)", range="[0, inf)")
    init_from: str = setting(None, "a new run from this checkpoint's weights and architecture (fine-tuning): "
                             "its own data, optimizer state, schedule and --out")
    max_steps: int = setting(None, "optimizer steps, 0: no limit (default: 4000 [~4000], no limit with "
                             "--time-budget or --max-tokens)", range="[0, inf)", group="run length")
    max_tokens: int = setting(0, "training tokens, 0: no limit", range="[0, inf)")
    time_budget: float = setting(0.0, "minutes of wall clock, 0: no limit", range="[0, inf)")
    eval_interval: int = setting(200, "steps between validation evaluations", range="[1, inf)",
                                 group="evaluation, logging, checkpoints")
    eval_tokens: int = setting(32768, "validation tokens per evaluation", range="[1, inf)")
    log_interval: int = setting(10, "steps between log lines", range="[1, inf)")
    save_interval: int = setting(200, "steps between checkpoints", range="[1, inf)")
    out: str = setting("out", "run folder")
    seed: int = setting(0, "seeds the init, the batches and the counted positions", range="[0, inf)",
                        group="machine")
    threads: int = setting(0, "cores per process, 0: all (under mpiexec: shared by the machine's processes)",
                           range="[0, inf)")
    dtype: str = setting("float32", "of the weights and the step (float64: exact comparisons)",
                         choices=("float32", "float64"))
    plain: bool = setting(False, "train through Model.loss_and_grads and optim.py in one thread: the code "
                          "of the reading path, the same steps as the default, slower")
    grad_wire: str = setting("full", "under mpiexec, the gradients cross between processes in full (their "
                             "dtype), or as bfloat16: half the bytes, the sums in float32 (docs/mpi.md)",
                             choices=WIRES)
    peer_timeout: float = setting(30.0, "under mpiexec, seconds of silence after which a process counts as "
                                  "lost and the job stops (0: wait forever)", range="[0, inf)")

    def __post_init__(self):
        self.curriculum = tuple(self.curriculum)
        config.check(self)


def resolve_defaults(cfg, head, embed_source):
    """The defaults that depend on other settings, resolved once, when a run starts (the resolved
    values are saved with it): the loss fraction on the head, the steps with a frozen embedding on
    where the embedding came from, the step limit on the other limits."""
    if cfg.loss_frac is None:
        cfg.loss_frac = 0.25 if head == "full" else 1.0
    if cfg.freeze_embed_steps is None:
        cfg.freeze_embed_steps = 1000 if embed_source == "gpt2" else 0
    if cfg.max_steps is None:
        cfg.max_steps = 0 if (cfg.time_budget or cfg.max_tokens) else 4000


def build_model(cfg, model_cfg, data):
    """A new model: the cheap heads' token groups from the training tokens' counts, the embedding from
    GPT-2's when it can be had; or with --init-from a trained model's weights (its architecture:
    run.py refused model flags that disagree). -> (model, "gpt2", "random" or "checkpoint")."""
    if cfg.init_from:
        model = load_model(cfg.init_from, cfg.dtype)
        model.rng = np.random.default_rng(cfg.seed)           # this run's counted positions
        return model, "checkpoint"
    counts = np.bincount(np.asarray(data.train), minlength=model_cfg.vocab_size)    # for head_map
    model = Model(model_cfg, seed=cfg.seed, dtype=cfg.dtype, class_map=head_map(model_cfg, counts))
    E = load_gpt2_embedding(model_cfg.d_model) if cfg.embed_init == "gpt2" else None
    if E is not None:
        model.params["embed.w"][...] = E
    return model, "random" if E is None else "gpt2"


def build_optimizers(cfg, params):
    """NorMuon for the core's matrices, AdamW for the rest (optim.split_params), and the EMA."""
    Muon, Adam, Ema = (NorMuon, AdamW, EMA) if cfg.plain else (FastNorMuon, FastAdamW, FastEMA)
    muon_names, adam_names = split_params(params)
    if cfg.core_optimizer == "adamw":                             # AdamW for everything
        muon_names, adam_names = [], list(params)
    opt = {"muon": Muon({k: params[k] for k in muon_names}, lr=cfg.lr_muon),
           "adamw": Adam({k: params[k] for k in adam_names}, lr=cfg.lr_adam, weight_decay=cfg.weight_decay)}
    if cfg.ema:
        opt["ema"] = Ema(params, cfg.ema)
    return opt


def batch_shape(cfg, progress):
    """(B, T) of a step: with a curriculum, its lengths in equal parts of the run, at constant tokens."""
    lengths = cfg.curriculum or (cfg.seq_len,)
    T = lengths[min(int(progress * len(lengths)), len(lengths) - 1)]
    return max(1, cfg.batch_size * cfg.seq_len // T), T


def train_step(model, opt, loss_and_grads, data, cfg, r):
    """One optimizer step -> (mean loss, learning-rate multiplier, gradient norm, tokens)."""
    B, T = batch_shape(cfg, r.progress())
    loss, grads = 0.0, {}
    for _ in range(cfg.grad_accum):                               # the mean over micro-batches
        x, y = get_batch(data.train, B, T, r.rng)                 # (B, T) inputs, targets = x shifted
        l, g = loss_and_grads(model, x, y, label_smoothing=cfg.label_smoothing, z_loss=cfg.z_loss,
                              loss_frac=cfg.loss_frac, train_embed=r.step >= cfg.freeze_embed_steps)
        loss += l / cfg.grad_accum
        accumulate(grads, g, 1.0 / cfg.grad_accum)
    norm = clip_grad_norm(grads, cfg.grad_clip)                   # 0: no clipping, only the norm
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise run.Diverged(f"step {r.step + 1}: the training loss is {loss}, the gradient norm {norm}")
    if cfg.schedule == "wsd":
        mult = wsd(r.progress(), r.step, cfg.warmup, cfg.decay_frac)
    else:
        mult = cosine(r.progress(), r.step, cfg.warmup)
    opt["muon"].step(model.params, grads, lr=cfg.lr_muon * mult)
    opt["adamw"].step(model.params, grads, lr=cfg.lr_adam * mult)  # a frozen embedding: no grad, no step
    if "ema" in opt:
        opt["ema"].update(model.params)
    return loss, mult, norm, cfg.grad_accum * B * T


def evaluate(model, val_set, nll, ema, comm):
    """Mean NLL in nats per token (never smoothed) over the fixed validation windows, with the EMA's
    averaged weights when there is one; several processes share the windows."""
    with ema.swapped(model.params) if ema else contextlib.nullcontext():
        nlls = [nll(model, x, y) for x, y in val_set[comm.rank::comm.size]]
    total = comm.allreduce_(np.array([sum(n.sum() for n in nlls), sum(n.size for n in nlls)], np.float64))
    return float(total[0] / total[1])


def train(r):
    """Train until a limit (steps, tokens, minutes) or Ctrl-C. `r` is the run's bookkeeping
    (run.py): its settings, data, counters, clock, log, checkpoints and processes."""
    cfg, data = r.cfg, r.data
    # a new model, built on rank 0 and the same on every process; or the resumed run's
    model, embed_source = r.resumed or r.on_rank0(build_model, cfg, r.model_cfg, data)
    resolve_defaults(cfg, model.cfg.head, embed_source)
    opt = build_optimizers(cfg, model.params)
    if cfg.plain:                                 # the code of the reading path, as written
        loss_and_grads, nll = Model.loss_and_grads, Model.nll
    else:                                         # the same, on every core and every process
        loss_and_grads, nll = functools.partial(fast.loss_and_grads, comm=r.comm, wire=cfg.grad_wire), fast.nll
    n_windows = max(1, cfg.eval_tokens // cfg.seq_len)
    val_set = val_windows(data.val, min(cfg.batch_size, n_windows), cfg.seq_len,
                          max(1, n_windows // cfg.batch_size), seed=cfg.seed)
    r.start(model, opt, embed_source)             # a resumed run: its optimizers' and generators' state

    while not r.done():                           # a limit reached, or Ctrl-C
        t0 = time.time()
        with r.profiled():                        # --profile: the share of each part of the step
            loss, mult, norm, tokens = train_step(model, opt, loss_and_grads, data, cfg, r)
        r.step_done(loss, cfg.lr_adam * mult, norm, tokens, time.time() - t0)   # the log line
        if r.step % cfg.eval_interval == 0 or r.last:
            r.evaluated(evaluate(model, val_set, nll, opt.get("ema"), r.comm))   # best.npz
        if r.step % cfg.save_interval == 0 or r.last:
            r.save()                              # latest.npz: Ctrl-C saves too, in run.py


def main(argv=None):
    """The command line: the settings, the run folder, train(), and one line for any error."""
    return run.main(argv, TrainConfig, ModelConfig, train)


if __name__ == "__main__":
    sys.exit(main())
