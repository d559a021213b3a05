"""The bookkeeping of a training run: everything train.py needs besides the training itself.

    python train.py ...         ->  run.main(argv, TrainConfig, ModelConfig, train)

main() reads the settings (or, on --resume, the checkpoint's), checks them against the machine
(memory and threads: resources.py), holds the run folder (one run per --out, a lock naming its
holder, no run ever lost to another: runfolder.py), prepares the data, calls train(r) with a Run
`r`, and turns
every way a run can end into one line and an exit status: 0 when it ended as asked (steps,
tokens, time budget), 130 after SIGINT (Ctrl-C) and 143 after SIGTERM once the checkpoint is
saved, 1 on errors.

What train.py uses of the Run:
    r.cfg, r.model_cfg, r.data, r.comm       the settings, the token data (data.py), the processes (fast/dist.py)
    r.rng, r.step, r.progress()              the batches' generator; steps done; fraction of the run done
    r.resumed                                (model, embedding source) of a resumed run, else None
    r.on_rank0(fn, *args)                    fn(*args) on rank 0, its result on every process
    r.start(model, opt, embed_source)        a resumed run's optimizer and generator states; the banner
    r.done(), r.last                         stop now (a limit reached, or Ctrl-C); this step was the last
    r.profiled()                             around a training step: --profile's timing of its parts
    r.step_done(loss, lr, norm, tokens, s)   counters, the log line, log.jsonl
    r.evaluated(val_loss)                    the validation line; best.npz when it is the best so far
    r.save()                                 latest.npz

Under mpiexec every process runs train(); they agree on the clock and on a Ctrl-C (rank 0's, sent
to all at every step, so the learning rate, the last step and the stop are the same everywhere),
and rank 0 alone prints, logs and writes checkpoints. Resuming restores the weights, the optimizer
state, the step, token and time counters and both random generators, so an interrupted run
continues with the same losses as one that was never stopped (tests/test_train.py checks it).
"""
import argparse
import contextlib
import dataclasses
import errno
import math
import os
import signal
import sys
import time
import threading
import traceback
import warnings

import numpy as np

from . import config, runlog
from .caches import same_tokens
from .checkpoint import (BEST, LATEST, CheckpointError, check_resumable, load_checkpoint, load_optimizers,
                         model_from_state, optimizers_state, read_npz, save_checkpoint)
from .data import DataError, prepare
from .fast import dist, profile
from .fast.threads import available_cores, default_workers, set_threads
from .resources import check_memory, check_threads, human
from .runfolder import RUN_FILES, check_resume, commit, new_run_id, resume_target, run_folder  # noqa: F401
from .sources import expand_paths

# may differ on --resume: the run length, the machine, and where the data is (the same bytes are
# checked by content: caches.same_tokens)
CHANGEABLE = ("max_steps", "max_tokens", "time_budget", "threads", "out", "plain", "data", "cache_dir")
ONE_LINE = (DataError, CheckpointError, ValueError, OSError)     # errors that say what is wrong and what to do


