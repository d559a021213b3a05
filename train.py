"""Train nanoternary: from text to a checkpoint in one command.

    python train.py                                        # the default recipe on the default data
    python train.py --data 'my-corpus/*.parquet' --time-budget 20 --out runs/mine
    python train.py --out runs/mine --resume               # continue an interrupted run
    mpiexec -n 2 python train.py ...                       # several processes (pip install -e ".[mpi]")

The default data is FineWeb-Edu (downloaded in part, cached under data/), or, with no network,
Python's own documentation (nanoternary/data.py). The recipe is FlashLM v3's (TrainConfig marks the
reference's values in brackets; docs/learning.md shows the runs behind our two changes). A step is
Model.loss_and_grads, run by nanoternary/fast/step.py on every core (the same numbers, faster),
then NorMuon and AdamW. Output, in --out: log.jsonl (one JSON object per logged step), latest.npz
(every --save-interval steps, at the end, on Ctrl-C), best.npz (best validation loss), loss.png
(with matplotlib).
"""
import argparse
import contextlib
import dataclasses
import math
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass

import numpy as np

from nanoternary import config, runlog
from nanoternary.checkpoint import (BEST, LATEST, CheckpointError, load_checkpoint, load_optimizers,
                                    optimizers_state, run_folder, save_checkpoint)
from nanoternary.classmap import ClassMap
from nanoternary.config import setting
from nanoternary.data import DataError, get_batch, prepare, val_windows
from nanoternary.fast import dist, profile
from nanoternary.fast import step as fast
from nanoternary.fast.dist import WIRES, DataParallel
from nanoternary.fast.optim import FastAdamW, FastEMA, FastNorMuon
from nanoternary.fast.threads import available_cores, default_workers, set_threads
from nanoternary.model import Model, ModelConfig, n_hier_classes
from nanoternary.optim import clip_grad_norm, cosine, split_params, wsd


@dataclass
class TrainConfig:
    """Everything that defines a run besides the architecture (ModelConfig); both are saved in
    every checkpoint. Reference values in brackets."""
    data: list = setting(None, "parquet/jsonl/txt paths or globs, repeatable (default: FineWeb-Edu, or "
                         "Python's docs when offline)", group="data")
    data_tokens: int = setting(None, "cap on tokens read (default: all; FineWeb-Edu: 32M)", range="[1, inf)")
    val_fraction: float = setting(0.05, "documents held out for validation [0.05]", range="(0, 1)")
    data_seed: int = setting(0, "seeds the train/validation split (the same for any --seed)", range="[0, inf)")
    batch_size: int = setting(8, "sequences per micro-batch, all processes together", range="[1, inf)",
                              group="batches")
    seq_len: int = setting(256, "tokens per sequence (and per validation window)", range="[1, inf)")
    curriculum: tuple = setting((), "lengths over the run at constant tokens per step [64,128,256,512]",
                                range="[1, inf)")
    grad_accum: int = setting(1, "micro-batches per optimizer step", range="[1, inf)")
    lr_muon: float = setting(0.02, "NorMuon lr, the core's 2-D weights [0.02]", range="(0, inf)",
                             group="optimization")
    lr_adam: float = setting(3e-3, "AdamW lr, everything else [3e-4]", range="(0, inf)")
    weight_decay: float = setting(0.1, "AdamW decoupled weight decay on matrices [0.1]", range="[0, inf)")
    schedule: str = setting("wsd", "warmup-stable-decay [wsd], or cosine", choices=("wsd", "cosine"))
    warmup: int = setting(200, "warmup steps", range="[0, inf)")
    decay_frac: float = setting(0.1, "wsd: the last fraction of the run decays linearly to 0", range="[0, 1]")
    grad_clip: float = setting(1.0, "global gradient-norm clip, 0: off [1.0]", range="[0, inf)")
    label_smoothing: float = setting(0.0, "training loss only [0.1]", range="[0, 1)")
    z_loss: float = setting(1e-4, "training loss only [1e-4]", range="[0, inf)")
    loss_frac: float = setting(None, "fraction of positions in the loss (default: 0.25 [0.25] with the full "
                               "head, 1 with the hier head)", range="(0, 1]")
    ema: float = setting(0.0, "EMA decay of the weights evaluated, 0: off [0.999]", range="[0, 1)")
    embed_init: str = setting("gpt2", "GPT-2's embedding, SVD-projected [gpt2], or random", choices=("gpt2", "random"))
    freeze_embed_steps: int = setting(-1, "steps with a frozen embedding (default: 1000 [1000] with GPT-2's, "
                                      "else 0)", range="[-1, inf)")
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
    grad_wire: str = setting("full", "under mpiexec, the gradients cross between processes in full (their "
                             "dtype), or as bfloat16: half the bytes, the sums in float32 (docs/mpi.md)",
                             choices=WIRES)
    peer_timeout: float = setting(30.0, "under mpiexec, seconds of silence after which a process counts as "
                                  "lost and the job stops (0: wait forever)", range="[0, inf)")

    def __post_init__(self):
        self.curriculum = tuple(self.curriculum)
        config.check(self)


