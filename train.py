"""Train nanoternary: from text to a checkpoint in one command.

    python train.py                                        # the default recipe on the default data
    python train.py --data '../shared/corpus/*.parquet' --time-budget 20 --out runs/pydocs
    python train.py --out runs/pydocs --resume             # continue an interrupted run
    python train.py --max-steps 10 --profile               # where a training step's time goes

The default data is FineWeb-Edu (downloaded in part, cached under data/), or, with no network,
Python's own documentation (nanoternary/data.py). The recipe follows FlashLM v3 (../shared/DESIGN.md):
NorMuon for the ternary core's 2-D weights, AdamW for the rest, warmup-stable-decay schedule, gradient
clipping 1.0, z-loss 1e-4, the full head's loss on a random 25% of positions, a tied embedding
initialised from GPT-2's (SVD-projected, frozen for the first 1000 steps; random and trained from
the start when GPT-2's weights cannot be downloaded). Our defaults differ in AdamW's learning rate
(3e-3, not 3e-4) and label smoothing (off, not 0.1); TrainConfig marks the reference's values in
brackets and the README shows the runs behind the choice.

Output, in --out (default out/):
    log.jsonl            one JSON object per logged step: step, tokens, train_loss, lr, elapsed, ...
                         and val_loss / val_bpb where evaluated
    latest.npz           the last checkpoint (every --save-interval steps, at the end, on Ctrl-C)
    best.npz             the checkpoint with the best validation loss so far
    loss.png             the loss curves, when matplotlib is installed (pip install matplotlib)
"""
import argparse
import dataclasses
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from nanoternary import profile, runlog
from nanoternary.checkpoint import BEST, LATEST, CheckpointError, load_checkpoint, save_checkpoint
from nanoternary.data import DataError, get_batch, prepare, val_windows
from nanoternary.fileio import atomic_open
from nanoternary.model import Model, ModelConfig
from nanoternary.optim import (EMA, AdamW, NorMuon, accumulate, clip_grad_norm, cosine_frac, split_params,
                               wsd_frac)
from nanoternary.parallel import set_threads


@dataclass
class TrainConfig:
    """Everything that defines a run; saved in every checkpoint. Reference values in brackets."""
    # data
    data: list = None              # paths/globs; None: FineWeb-Edu, or Python's docs when offline
    data_tokens: int = None        # cap on tokens read from the data (None: all; FineWeb-Edu: 32M [32M])
    val_fraction: float = 0.05     # documents held out for validation [0.05]
    data_seed: int = 0             # seeds the train/validation split (not --seed: same split, any run)
    # model (ModelConfig; the defaults are the reference's)
    head: str = "full"             # "full" 50,257-way softmax [full], or "hier" (two-level)
    hier_classes: int = 0          # hier head classes (0: sqrt(V) = 224)
    d_model: int = 256             # [256]
    glu_hidden: int = 683          # [683]
    n_recursions: int = 2          # applications of the one weight-shared block [2]
    dilations: str = "1,4,64"      # one ConvMixer layer per dilation [1,4,64]
    kernel_size: int = 4           # [4]
    conv_groups: int = 16          # [16]
    ternary_scale: bool = False    # BitNet b1.58 per-tensor scale on the ternary outputs [off]
    # batches
    batch_size: int = 8            # sequences per micro-batch
    seq_len: int = 256             # tokens per sequence (and per validation window)
    curriculum: str = ""           # e.g. "64,128,256,512" [64,128,256,512]: the run is cut in equal
                                   # parts, one per length, at constant tokens per step
    grad_accum: int = 1            # micro-batches per optimizer step
    # optimization
    lr_muon: float = 0.02          # NorMuon, the core's 2-D weights [0.02]
    lr_adam: float = 3e-3          # AdamW, everything else [3e-4]: 10x, see the README's tuning
    weight_decay: float = 0.1      # AdamW decoupled weight decay on matrices [0.1]
    schedule: str = "wsd"          # "wsd" warmup-stable-decay [wsd], or "cosine"
    warmup: int = 200              # warmup steps
    decay_frac: float = 0.1        # wsd: the last fraction of the run decays linearly to 0
    grad_clip: float = 1.0         # global gradient-norm clip [1.0]
    label_smoothing: float = 0.0   # training loss only [0.1]: off, it costs validation NLL
    z_loss: float = 1e-4           # training loss only [1e-4]
    loss_frac: float = None        # fraction of positions in the training loss [0.25]; None: 0.25
                                   # with the full head (its cost), 1.0 with the cheap hier head
    ema: float = 0.0               # EMA decay of the weights used for evaluation, 0 = off [0.999]
    embed_init: str = "gpt2"       # "gpt2" SVD-projected GPT-2 embedding [gpt2], or "random"
    freeze_embed_steps: int = -1   # steps with a frozen embedding; -1: 1000 if GPT-2's, else 0 [1000]
    # run length: stop at whichever comes first
    max_steps: int = None          # optimizer steps [~4000]; None: 4000, or no limit when
                                   # --time-budget or --max-tokens is given
    max_tokens: int = 0            # training tokens, 0 = no limit
    time_budget: float = 0.0       # minutes of wall clock, 0 = no limit
    # evaluation, logging, checkpoints
    eval_interval: int = 200       # steps between validation evaluations
    eval_tokens: int = 32768       # validation tokens per evaluation (windows of seq_len)
    log_interval: int = 10         # steps between log lines
    save_interval: int = 200       # steps between checkpoints
    out: str = "out"               # run folder
    seed: int = 0
    threads: int = 0               # batch shards in parallel (0: one per core)