class Diverged(Exception):
    """The run must stop without saving: a non-finite loss, gradient norm or weight."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or a second Ctrl-C) that stops the run at once; `signum` gives the exit status."""

    def __init__(self, signum=signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def _brief(paths, limit=120):
    text = ", ".join(map(str, paths)) if isinstance(paths, (list, tuple)) else str(paths)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def fmt_time(seconds):
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"


class Run:
    """The state of a run and its side effects (module docstring). `comm` is the job's processes."""

    def __init__(self, cfg, model_cfg, comm, resume_from=None, show_profile=False):
        self.cfg, self.model_cfg, self.comm, self.show_profile = cfg, model_cfg, comm, show_profile
        set_threads(1 if cfg.plain else cfg.threads)
        self.data = dist.rank0_first(comm, lambda: prepare(cfg.data, max_tokens=cfg.data_tokens, seed=cfg.data_seed,
                                                           val_fraction=cfg.val_fraction,
                                                           cache_dir=cfg.cache_dir))   # the cache, once
        if self.data.meta["key"] != comm.bcast(self.data.meta["key"]):      # another machine found other data
            raise DataError(f"rank {comm.rank} prepared other data than rank 0 ({self.data.path}): every "
                            f"machine needs the same --data, or a shared data/ folder")
        check_splits(self.data, cfg)
        self.val_bytes_per_token = self.data.meta["val_bytes"] / max(1, self.data.meta["val_tokens"])
        self.step, self.tokens, self.elapsed_before, self.best_val, self.clock = 0, 0, 0.0, math.inf, 0.0
        self.last_val, self.last_loss, self.pending, self.times = None, None, None, []
        self.rng = np.random.default_rng(cfg.seed)            # batches
        self.last = self.stopped = False
        self.signal, self.old_handlers, self.stack = None, {}, contextlib.ExitStack()
        self.log_path = os.path.join(cfg.out, "log.jsonl") if comm.rank == 0 else None   # rank 0 alone writes
        self.resumed, self.saved_state, self.where, self.saved = None, None, resume_from, {}
        if resume_from:                                       # rank 0 reads it, every rank gets it
            self.saved_state = comm.bcast(load_checkpoint(resume_from) if comm.rank == 0 else None)
            params, meta, _, cmap = self.saved_state
            if not same_tokens(meta.get("data", {}), self.data.meta):             # the same bytes, any path
                was = meta.get("train", {}).get("data") or meta.get("data", {}).get("path")
                now = [x.get("path") for x in self.data.meta.get("sources", [])] or self.data.path
                raise CheckpointError(
                    f"{resume_from} was trained on other tokens ({_brief(was)}) than this run's ({_brief(now)}): "
                    f"resume with the same --data (the same bytes, by any path), --data-tokens, --val-fraction "
                    f"and --data-seed")
            self.resumed = (model_from_state(params, meta, cmap, resume_from, cfg.dtype), meta["embed_source"])

    def on_rank0(self, fn, *args):
        """fn(*args) on rank 0, its result on every process (the same new model everywhere)."""
        return self.comm.bcast(fn(*args) if self.comm.rank == 0 else None)

    # -------------------------------------------------------------------- the start

    def start(self, model, opt, embed_source):
        self.model, self.opt, self.embed_source = model, opt, embed_source
        cfg, comm = self.cfg, self.comm
        if self.saved_state is not None:
            _, meta, opt_state, _ = self.saved_state
            load_optimizers(opt_state, opt, self.where)
            self.step, self.tokens, self.elapsed_before = meta["step"], meta["tokens"], meta["elapsed"]
            self.best_val = math.inf if meta.get("best_val") is None else meta["best_val"]
            self.rng.bit_generator.state = meta["rng"]
            model.rng.bit_generator.state = meta["model_rng"]
            self.saved_state = None
            self.trim_at = self.step                # log records after it: trimmed once this run writes
            if not comm.bcast(os.path.exists(os.path.join(cfg.out, BEST)) if comm.rank == 0 else None):
                self.best_val = math.inf            # a folder without best.npz gets one at the first evaluation
            print(f"resuming {self.where} at step {self.step:,} ({self.tokens:,} tokens, "
                  f"{fmt_time(self.elapsed_before)})")
        print(f"data: {self.data.meta['source']} | train {len(self.data.train):,} tokens | "
              f"val {len(self.data.val):,} tokens | {self.data.path}")
        print(f"model: {model.param_counts()['total']:,} parameters | head {model.cfg.head} | "
              f"embedding {embed_source} (frozen for {cfg.freeze_embed_steps} steps) | "
              + (f"{comm.size} processes x " if comm.size > 1 else "")
              + (f"{default_workers()} thread(s)" if not cfg.plain else "plain code, 1 thread"))
        if comm.size > 1:
            print("processes: " + ", ".join(f"rank {r} pid {pid} on {host}" for r, (host, pid) in enumerate(comm.hosts)))
        print(f"run: batch {cfg.batch_size} x {cfg.seq_len} x accum {cfg.grad_accum} | "
              f"max {cfg.max_steps or '-'} steps, {cfg.max_tokens or '-'} tokens, "
              f"{str(cfg.time_budget) + ' min' if cfg.time_budget else '-'} | out {cfg.out}/", flush=True)
        if self.show_profile:                      # the model's functions wrapped, timed in profiled() only
            self.stack.enter_context(profile.attached())
            self.stack.enter_context(profile.paused())
        self.old_handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.t0 = time.time()
        self.sync()
        self.last = self.limit_reached()           # a resumed run may have nothing left to do
        if self.last:
            print(f"nothing to do: the run is at step {self.step:,}, {self.tokens:,} tokens, "
                  f"{fmt_time(self.elapsed())}, its limit (--max-steps, --max-tokens or --time-budget): "
                  f"give a larger one to continue it")
        self.p0 = self.progress()                  # for the ETA

    def on_signal(self, signum, frame):
        if self.signal is not None:                # a second Ctrl-C: stop right now
            raise Interrupted(signum)
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal}: finishing this step, saving a checkpoint and stopping "
              f"(again to stop at once)", flush=True)

    def sync(self):
        """Rank 0's clock and Ctrl-C, on every rank (their clocks differ, and the learning rate, the
        stop and the last step must be the same everywhere)."""
        self.clock, self.signal = self.comm.bcast((time.time() - self.t0, self.signal))
        self.stopped = self.signal is not None

    # -------------------------------------------------------------------- where the run stands

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

    def limit_reached(self):
        c = self.cfg
        return bool((c.max_steps and self.step >= c.max_steps) or (c.max_tokens and self.tokens >= c.max_tokens)
                    or (c.time_budget and self.elapsed() >= 60.0 * c.time_budget))

    def done(self):
        return self.last or self.stopped

    @contextlib.contextmanager
    def profiled(self):
        with profile.recording() if self.show_profile else contextlib.nullcontext():
            yield

    # -------------------------------------------------------------------- after each step

    def step_done(self, loss, lr, norm, tokens, seconds):
        """Count the step; agree on the clock and on a stop; print and log every log_interval-th step
        (and the first and the last)."""
        self.flush()
        self.step, self.tokens, self.last_loss = self.step + 1, self.tokens + tokens, loss
        self.times.append((seconds, tokens))
        self.sync()
        self.last = self.limit_reached()           # decided once: the last step evaluates and saves
        if self.step % self.cfg.log_interval == 0 or self.step == 1 or self.last or self.stopped:
            step_s, step_tokens = map(sum, zip(*self.times))
            ms, tps = 1000 * step_s / len(self.times), step_tokens / max(step_s, 1e-9)
            self.times = []
            p = self.progress()
            eta = (self.elapsed() - self.elapsed_before) / (p - self.p0) * (1 - p) if p > self.p0 else 0
            print(f"step {self.step:>5} | loss {loss:.3f} | lr {lr:.1e} | {ms:,.0f} ms | {tps:,.0f} tok/s | "
                  f"{fmt_time(self.elapsed())} | eta {fmt_time(eta)}", flush=True)
            self.pending = self.record(lr=round(lr, 8), grad_norm=_finite(norm, 4), tok_per_s=round(tps, 1))

    def record(self, **more):
        return {"step": self.step, "tokens": self.tokens, "train_loss": _finite(self.last_loss, 5),
                "elapsed": round(self.elapsed(), 2), **more}

    def flush(self):
        if self.pending and self.log_path:
            with self.writing(self.log_path):
                self.trim_log()
                runlog.append(self.log_path, self.pending)
        self.pending = None

    def trim_log(self):
        """A resumed run's log loses the records after its checkpoint's step, once it writes its own
        (a resume that takes no step changes nothing)."""
        if getattr(self, "trim_at", None) is not None and self.log_path:
            runlog.trim(self.log_path, self.trim_at)
        self.trim_at = None

    def evaluated(self, val_loss):
        """The validation loss of the weights after this step: printed with bits per byte (the NLL in
        bits over the validation split's UTF-8 bytes per token), logged, and best.npz if the best."""
        bpb = val_loss / math.log(2) / self.val_bytes_per_token
        print(f"step {self.step:>5} | val loss {val_loss:.4f} | val bpb {bpb:.4f}", flush=True)
        self.pending = self.pending or self.record()
        self.pending.update(val_loss=_finite(val_loss, 5), val_bpb=_finite(bpb, 5))
        self.last_val = val_loss
        if val_loss < self.best_val:
            self.best_val = val_loss
            self.write(BEST, val_loss)

    def save(self):
        """latest.npz: everything needed to resume (and loss.png after an evaluation)."""
        evaluated = self.pending is not None and "val_loss" in self.pending
        self.flush()
        self.write(LATEST, self.last_val)
        if evaluated and self.log_path:
            runlog.plot(self.cfg.out)

    # -------------------------------------------------------------------- checkpoints

    def state(self, val_loss=None):
        """(params, meta, optimizer state, class map): what a checkpoint holds (checkpoint.py)."""
        meta = {
            "config": self.model.cfg.to_dict(), "train": dataclasses.asdict(self.cfg),
            "step": self.step, "tokens": self.tokens, "elapsed": self.elapsed(),
            "best_val": None if math.isinf(self.best_val) else self.best_val, "val_loss": val_loss,
            "embed_source": self.embed_source,
            "rng": self.rng.bit_generator.state, "model_rng": self.model.rng.bit_generator.state,
            "data": {"key": self.data.meta["key"], "path": self.data.path, "crc32": self.data.meta["crc32"],
                     "source": self.data.meta["source"], "train_tokens": self.data.meta["train_tokens"]},
        }
        cmap = self.model.hier.state() if self.model.hier is not None else {}
        return self.model.params, meta, optimizers_state(self.opt), cmap

    def write(self, name, val_loss=None):
        """latest.npz: the state to resume from. best.npz: the weights that scored `val_loss` (with
        --ema, the averaged ones) and the same state. Only finite weights are ever written (every
        rank checks, so that all stop together)."""
        params, meta, opt, cmap = self.state(val_loss)
        if name == BEST and "ema" in self.opt:
            params, meta["weights"] = self.opt["ema"].shadow, "ema"
        bad = [k for k, v in params.items() if not np.isfinite(v).all()]
        if bad:
            raise Diverged(f"step {self.step}: {bad[0]} holds NaN or infinite values; not saving over the "
                           f"last checkpoint")
        if self.comm.rank == 0:
            path = os.path.join(self.cfg.out, name)
            needed = sum(np.asarray(a).nbytes for part in (params, opt, cmap) for a in part.values())
            with self.writing(path, needed):
                self.trim_log()
                save_checkpoint(path, params, meta, opt, cmap)
            self.saved[name] = self.step
            commit(self.cfg.out)                   # an --overwrite's old run can go now (runfolder.py)

    @contextlib.contextmanager
    def writing(self, path, needed=None):
        """An OSError while writing `path` (a full disk, a folder made read-only, a quota) becomes
        one line naming the file, the step, what is intact and what to do."""
        try:
            yield
        except OSError as e:
            raise CheckpointError(write_failure(e, path, self.step, needed, self.saved, self.cfg.out)) from None

    # -------------------------------------------------------------------- the end

    def close(self):
        for s, h in self.old_handlers.items():
            signal.signal(s, h)
        self.old_handlers = {}
        self.stack.close()

    def finish(self):
        """After train(): the checkpoint of a stopped run, the closing line, the exit status."""
        shares = profile.shares() if self.show_profile else None
        self.close()
        self.flush()
        if self.stopped and not self.last:
            self.write(LATEST, self.last_val)
        png = runlog.plot(self.cfg.out) if self.log_path and os.path.exists(self.log_path) else None
        out = self.cfg.out
        saved = [f"{out}/{f}" for f in (LATEST, BEST) if os.path.exists(os.path.join(out, f))]
        status = f"stopped by {self.signal}" if self.stopped else "finished"
        print(f"{status}: {self.step:,} steps, {self.tokens:,} tokens in {fmt_time(self.elapsed())}"
              + (f" | best val loss {self.best_val:.4f}" if math.isfinite(self.best_val) else "")
              + (f" | checkpoints {', '.join(saved)}" if saved else " | no checkpoint") + (f" | curves {png}" if png else ""))
        if shares:
            print("where the time went (share of the training steps' CPU time):")
            for k, v in shares.items():
                print(f"  {k:<18} {100 * v:5.1f}%")
        return {"SIGINT": 130, "SIGTERM": 143}.get(self.signal, 0)      # the shell's 128 + signal number