CHANGEABLE = ("max_steps", "max_tokens", "time_budget", "threads", "out", "grad_wire", "peer_timeout")   # may differ on --resume


class Stop(Exception):
    """Raised when training must stop without saving (non-finite numbers)."""


def fmt_time(seconds):
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"


class Run:
    """The state of a run, and what it does at each step. `comm` (fast/dist.py) is the job's
    processes: one, or several under mpiexec, which then train one model on a batch split between
    them; rank 0 alone prints, logs and writes checkpoints."""

    def __init__(self, cfg, model_cfg, comm, resume_from=None):
        self.cfg, self.comm = cfg, comm
        self.data = dist.rank0_first(comm, lambda: prepare(cfg.data, max_tokens=cfg.data_tokens, seed=cfg.data_seed,
                                                           val_fraction=cfg.val_fraction))   # the cache, once
        # the tokens themselves (counts, CRC-32s), not the cache key, which hashes the files' paths and
        # times and so differs between machines: a machine that found other data stops the job
        tokens = [self.data.meta[k] for k in ("train_tokens", "val_tokens", "crc32")]
        if tokens != comm.bcast(tokens):
            raise DataError(f"rank {comm.rank} prepared other data than rank 0 ({self.data.path}): every "
                            f"machine needs the same --data, or a shared data/ folder")
        if len(self.data.val) < cfg.seq_len + 1:
            raise DataError(f"the validation split of {self.data.path} has {len(self.data.val)} tokens, "
                            f"fewer than one window of {cfg.seq_len + 1}: use more data or a larger --val-fraction")
        self.val_bytes_per_token = self.data.meta["val_bytes"] / max(1, self.data.meta["val_tokens"])
        self.step, self.tokens, self.elapsed_before, self.best_val, self.clock = 0, 0, 0.0, math.inf, 0.0
        self.rng = np.random.default_rng(cfg.seed)            # batches
        if comm.rank == 0:
            if resume_from:
                self.set_state(*load_checkpoint(resume_from), where=resume_from)
            else:
                self.new_model(model_cfg)
        if comm.size > 1:                                     # every rank starts from rank 0's state
            state = comm.bcast(self.state() if comm.rank == 0 else None)
            if comm.rank:
                self.set_state(*state, where="rank 0's state")
        n_windows = max(1, cfg.eval_tokens // cfg.seq_len)
        self.val_set = val_windows(self.data.val, min(cfg.batch_size, n_windows), cfg.seq_len,
                                   max(1, n_windows // cfg.batch_size), seed=cfg.seed)
        self.dp = DataParallel(comm, cfg.grad_wire)          # the step on this rank's rows, summed over ranks

    # -------------------------------------------------------------------- model and state

    def new_model(self, model_cfg):
        class_map = None
        if model_cfg.head == "hier":                          # classes by the training tokens' counts
            counts = np.bincount(np.asarray(self.data.train), minlength=model_cfg.vocab_size)
            class_map = ClassMap.from_counts(counts, n_hier_classes(model_cfg))
        self.model = Model(model_cfg, seed=self.cfg.seed, class_map=class_map, dtype=self.cfg.dtype)
        self.embed_source = "random"
        if self.cfg.embed_init == "gpt2":
            from nanoternary.gpt2_embed import load_gpt2_embedding
            E = load_gpt2_embedding(model_cfg.d_model)
            if E is not None:
                self.model.params["embed.w"][...] = E
                self.embed_source = "gpt2"
        self.freeze_steps = self.cfg.freeze_embed_steps
        if self.freeze_steps < 0:
            self.freeze_steps = 1000 if self.embed_source == "gpt2" else 0
        self.make_optimizers()

    def make_optimizers(self):
        cfg, params = self.cfg, self.model.params
        muon_names, adam_names = split_params(params)
        self.muon = FastNorMuon({k: params[k] for k in muon_names}, lr=cfg.lr_muon)
        self.adam = FastAdamW({k: params[k] for k in adam_names}, lr=cfg.lr_adam, weight_decay=cfg.weight_decay)
        self.ema = FastEMA(params, cfg.ema) if cfg.ema else None

    def optimizers(self):
        return {"muon": self.muon, "adamw": self.adam, **({"ema": self.ema} if self.ema else {})}

    def state(self, val_loss=None):
        """(params, meta, optimizer state, class map): what a checkpoint holds (checkpoint.py)."""
        meta = {
            "config": self.model.cfg.to_dict(), "train": dataclasses.asdict(self.cfg),
            "step": self.step, "tokens": self.tokens, "elapsed": self.elapsed(),
            "best_val": None if math.isinf(self.best_val) else self.best_val, "val_loss": val_loss,
            "embed_source": self.embed_source, "freeze_steps": self.freeze_steps,
            "rng": self.rng.bit_generator.state, "model_rng": self.model.rng.bit_generator.state,
            "data": {"key": self.data.meta["key"], "path": self.data.path,
                     "source": self.data.meta["source"], "train_tokens": self.data.meta["train_tokens"]},
        }
        cmap = self.model.hier.state() if self.model.hier is not None else {}
        return self.model.params, meta, optimizers_state(self.optimizers()), cmap

    def set_state(self, params, meta, opt_state, cmap_state, where):
        """The run as a checkpoint (or rank 0) left it: weights, optimizers, counters, generators."""
        if self.comm.rank == 0 and meta.get("data", {}).get("key") != self.data.meta["key"]:   # others: same tokens
            raise CheckpointError(
                f"{where} was trained on {meta.get('data', {}).get('path')} but this run's data is "
                f"{self.data.path}: resume with the same --data (and --data-tokens, --val-fraction, --data-seed)")
        self.model = Model.from_state(params, meta, cmap_state, where)
        self.step, self.tokens, self.elapsed_before = meta["step"], meta["tokens"], meta["elapsed"]
        self.best_val = math.inf if meta.get("best_val") is None else meta["best_val"]
        self.embed_source, self.freeze_steps = meta["embed_source"], meta["freeze_steps"]
        self.rng.bit_generator.state = meta["rng"]
        self.model.rng.bit_generator.state = meta["model_rng"]
        self.make_optimizers()
        load_optimizers(opt_state, self.optimizers(), where)

    def save(self, name=LATEST, val_loss=None):
        """latest.npz: everything needed to resume. best.npz: the weights that scored `val_loss`
        (with --ema, the averaged ones) and the same state. Only finite weights are ever written
        (every rank checks, so that all stop together)."""
        params, meta, opt, cmap = self.state(val_loss)
        if name == BEST and self.ema is not None:
            params, meta["weights"] = self.ema.shadow, "ema"
        bad = [k for k, v in params.items() if not np.isfinite(v).all()]
        if bad:
            raise Stop(f"step {self.step}: {bad[0]} holds NaN or infinite values (the learning rate is "
                       f"probably too high); not saving over the last checkpoint")
        if self.comm.rank == 0:
            save_checkpoint(os.path.join(self.cfg.out, name), params, meta, opt, cmap)

    # -------------------------------------------------------------------- the loop

    def sync(self, stop=False):
        """Agree on the clock and on a Ctrl-C: rank 0's, on every rank (their clocks differ, and the
        learning rate, the stop and the last step must be the same everywhere). -> stop."""
        self.clock, stop = self.comm.bcast((time.time() - self.t0, stop))
        return stop

    def elapsed(self):
        return self.elapsed_before + self.clock

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
        lengths = cfg.curriculum or (cfg.seq_len,)                 # equal parts of the run, one per length
        T = lengths[min(int(progress * len(lengths)), len(lengths) - 1)]
        B = max(1, cfg.batch_size * cfg.seq_len // T)              # constant tokens per step
        train_embed = self.step >= self.freeze_steps
        loss_frac = cfg.loss_frac if cfg.loss_frac is not None else (0.25 if model.cfg.head == "full" else 1.0)
        batches = []
        for _ in range(cfg.grad_accum):                            # the mean over micro-batches
            x, y = get_batch(self.data.train, B, T, self.rng)      # the whole batch, the same on every rank
            batches.append((x, y, model.counted_rows(B * T, loss_frac)))   # positions in the loss, of the whole batch
        loss, grads = self.dp.loss_and_grads(model, batches, label_smoothing=cfg.label_smoothing, z_loss=cfg.z_loss,
                                             train_embed=train_embed)     # this rank's rows, summed over ranks
        if not math.isfinite(loss):
            raise Stop(f"step {self.step + 1}: the training loss is {loss}")
        norm = clip_grad_norm(grads, cfg.grad_clip) if cfg.grad_clip else None
        if norm is not None and not math.isfinite(norm):
            raise Stop(f"step {self.step + 1}: the gradient norm is {norm}")
        mult = wsd(progress, self.step, cfg.warmup, cfg.decay_frac) if cfg.schedule == "wsd" \
            else cosine(progress, self.step, cfg.warmup)
        with profile.section("optimizer"):
            self.muon.step(model.params, grads, lr=cfg.lr_muon * mult)
            self.adam.step(model.params, grads, lr=cfg.lr_adam * mult)
            if self.ema is not None:
                self.ema.update(model.params)
        self.step += 1
        self.tokens += cfg.grad_accum * B * T
        return float(loss), mult, norm

    def evaluate(self):
        """Mean NLL (nats/token, no smoothing) over the fixed validation windows, and bits per byte:
        the NLL in bits divided by the validation split's bytes per token (its UTF-8 text bytes over
        its tokens, separators included), so the windows stand for the whole split. The processes
        share the windows."""
        def nll():
            part = [fast.nll(self.model, x, y) for x, y in self.val_set[self.comm.rank::self.comm.size]]
            total = np.array([sum(p.sum() for p in part), sum(p.size for p in part)], dtype=np.float64)
            total = self.comm.allreduce_(total)
            return float(total[0] / total[1])
        with profile.paused():                                   # --profile measures training steps only
            if self.ema is not None:
                with self.ema.swapped(self.model.params):
                    v = nll()
            else:
                v = nll()
        return v, v / math.log(2) / self.val_bytes_per_token

    def done(self):
        c = self.cfg
        return ((c.max_steps and self.step >= c.max_steps) or (c.max_tokens and self.tokens >= c.max_tokens)
                or (c.time_budget and self.elapsed() >= 60.0 * c.time_budget))


# ------------------------------------------------------------------------------------ main


def train(cfg, model_cfg, resume_from=None, show_profile=False, overwrite=False, comm=None):
    comm = comm or dist.world()
    with run_folder(cfg.out, resume_from is not None, overwrite) if comm.rank == 0 else contextlib.nullcontext():
        comm.barrier()                                     # rank 0 holds --out (locked: one run per --out)
        return _train(cfg, model_cfg, comm, resume_from, show_profile)


def _train(cfg, model_cfg, comm, resume_from, show_profile):
    set_threads(cfg.threads)
    run = Run(cfg, model_cfg, comm, resume_from)
    model = run.model
    log_path = os.path.join(cfg.out, "log.jsonl") if comm.rank == 0 else None     # rank 0 alone writes
    if resume_from:
        if log_path:
            runlog.trim(log_path, run.step)
        print(f"resuming {resume_from} at step {run.step:,} ({run.tokens:,} tokens, {fmt_time(run.elapsed_before)})")
    print(f"data: {run.data.meta['source']} | train {len(run.data.train):,} tokens | "
          f"val {len(run.data.val):,} tokens | {run.data.path}")
    print(f"model: {model.param_counts()['total']:,} parameters | head {model.cfg.head} | "
          f"embedding {run.embed_source} (frozen for {run.freeze_steps} steps) | "
          + (f"{comm.size} processes x " if comm.size > 1 else "") + f"{default_workers()} thread(s)")
    if comm.size > 1:
        print("processes: " + ", ".join(f"rank {r} pid {pid} on {host}" for r, (host, pid) in enumerate(comm.hosts)))
    print(f"run: batch {cfg.batch_size} x {cfg.seq_len} x accum {cfg.grad_accum} | "
          f"max {cfg.max_steps or '-'} steps, {cfg.max_tokens or '-'} tokens, "
          f"{str(cfg.time_budget) + ' min' if cfg.time_budget else '-'} | out {cfg.out}/", flush=True)

    stop = {"signal": None}

    def on_signal(signum, frame):
        if stop["signal"] is not None:        # a second Ctrl-C: stop right now
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name
        print(f"\n{stop['signal']}: finishing this step, saving a checkpoint and stopping "
              f"(again to stop at once)", flush=True)

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    run.t0 = time.time()
    step_time, steps_timed, tok_last = 0.0, 0, run.tokens    # training steps only, since the last line
    p0 = run.progress()
    last_val = None
    status = "finished"
    try:
        with profile.attached() if show_profile else contextlib.nullcontext():
            stopped = run.sync(stop["signal"] is not None)
            last = run.done()
            while not last and not stopped:
                t_step = time.time()
                loss, mult, norm = run.train_step()
                step_time += time.time() - t_step
                steps_timed += 1
                stopped = run.sync(stop["signal"] is not None)
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
                           "lr_mult": round(mult, 5), "grad_norm": None if norm is None else round(norm, 4),
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
                if rec and log_path:
                    runlog.append(log_path, rec)
                if run.step % cfg.save_interval == 0 or last:
                    run.save(LATEST, last_val)
                    if "val_loss" in (rec or {}) and log_path:
                        runlog.plot(cfg.out)
            if stopped:
                run.save(LATEST, last_val)
                status = f"stopped by {stop['signal'] or 'a Ctrl-C on rank 0'}"
            shares = profile.shares()
    except Stop as e:
        last = os.path.join(cfg.out, LATEST)
        kept = f"the last good checkpoint is {last}" if os.path.exists(last) else "no checkpoint was saved"
        if comm.rank == 0:
            print(f"error: {e}; stopping ({kept})", file=sys.stderr)
        return 1
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
    png = runlog.plot(cfg.out) if log_path and os.path.exists(log_path) else None
    saved = [f"{cfg.out}/{f}" for f in (LATEST, BEST) if os.path.exists(os.path.join(cfg.out, f))]
    print(f"{status}: {run.step:,} steps, {run.tokens:,} tokens in {fmt_time(run.elapsed())}"
          + (f" | best val loss {run.best_val:.4f}" if math.isfinite(run.best_val) else "")
          + f" | checkpoints {', '.join(saved)}" + (f" | curves {png}" if png else ""))
    if show_profile:
        print("where the time went (share of the training steps' CPU time):")
        for k, v in shares.items():
            print(f"  {k:<18} {100 * v:5.1f}%")
    return 0


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):                     # one line, like every other error of train.py
        raise ValueError(message)


def build_parser():
    ap = ArgumentParser(description="Train nanoternary (FlashLM v3 in NumPy).")
    groups = config.add_arguments(ap, TrainConfig)
    config.add_arguments(ap, ModelConfig, groups)
    g = groups["evaluation, logging, checkpoints"]
    g.add_argument("--resume", nargs="?", const=True, metavar="CHECKPOINT",
                   help="continue the run in --out from its latest.npz, or from CHECKPOINT (e.g. its best.npz)")
    g.add_argument("--overwrite", action="store_true", help="start a new run in an --out that holds one")
    groups["machine"].add_argument("--profile", action="store_true",
                                   help="print each component's share of the training steps' time")
    return ap


def config_from_args(argv=None):
    """-> (TrainConfig, ModelConfig, resume path or None, profile flag, overwrite flag). On --resume
    the saved configs are used; only the flags in CHANGEABLE may differ from them."""
    args = build_parser().parse_args(argv)
    given = config.given_flags(build_parser(), argv) - {"resume", "profile", "overwrite"}
    if not args.resume:
        if args.max_steps is None:
            args.max_steps = 0 if (args.time_budget or args.max_tokens) else 4000
        return (config.from_args(TrainConfig, args), config.from_args(ModelConfig, args), None,
                args.profile, args.overwrite)
    path = os.path.join(args.out, LATEST) if args.resume is True else args.resume
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume: no checkpoint {path} to resume from; start the run without --resume")
    _, meta, _, _ = load_checkpoint(path)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    saved_train = {k: tuple(v) if isinstance(v, list) and k != "data" else v
                   for k, v in meta.get("train", {}).items() if k in fields}
    saved = {**saved_train, **ModelConfig.from_dict(meta["config"]).to_dict()}
    for k in sorted(given - set(CHANGEABLE)):
        if getattr(args, k) != saved.get(k):
            raise CheckpointError(f"--resume: this run was started with {config.flag(k)} {saved.get(k)}, "
                                  f"not {getattr(args, k)}; to change it, start a new run in another --out")
    train_cfg = TrainConfig(**{**saved_train, **{k: getattr(args, k) for k in CHANGEABLE if k in given},
                               "out": args.out})
    if train_cfg.max_steps is None:
        train_cfg.max_steps = 0
    return train_cfg, ModelConfig.from_dict(meta["config"]), path, args.profile, False


ONE_LINE = (DataError, CheckpointError, ValueError, OSError)     # errors that say what is wrong and what to do


def main(argv=None):
    comm = dist.world()                       # the processes mpiexec started, or just this one
    if comm.rank:
        sys.stdout = open(os.devnull, "w")    # rank 0 alone prints
    try:                                      # rank 0 reads the settings (and the checkpoint to resume)
        cfg, model_cfg, resume, show_profile, overwrite = dist.from_rank0(comm, lambda: config_from_args(argv),
                                                                          ONE_LINE)
        for T in cfg.curriculum or (cfg.seq_len,):
            if (cfg.batch_size * cfg.seq_len // T) % comm.size:
                raise ValueError(f"--batch-size {cfg.batch_size} (all processes together) does not split into "
                                 f"{comm.size} equal parts at sequence length {T}: use a multiple of {comm.size}")
    except ONE_LINE as e:                     # the same on every rank
        if comm.rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    if comm.size > 1 and not cfg.threads:     # the machine's cores, shared by its processes
        cfg.threads = max(1, available_cores() // comm.local_size)
    try:
        comm.watch(cfg.peer_timeout)          # from here on, a lost process stops the job (fast/dist.py)
        return train(cfg, model_cfg, resume, show_profile, overwrite, comm)
    except ONE_LINE as e:
        comm.fail(f"error: {e}")              # with several processes: all of them stop
        return 1
    except KeyboardInterrupt:                 # before training started, or a second Ctrl-C
        comm.fail("\ninterrupted: stopped at once; checkpoints already saved are intact", 130)
        return 130
    except Exception as e:                    # a bug, or the machine
        if comm.size == 1:
            raise
        traceback.print_exc()
        comm.fail(f"failed ({type(e).__name__}: {e}); the last checkpoint is intact: continue with --resume")


if __name__ == "__main__":
    sys.exit(main())