RUN_LENGTH = ("max_steps", "max_tokens", "time_budget")    # may change when a run is resumed
NOT_CONFIG = ("resume", "profile", "overwrite")


class Stop(Exception):
    """Raised when training must stop without saving (a non-finite loss)."""


# ------------------------------------------------------------------------------------ helpers

def fmt_time(seconds):
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"


def int_list(text, flag):
    """"1,4,64" -> [1, 4, 64], or a ValueError naming the flag."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"{flag} takes positive integers separated by commas, like 1,4,64; got {text!r}")
    return values


def check_config(cfg):
    """Reject settings that cannot run, with a message naming the flag (before any work is done)."""
    for name in ("batch_size", "seq_len", "grad_accum", "eval_interval", "eval_tokens",
                 "log_interval", "save_interval"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.loss_frac is not None and not 0 < cfg.loss_frac <= 1:
        raise ValueError(f"--loss-frac must be in (0, 1], got {cfg.loss_frac}")
    int_list(cfg.dilations, "--dilations")
    if cfg.curriculum:
        int_list(cfg.curriculum, "--curriculum")
    model_config(cfg)                         # d_model / conv_groups / head consistency


def curriculum_len(cfg, progress):
    """Sequence length at this point of the run."""
    if not cfg.curriculum:
        return cfg.seq_len
    lengths = int_list(cfg.curriculum, "--curriculum")
    return lengths[min(int(progress * len(lengths)), len(lengths) - 1)]


def model_config(cfg):
    return ModelConfig(head=cfg.head, hier_classes=cfg.hier_classes, d_model=cfg.d_model,
                       glu_hidden=cfg.glu_hidden, n_recursions=cfg.n_recursions,
                       dilations=tuple(int_list(cfg.dilations, "--dilations")),
                       kernel_size=cfg.kernel_size, conv_groups=cfg.conv_groups,
                       ternary_scale=cfg.ternary_scale)


def lr_multiplier(cfg, progress, step):
    if cfg.schedule == "wsd":
        return wsd_frac(progress, step, cfg.warmup, cfg.decay_frac)
    return cosine_frac(progress, step, cfg.warmup)


class Run:
    """The state of a run, and what it does at each step."""

    def __init__(self, cfg, resume_from=None):
        self.cfg = cfg
        self.out = cfg.out
        os.makedirs(self.out, exist_ok=True)
        self.data = prepare(cfg.data, max_tokens=cfg.data_tokens, val_fraction=cfg.val_fraction,
                            seed=cfg.data_seed)
        if len(self.data.val) < cfg.seq_len + 1:
            raise DataError(f"the validation split of {self.data.path} has {len(self.data.val)} tokens, "
                            f"fewer than one window of {cfg.seq_len + 1}: use more data or a larger --val-fraction")
        self.val_bytes_per_token = self.data.meta["val_bytes"] / max(1, self.data.meta["val_tokens"])
        self.step, self.tokens, self.elapsed_before = 0, 0, 0.0
        self.best_val = math.inf
        self.rng = np.random.default_rng(cfg.seed)            # batches
        if resume_from:
            self._load(resume_from)
        else:
            self._new_model()
        muon_names, adam_names = split_params(self.model.params)
        self.muon = NorMuon({k: self.model.params[k] for k in muon_names}, lr=cfg.lr_muon)
        self.adam = AdamW({k: self.model.params[k] for k in adam_names}, lr=cfg.lr_adam,
                          weight_decay=cfg.weight_decay)
        self.ema = EMA(self.model.params, cfg.ema) if cfg.ema else None
        if resume_from:
            self._load_optimizers()
        n_windows = max(1, cfg.eval_tokens // cfg.seq_len)
        self.val_set = val_windows(self.data.val, min(cfg.batch_size, n_windows), cfg.seq_len,
                                   max(1, n_windows // cfg.batch_size), seed=cfg.seed)

    # -------------------------------------------------------------------- model and state

    def _new_model(self):
        cfg = self.cfg
        mcfg = model_config(cfg)
        class_map = None
        if cfg.head == "hier":
            from nanoternary.model import n_hier_classes
            from nanoternary.ops.hier_head import ClassMap
            counts = np.bincount(np.asarray(self.data.train), minlength=mcfg.vocab_size)
            class_map = ClassMap.from_counts(counts, n_hier_classes(mcfg))
        self.model = Model(mcfg, seed=cfg.seed, class_map=class_map)
        self.embed_source = "random"
        if cfg.embed_init == "gpt2":
            from nanoternary.gpt2_embed import load_gpt2_embedding
            E = load_gpt2_embedding(mcfg.d_model)
            if E is not None:
                self.model.params["embed.w"][...] = E
                self.embed_source = "gpt2"
        if cfg.freeze_embed_steps < 0:
            self.freeze_steps = 1000 if self.embed_source == "gpt2" else 0
        else:
            self.freeze_steps = cfg.freeze_embed_steps

    def meta(self, val_loss=None):
        return {
            "config": self.model.cfg.to_dict(),
            "train": dataclasses.asdict(self.cfg),
            "step": self.step, "tokens": self.tokens, "elapsed": self.elapsed(),
            "best_val": None if math.isinf(self.best_val) else self.best_val,
            "val_loss": val_loss,
            "embed_source": self.embed_source, "freeze_steps": self.freeze_steps,
            "rng": self.rng.bit_generator.state, "model_rng": self.model.rng.bit_generator.state,
            "data": {"key": self.data.meta["key"], "path": self.data.path,
                     "source": self.data.meta["source"], "train_tokens": self.data.meta["train_tokens"]},
        }

    def save(self, name=LATEST, val_loss=None):
        """latest.npz: everything needed to resume. best.npz: the weights that scored `val_loss`
        (with --ema, the averaged ones) and the same state."""
        opt = {}
        for prefix, o in (("muon/", self.muon), ("adamw/", self.adam), ("ema/", self.ema)):
            if o is not None:
                opt.update({prefix + k: v for k, v in o.state_dict().items()})
        cmap = self.model.hier.state() if self.model.hier is not None else None
        params, meta = self.model.params, self.meta(val_loss)
        if name == BEST and self.ema is not None:
            params, meta["weights"] = self.ema.shadow, "ema"
        save_checkpoint(os.path.join(self.out, name), params, meta, opt, cmap)

    def _load(self, path):
        from nanoternary.checkpoint import load_model
        self.model = load_model(path)
        meta = self.model.meta
        if meta.get("data", {}).get("key") != self.data.meta["key"]:
            raise CheckpointError(
                f"{path} was trained on {meta.get('data', {}).get('path')} but this run's data is "
                f"{self.data.path}: resume with the same --data (and --data-tokens, --val-fraction, --seed)")
        self.step, self.tokens = meta["step"], meta["tokens"]
        self.elapsed_before = meta["elapsed"]
        self.best_val = math.inf if meta.get("best_val") is None else meta["best_val"]
        self.embed_source, self.freeze_steps = meta["embed_source"], meta["freeze_steps"]
        self.rng.bit_generator.state = meta["rng"]
        self.model.rng.bit_generator.state = meta["model_rng"]
        self._resume_path = path

    def _load_optimizers(self):
        _, _, opt, _ = load_checkpoint(self._resume_path)
        for prefix, o in (("muon/", self.muon), ("adamw/", self.adam), ("ema/", self.ema)):
            part = {k[len(prefix):]: v for k, v in opt.items() if k.startswith(prefix)}
            if o is not None:
                if not part:
                    raise CheckpointError(f"{self._resume_path} has no {prefix[:-1]} state to resume from")
                o.load_state_dict(part)

    # -------------------------------------------------------------------- the loop

    def elapsed(self):
        return self.elapsed_before + (time.time() - self.t0 if hasattr(self, "t0") else 0.0)

    def progress(self):
        """Fraction of the run done: the largest of steps, tokens and wall clock used."""
        c = self.cfg
        p = [self.step / c.max_steps] if c.max_steps else []
        if c.max_tokens:
            p.append(self.tokens / c.max_tokens)
        if c.time_budget:
            p.append(self.elapsed() / (60.0 * c.time_budget))
        return max(p) if p else 0.0

    def train_step(self):
        cfg, model = self.cfg, self.model
        progress = self.progress()
        T = curriculum_len(cfg, progress)
        B = max(1, cfg.batch_size * cfg.seq_len // T)         # constant tokens per step
        train_embed = self.step >= self.freeze_steps
        loss_frac = cfg.loss_frac if cfg.loss_frac is not None else (0.25 if cfg.head == "full" else 1.0)
        loss, grads = 0.0, {}
        for _ in range(cfg.grad_accum):               # the mean over micro-batches
            x, y = get_batch(self.data.train, B, T, self.rng)
            l, g = model.loss_and_grads(x, y, label_smoothing=cfg.label_smoothing, z_loss=cfg.z_loss,
                                        loss_frac=loss_frac, train_embed=train_embed)
            if not math.isfinite(l):
                raise Stop(f"step {self.step + 1}: the training loss is {l}")
            loss += l / cfg.grad_accum
            grads = g if cfg.grad_accum == 1 else accumulate(grads, g, 1.0 / cfg.grad_accum)
        norm = clip_grad_norm(grads, cfg.grad_clip) if cfg.grad_clip else float("nan")
        if cfg.grad_clip and not math.isfinite(norm):
            raise Stop(f"step {self.step + 1}: the gradient norm is {norm}")
        mult = lr_multiplier(cfg, progress, self.step)
        with profile.section("optimizer"):
            self.muon.step(model.params, grads, lr=cfg.lr_muon * mult)
            self.adam.step(model.params, grads, lr=cfg.lr_adam * mult)
            if self.ema is not None:
                self.ema.update(model.params)
        self.step += 1
        self.tokens += cfg.grad_accum * B * T
        return loss, mult, norm

    def evaluate(self):
        """Mean NLL (nats/token, no smoothing) over the fixed validation windows, and bits per byte:
        the NLL in bits divided by the validation split's bytes per token (its UTF-8 text bytes over
        its tokens, separators included), so the windows stand for the whole split."""
        def nll():
            return float(np.mean([self.model.loss(x, y) for x, y in self.val_set]))
        was_profiling = profile.enabled()
        profile.enable(False)                          # --profile measures training steps only
        try:
            if self.ema is not None:
                with self.ema.swapped(self.model.params):
                    v = nll()
            else:
                v = nll()
        finally:
            profile.enable(was_profiling)
        return v, v / math.log(2) / self.val_bytes_per_token

    def done(self):
        c = self.cfg
        return ((c.max_steps and self.step >= c.max_steps) or (c.max_tokens and self.tokens >= c.max_tokens)
                or (c.time_budget and self.elapsed() >= 60.0 * c.time_budget))


# ------------------------------------------------------------------------------------ records

def plot_losses(out):
    """loss.png from log.jsonl, if matplotlib is installed (an optional extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    recs = runlog.read(os.path.join(out, "log.jsonl"))
    tr = [(r["elapsed"] / 60, r["train_loss"]) for r in recs if "train_loss" in r]
    va = [(r["elapsed"] / 60, r["val_loss"]) for r in recs if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train (training objective)", alpha=0.6)
    if va:
        ax.plot(*zip(*va), "o-", label="validation NLL")
    ax.set_xlabel("minutes")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    path = os.path.join(out, "loss.png")
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------ main

def prepare_out(cfg, resuming, overwrite):
    """A new run must not mix with an old one's files: refuse, unless --overwrite removes them."""
    os.makedirs(cfg.out, exist_ok=True)
    old = [f for f in (LATEST, BEST, "log.jsonl", "loss.png") if os.path.exists(os.path.join(cfg.out, f))]
    if resuming or not old:
        return
    if not overwrite:
        raise CheckpointError(f"{cfg.out}/ already holds a run ({', '.join(old)}): continue it with "
                              f"--resume, start over with --overwrite, or choose another --out")
    for f in old:
        os.remove(os.path.join(cfg.out, f))


def train(cfg, resume_from=None, show_profile=False, overwrite=False):
    prepare_out(cfg, resume_from is not None, overwrite)
    set_threads(cfg.threads)
    run = Run(cfg, resume_from)
    model, log_path = run.model, os.path.join(cfg.out, "log.jsonl")
    if resume_from:
        runlog.trim(log_path, run.step)
        print(f"resuming {resume_from} at step {run.step:,} ({run.tokens:,} tokens, {fmt_time(run.elapsed_before)})")
    print(f"data: {run.data.meta['source']} | train {len(run.data.train):,} tokens | "
          f"val {len(run.data.val):,} tokens | {run.data.path}")
    print(f"model: {model.param_counts()['total']:,} parameters | head {model.cfg.head} | "
          f"embedding {run.embed_source} (frozen for {run.freeze_steps} steps) | {model.workers} thread(s)")
    print(f"run: batch {cfg.batch_size} x {cfg.seq_len} x accum {cfg.grad_accum} | "
          f"max {cfg.max_steps or '-'} steps, {cfg.max_tokens or '-'} tokens, "
          f"{str(cfg.time_budget) + ' min' if cfg.time_budget else '-'} | out {cfg.out}/")

    stop = {"signal": None}

    def on_signal(signum, frame):
        if stop["signal"] is not None:        # a second Ctrl-C: stop right now
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name
        print(f"\n{stop['signal']}: finishing this step, saving a checkpoint and stopping "
              f"(again to stop at once)", flush=True)

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    profile.enable(show_profile)
    run.t0 = time.time()
    step_time, steps_timed, tok_last = 0.0, 0, run.tokens    # training steps only, since the last line
    p0 = run.progress()
    last_val = None
    status = "finished"
    try:
        while not run.done() and stop["signal"] is None:
            t_step = time.time()
            loss, mult, norm = run.train_step()
            step_time += time.time() - t_step
            steps_timed += 1
            last = run.done()                  # decided once: the final step logs, evaluates, saves
            rec = None
            if run.step % cfg.log_interval == 0 or run.step == 1 or last:
                ms = 1000 * step_time / steps_timed
                tps = (run.tokens - tok_last) / max(step_time, 1e-9)
                step_time, steps_timed, tok_last = 0.0, 0, run.tokens
                p = run.progress()
                eta = (run.elapsed() - run.elapsed_before) / (p - p0) * (1 - p) if p > p0 else 0
                print(f"step {run.step:>5} | loss {loss:.3f} | lr {cfg.lr_adam * mult:.1e} | "
                      f"{ms:,.0f} ms | {tps:,.0f} tok/s | {fmt_time(run.elapsed())} | eta {fmt_time(eta)}",
                      flush=True)
                rec = {"step": run.step, "tokens": run.tokens, "train_loss": round(loss, 5),
                       "lr_mult": round(mult, 5), "grad_norm": round(norm, 4),
                       "tok_per_s": round(tps, 1), "elapsed": round(run.elapsed(), 2)}
            if run.step % cfg.eval_interval == 0 or last:
                last_val, bpb = run.evaluate()
                print(f"step {run.step:>5} | val loss {last_val:.4f} | val bpb {bpb:.4f}", flush=True)
                rec = rec or {"step": run.step, "tokens": run.tokens, "train_loss": round(loss, 5),
                              "elapsed": round(run.elapsed(), 2)}
                rec.update(val_loss=round(last_val, 5), val_bpb=round(bpb, 5))
                if last_val < run.best_val:
                    run.best_val = last_val
                    run.save(BEST, last_val)
            if rec:
                runlog.append(log_path, rec)
            if run.step % cfg.save_interval == 0 or last:
                run.save(LATEST, last_val)
                if "val_loss" in (rec or {}):
                    plot_losses(cfg.out)
        if stop["signal"] is not None:
            run.save(LATEST, last_val)
            status = f"stopped by {stop['signal']}"
    except Stop as e:
        last = os.path.join(cfg.out, LATEST)
        kept = f"the last good checkpoint is {last}" if os.path.exists(last) else "no checkpoint was saved"
        print(f"error: {e}; stopping ({kept})", file=sys.stderr)
        return 1
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        profile.enable(False)
    png = plot_losses(cfg.out) if os.path.exists(log_path) else None
    saved = [f"{cfg.out}/{f}" for f in (LATEST, BEST) if os.path.exists(os.path.join(cfg.out, f))]
    print(f"{status}: {run.step:,} steps, {run.tokens:,} tokens in {fmt_time(run.elapsed())}"
          + (f" | best val loss {run.best_val:.4f}" if math.isfinite(run.best_val) else "")
          + f" | checkpoints {', '.join(saved)}" + (f" | curves {png}" if png else ""))
    if show_profile:
        print("where the time went (share of the training steps' CPU time):")
        for k, v in profile.shares().items():
            print(f"  {k:<18} {100 * v:5.1f}%")
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to every flag's help, unless the help already names its default."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def build_parser():
    d = TrainConfig()
    ap = argparse.ArgumentParser(description="Train nanoternary (FlashLM v3 in NumPy).",
                                 formatter_class=HelpFormatter)
    g = ap.add_argument_group("data")
    g.add_argument("--data", action="append", help="parquet/jsonl/txt paths or globs, repeatable "
                   "(default: FineWeb-Edu, or Python's docs when offline)")
    g.add_argument("--data-tokens", type=int, help="cap on tokens read from the data (default: all)")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction, help="documents held out")
    g = ap.add_argument_group("model")
    g.add_argument("--head", choices=["full", "hier"], default=d.head, help="output head")
    g.add_argument("--hier-classes", type=int, default=d.hier_classes, help="hier head classes (0: sqrt(V))")
    g.add_argument("--d-model", type=int, default=d.d_model, help="model width")
    g.add_argument("--glu-hidden", type=int, default=d.glu_hidden, help="TernaryGLU inner width")
    g.add_argument("--n-recursions", type=int, default=d.n_recursions, help="applications of the shared block")
    g.add_argument("--dilations", default=d.dilations, help="ConvMixer dilations, comma-separated")
    g.add_argument("--kernel-size", type=int, default=d.kernel_size, help="conv taps")
    g.add_argument("--conv-groups", type=int, default=d.conv_groups, help="conv groups")
    g.add_argument("--ternary-scale", action="store_true", help="BitNet b1.58 per-tensor scale (default off)")
    g = ap.add_argument_group("batches")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per micro-batch")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence")
    g.add_argument("--curriculum", default=d.curriculum, help="sequence lengths over the run, e.g. 64,128,256,512")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step")
    g = ap.add_argument_group("optimization")
    g.add_argument("--lr-muon", type=float, default=d.lr_muon, help="NorMuon learning rate (core matrices)")
    g.add_argument("--lr-adam", type=float, default=d.lr_adam, help="AdamW learning rate (the rest)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    g.add_argument("--schedule", choices=["wsd", "cosine"], default=d.schedule, help="learning-rate schedule")
    g.add_argument("--warmup", type=int, default=d.warmup, help="warmup steps")
    g.add_argument("--decay-frac", type=float, default=d.decay_frac, help="wsd: final fraction that decays")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="global gradient-norm clip (0: off)")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="training loss only")
    g.add_argument("--z-loss", type=float, default=d.z_loss, help="training loss only")
    g.add_argument("--loss-frac", type=float, default=d.loss_frac,
                   help="fraction of positions in the loss (default: 0.25 with the full head, 1.0 with hier)")
    g.add_argument("--ema", type=float, default=d.ema, help="EMA decay for evaluation weights (0: off)")
    g.add_argument("--embed-init", choices=["gpt2", "random"], default=d.embed_init, help="embedding init")
    g.add_argument("--freeze-embed-steps", type=int, default=d.freeze_embed_steps,
                   help="steps with a frozen embedding (-1: 1000 with GPT-2's, else 0)")
    g = ap.add_argument_group("run length (the first limit reached stops the run)")
    g.add_argument("--max-steps", type=int, default=d.max_steps,
                   help="optimizer steps, 0: no limit (default: 4000, or no limit with --time-budget "
                        "or --max-tokens)")
    g.add_argument("--max-tokens", type=int, default=d.max_tokens, help="training tokens (0: no limit)")
    g.add_argument("--time-budget", type=float, default=d.time_budget, help="minutes of wall clock (0: no limit)")
    g = ap.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval-interval", type=int, default=d.eval_interval, help="steps between evaluations")
    g.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="validation tokens per evaluation")
    g.add_argument("--log-interval", type=int, default=d.log_interval, help="steps between log lines")
    g.add_argument("--save-interval", type=int, default=d.save_interval, help="steps between checkpoints")
    g.add_argument("--out", default=d.out, help="run folder")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its latest.npz")
    g.add_argument("--overwrite", action="store_true", help="start a new run in an --out that holds one")
    g = ap.add_argument_group("machine")
    g.add_argument("--seed", type=int, default=d.seed, help="seeds the init, the batches and the positions")
    g.add_argument("--data-seed", type=int, default=d.data_seed, help="seeds the train/validation split")
    g.add_argument("--threads", type=int, default=d.threads, help="batch shards in parallel (0: one per core)")
    g.add_argument("--profile", action="store_true", help="print each component's share of the step time")
    return ap