def _finite(x, digits):
    """A number for log.jsonl, which is plain JSON: NaN and infinities are null."""
    return round(float(x), digits) if x is not None and math.isfinite(x) else None


# ------------------------------------------------------------------------------------------ checks and messages


def check_splits(data, cfg):
    """Both splits must hold a window of the longest sequence (seq_len + 1 tokens): a DataError that
    names the split, the counts and the flag that helps."""
    T = max(cfg.curriculum or (cfg.seq_len,))
    m = data.meta
    what = ", ".join(str(x.get("path")) for x in m.get("sources", []) if isinstance(x, dict))[:200] or data.path
    if m.get("documents", 2) < 2:
        raise DataError(f"{what} holds {m.get('documents')} document: a run needs at least 2, one of them for "
                        f"validation: add documents (a .txt file splits into documents at <|endoftext|>)")
    for split, tokens, fix in (("validation", len(data.val), "a larger --val-fraction"),
                               ("training", len(data.train), "a smaller --val-fraction")):
        if tokens < T + 1:
            raise DataError(f"the {split} split of {what} has {tokens:,} tokens, fewer than one window of "
                            f"{T + 1:,} (the longest sequence + 1): use a shorter --seq-len"
                            f"{' or --curriculum' if cfg.curriculum else ''}, more data or {fix}")