def config_from_args(argv=None):
    """-> (TrainConfig, resume path or None, profile flag, overwrite flag). On --resume the saved
    config is used, with only the run-length flags (and --threads) allowed to change."""
    ap = build_parser()
    args = ap.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k not in NOT_CONFIG}
    bare = build_parser()                         # parse again without defaults: the flags given
    for action in bare._actions:                  # on the command line, however they were spelled
        action.default = argparse.SUPPRESS
    explicit = set(vars(bare.parse_args(argv)))
    if not args.resume:
        if given["max_steps"] is None:
            given["max_steps"] = 0 if (given["time_budget"] or given["max_tokens"]) else 4000
        cfg = TrainConfig(**given)
        check_config(cfg)
        return cfg, None, args.profile, args.overwrite
    path = os.path.join(args.out, LATEST)
    if not os.path.exists(path):
        raise CheckpointError(f"--resume: no checkpoint {path} to resume; start the run without --resume")
    _, meta, _, _ = load_checkpoint(path)
    saved = dict(meta["train"])
    for k in explicit - set(NOT_CONFIG) - {"out"}:
        if k in RUN_LENGTH or k == "threads":
            saved[k] = given[k]
        elif given[k] != saved.get(k):
            raise CheckpointError(f"--resume: this run was started with --{k.replace('_', '-')} "
                                  f"{saved.get(k)}, not {given[k]}; to change it, start a new run "
                                  f"in another --out folder")
    saved["out"] = args.out
    if saved["max_steps"] is None:
        saved["max_steps"] = 0
    return TrainConfig(**saved), path, args.profile, False


def main(argv=None):
    try:
        cfg, resume, show_profile, overwrite = config_from_args(argv)
        return train(cfg, resume, show_profile, overwrite)
    except (DataError, CheckpointError, ValueError, OSError) as e:    # OSError: e.g. --out is a file
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:                  # before training started, or a second Ctrl-C
        print("\ninterrupted: stopped at once; checkpoints already saved are intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