def write_failure(e, path, step, needed, saved, out):
    """The one line for an OSError while writing `path` at `step`: the file, the error, the space free
    and needed on a full disk, what is intact (the previous checkpoints), and what to do."""
    free = None
    with contextlib.suppress(OSError):
        st = os.statvfs(os.path.dirname(path) or ".")
        free = st.f_bavail * st.f_frsize
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    intact = [f"{out}/{n} (step {s:,})" for n, s in saved.items()] or \
             [f"{out}/{n}" for n in (LATEST, BEST) if os.path.exists(os.path.join(out, n))]
    return (f"cannot write {path} at step {step:,} ({e.strerror or e}"
            + (f"; {human(free)} free" if free is not None else "")
            + (f", the checkpoint needs about {human(needed)}" if full and needed else "") + "); "
            + (f"the previous checkpoint is intact: {', '.join(intact)}" if intact else "no checkpoint was saved yet")
            + ("; free some space" if full else "; make the folder writable")
            + (" and continue with --resume" if intact else " and start again"))


def suspects(cfg):
    """What to change after a divergence: the step-size settings furthest above their defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    far = sorted(((getattr(cfg, k) / defaults[k], k) for k in ("lr_muon", "lr_adam", "weight_decay", "z_loss")
                  if defaults.get(k) and getattr(cfg, k, 0) > 10 * defaults[k]), reverse=True)
    if far:
        return "the likely cause: " + ", ".join(f"{config.flag(k)} {getattr(cfg, k):g} (default {defaults[k]:g})"
                                                for _, k in far) + ": start again with lower values"
    return "lower --lr-muon and --lr-adam (or --warmup longer) and start again"


def preflight(settings_, comm):
    """Before any work: threads and memory against this machine (resources.py). -> settings_."""
    cfg, model_cfg = settings_[0], settings_[1]
    if cfg.threads:
        check_threads(cfg.threads, "--threads")
    workers = 1 if cfg.plain else (cfg.threads or available_cores())
    check_memory(cfg, model_cfg, workers, processes=getattr(comm, "local_size", 1))
    return settings_


def batch_split_error(cfg, size):
    """None, or the one line for a batch that does not split into `size` processes at every length."""
    lengths = cfg.curriculum or (cfg.seq_len,)
    for T in lengths:
        B = max(1, cfg.batch_size * cfg.seq_len // T)
        if B % size:
            start = -(-cfg.batch_size // size) * size                   # the multiples of size from here
            ok = next(b for b in range(start, start + size * max(lengths) * 2 + 1, size)
                      if all(max(1, b * cfg.seq_len // t) % size == 0 for t in lengths))
            return (f"--batch-size {cfg.batch_size} (all processes together) is {B} sequence(s) of {T} tokens"
                    + (" at that curriculum length" if cfg.curriculum else "") + f", which does not split into "
                    f"{size} equal parts, one per process: use --batch-size {ok}" + (" (the smallest that splits at every length)"
                                                                    if cfg.curriculum else ""))
    return None


# ------------------------------------------------------------------------------------------ the command


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):                     # one line, like every other error of train.py
        raise ValueError(message)


def build_parser(TrainConfig, ModelConfig):
    ap = ArgumentParser(prog="train.py", description="Train nanoternary (FlashLM v3 in NumPy).")
    groups = config.add_arguments(ap, TrainConfig)
    config.add_arguments(ap, ModelConfig, groups)
    g = groups["evaluation, logging, checkpoints"]
    g.add_argument("--resume", nargs="?", const=True, metavar="CHECKPOINT",
                   help="continue the run in --out from its latest.npz, or from CHECKPOINT (e.g. its best.npz)")
    g.add_argument("--overwrite", action="store_true", help="start a new run in an --out that holds one")
    groups["machine"].add_argument("--profile", action="store_true",
                                   help="print each component's share of the training steps' time")
    return ap


def settings(argv, TrainConfig, ModelConfig):
    """-> (TrainConfig, ModelConfig, resume path or None, profile flag, overwrite flag). On --resume
    the saved configs are used; only the flags in CHANGEABLE may differ from them."""
    args = build_parser(TrainConfig, ModelConfig).parse_args(argv)
    given = config.given_flags(build_parser(TrainConfig, ModelConfig), argv) - {"resume", "profile", "overwrite"}
    if args.data:                             # saved as absolute paths: the run resumes from any folder
        args.data = [os.path.abspath(os.path.expanduser(d)) if d else d for d in args.data]
    if args.resume is None:
        return (config.from_args(TrainConfig, args, run_id=new_run_id()), config.from_args(ModelConfig, args),
                None, args.profile, args.overwrite)
    path, out = resume_target(args.resume, args.out, "out" in given)
    _, meta, _, _ = load_checkpoint(path)
    check_resumable(meta, path)
    run_id = check_resume(out, path, meta, lambda p: read_npz(p)[1])   # never over another run (runfolder.py)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    saved_train = {k: tuple(v) if isinstance(v, list) and k != "data" else v
                   for k, v in meta["train"].items() if k in fields}
    if saved_train.get("freeze_embed_steps") == -1:       # how older versions said "the default"
        saved_train["freeze_embed_steps"] = None
    try:
        model_cfg = ModelConfig.from_dict(meta["config"])
        saved = {**saved_train, **model_cfg.to_dict()}
        for k in sorted(given - set(CHANGEABLE)):
            if getattr(args, k) != saved.get(k):
                raise CheckpointError(f"--resume: this run was started with {config.flag(k)} {saved.get(k)}, "
                                      f"not {getattr(args, k)}; to change it, start a new run in another --out")
        train_cfg = TrainConfig(**{**saved_train, **{k: getattr(args, k) for k in CHANGEABLE if k in given},
                                   "out": out, "run_id": run_id})
    except (TypeError, ValueError, AttributeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: its saved settings are damaged ({e}); resume from the run's other "
                              f"checkpoint") from None
    if train_cfg.data is not None and (not isinstance(train_cfg.data, list)
                                       or not all(isinstance(d, str) for d in train_cfg.data)):
        raise CheckpointError(f"{path}: its saved --data is damaged ({train_cfg.data!r}); pass --data")
    if train_cfg.data and "data" not in given:
        try:
            expand_paths(train_cfg.data)
        except DataError as e:
            raise DataError(f"{e}; --resume reads the run's data from where it was ({', '.join(train_cfg.data)}): "
                            f"if the files moved, pass --data with their new path (the same bytes are the same "
                            f"data)") from None
    return train_cfg, model_cfg, path, args.profile, False


def main(argv, TrainConfig, ModelConfig, train):
    """python train.py: train(Run) with the settings of argv; -> the exit status (module docstring).
    Around the run: output that never fails on a character (config.safe_output), NumPy's warnings
    kept out of the terminal (a divergence gets its own line), and SIGTERM before training stopping
    at once, cleanly (Interrupted: the folder settled, status 143)."""
    config.safe_output()
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return _main(argv, TrainConfig, ModelConfig, train)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old)


def _interrupt(signum, frame):
    raise Interrupted(signum)


def _main(argv, TrainConfig, ModelConfig, train):
    comm = dist.world()                       # the processes mpiexec started, or just this one
    if comm.rank:
        sys.stdout = open(os.devnull, "w")    # rank 0 alone prints
    try:                                      # rank 0 reads the settings (and the checkpoint to resume)
        cfg, model_cfg, resume, show_profile, overwrite = dist.from_rank0(
            comm, lambda: preflight(settings(argv, TrainConfig, ModelConfig), comm), ONE_LINE)
        if cfg.plain and comm.size > 1:
            raise ValueError(f"--plain runs in one process, not {comm.size}: drop --plain or mpiexec")
        if batch_split_error(cfg, comm.size):
            raise ValueError(batch_split_error(cfg, comm.size))
    except ONE_LINE as e:                     # the same on every rank
        if comm.rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    if comm.size > 1 and not cfg.threads:     # the machine's cores, shared by its processes
        cfg.threads = max(1, available_cores() // comm.local_size)
    r = None
    try:
        with run_folder(cfg.out, resume is not None, overwrite) if comm.rank == 0 else contextlib.nullcontext():
            comm.barrier()                    # rank 0 holds --out (locked: one run per --out)
            r = Run(cfg, model_cfg, comm, resume, show_profile)
            try:
                train(r)
            except Diverged as e:
                with contextlib.suppress(CheckpointError):
                    r.flush()                 # the log keeps the steps before (non-finite values as null)
                kept = [os.path.join(cfg.out, n) for n in (LATEST, BEST) if os.path.exists(os.path.join(cfg.out, n))]
                kept = f"the last good checkpoints: {', '.join(kept)}" if kept else "no checkpoint was saved"
                if comm.rank == 0:
                    print(f"error: {e}; stopping ({kept}); {suspects(cfg)}", file=sys.stderr)
                return 1
            finally:
                r.close()
            return r.finish()
    except ONE_LINE as e:
        comm.fail(f"error: {e}")              # with several processes: all of them stop
        return 1
    except KeyboardInterrupt as e:            # before training started, or a second Ctrl-C or SIGTERM
        code = 128 + getattr(e, "signum", signal.SIGINT)          # 130 after SIGINT, 143 after SIGTERM
        saved = [f"{cfg.out}/{n}" for n in (LATEST, BEST) if os.path.exists(os.path.join(cfg.out, n))]
        comm.fail("\ninterrupted: stopped at once; " + (f"the checkpoints saved are intact ({', '.join(saved)})"
                                                        if saved else "no checkpoint was saved"), code)
        return code
    except Exception as e:                    # a bug, or the machine
        if comm.size == 1 and isinstance(e, MemoryError):     # the estimate passed, the machine disagreed
            print(f"error: out of memory at step {getattr(r, 'step', 0):,} ({e or 'MemoryError'}): lower "
                  f"--batch-size or --seq-len, or free memory; the checkpoints saved are intact", file=sys.stderr)
            return 1
        if comm.size == 1:
            raise
        traceback.print_exc()
        comm.fail(f"failed ({type(e).__name__}: {e}); the last checkpoint is intact: continue with --resume")
