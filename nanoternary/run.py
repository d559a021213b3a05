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
import math
import os
import shlex
import signal
import sys
import time
import threading
import traceback
import warnings

import numpy as np

from . import config, report, runlog
from .caches import same_tokens
from .checkpoint import (BEST, LATEST, CheckpointError, check_resumable, load_checkpoint, load_model, load_optimizers,
                         model_from_state, optimizers_state, read_npz, save_checkpoint)
from .data import DataError, prepare
from .fast import dist, profile
from .fast.threads import available_cores, default_workers, set_threads
from .runchecks import batch_split_error, brief, check_splits, preflight, suspects, write_failure
from .runfolder import RUN_FILES, check_resume, commit, new_run_id, resume_target, run_folder  # noqa: F401
from .sources import expand_paths

# may differ on --resume: the run length, the machine, and where the data is (the same bytes are
# checked by content: caches.same_tokens)
CHANGEABLE = ("max_steps", "max_tokens", "time_budget", "threads", "out", "plain", "data", "cache_dir", "grad_wire",
              "peer_timeout")
ONE_LINE = (DataError, CheckpointError, ValueError, OSError)     # errors that say what is wrong and what to do


class Diverged(Exception):
    """The run must stop without saving: a non-finite loss, gradient norm or weight."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or a second Ctrl-C) that stops the run at once; `signum` gives the exit status."""

    def __init__(self, signum=signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def fmt_time(seconds):
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"


class Run:
    """The state of a run and its side effects (module docstring). `comm` is the job's processes."""

    def __init__(self, cfg, model_cfg, comm, resume_from=None, show_profile=False, command="python train.py",
                 run_id=None):
        self.cfg, self.model_cfg, self.comm, self.show_profile = cfg, model_cfg, comm, show_profile
        self.run_id = run_id or new_run_id()
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
        self.sessions, self.session = [], {"command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.shares, self.profiler, self.ended = None, contextlib.ExitStack(), None
        self.rng = np.random.default_rng(cfg.seed)            # batches
        self.last = self.stopped = False
        self.signal, self.received, self.old_handlers, self.stack = None, None, {}, contextlib.ExitStack()
        self.log_path = os.path.join(cfg.out, "log.jsonl") if comm.rank == 0 else None   # rank 0 alone writes
        self.resumed, self.saved_state, self.where, self.saved = None, None, resume_from, {}
        if resume_from:                                       # rank 0 reads it, every rank gets it
            self.saved_state = comm.bcast(load_checkpoint(resume_from) if comm.rank == 0 else None)
            params, meta, _, cmap = self.saved_state
            if not same_tokens(meta.get("data", {}), self.data.meta):             # the same bytes, any path
                was = meta.get("train", {}).get("data") or meta.get("data", {}).get("path")
                now = [x.get("path") for x in self.data.meta.get("sources", [])] or self.data.path
                raise CheckpointError(
                    f"{resume_from} was trained on other tokens ({brief(was)}) than this run's ({brief(now)}): "
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
            self.sessions = list(meta.get("sessions", []))
            self.saved_state = None
            self.trim_at = self.step                # log records after it: trimmed once this run writes
            if not comm.bcast(os.path.exists(os.path.join(cfg.out, BEST)) if comm.rank == 0 else None):
                self.best_val = math.inf            # a folder without best.npz gets one at the first evaluation
            print(f"resuming {self.where} at step {self.step:,} ({self.tokens:,} tokens, "
                  f"{fmt_time(self.elapsed_before)})")
        print(f"data: {self.data.meta['source']} | train {len(self.data.train):,} tokens | "
              f"val {len(self.data.val):,} tokens | {self.data.path}")
        self.session.update(start_step=self.step, start_tokens=self.tokens, train_seconds=0.0)
        print(f"model: {model.param_counts()['total']:,} parameters | head {model.cfg.head} | "
              + (f"weights of {cfg.init_from} | " if embed_source == "checkpoint" else
                 f"embedding {embed_source} (frozen for {cfg.freeze_embed_steps} steps) | ")
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
        self.sync()                                # a resumed run may have nothing left to do
        if self.last:
            print(f"nothing to do: the run is at step {self.step:,}, {self.tokens:,} tokens, "
                  f"{fmt_time(self.elapsed())}, its limit (--max-steps, --max-tokens or --time-budget): "
                  f"give a larger one to continue it")
        self.p0 = self.progress()                  # for the ETA

    def on_signal(self, signum, frame):
        if self.received is not None:              # a second Ctrl-C to this process: stop right now
            raise Interrupted(signum)              # (self.signal may be rank 0's, copied by sync)
        self.received = signal.Signals(signum).name
        self.signal = self.signal or self.received
        print(f"\n{self.signal}: finishing this step, saving a checkpoint and stopping "
              f"(again to stop at once)", flush=True)

    def sync(self):
        """Rank 0's clock and Ctrl-C, on every rank (their clocks differ, and the learning rate, the
        stop and the last step must be the same everywhere); whether this step is the last."""
        self.clock, self.signal = self.comm.bcast((time.time() - self.t0, self.signal))
        self.stopped = self.signal is not None
        self.last = self.limit_reached()           # decided once: the last step evaluates and saves
        if self.last or self.stopped:              # how this session ends, for its checkpoints and report
            self.ended = f"stopped by {self.signal}" if self.stopped else f"finished ({self.limit_name()})"

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
        """Around a training step: with --profile every step is timed by part; otherwise the 3rd to
        the 5th step of each session are, for the report (a few steps, so the run is not slowed)."""
        n = self.step - self.session["start_step"]                # steps of this session before this one
        if not (self.show_profile or 2 <= n <= 4):
            yield
            return
        if n == 2 and not self.show_profile:
            self.profiler.enter_context(profile.attached())      # wraps the model's functions (resets)
            self.profiler.enter_context(profile.paused())
        with profile.recording():
            yield
        if not self.show_profile:
            self.shares = profile.shares()
            if n == 4:
                self.profiler.close()                            # the model's own functions again

    # -------------------------------------------------------------------- after each step

    def step_done(self, loss, lr, norm, tokens, seconds):
        """Count the step; agree on the clock and on a stop; print and log every log_interval-th step
        (and the first and the last)."""
        self.flush()
        self.step, self.tokens, self.last_loss = self.step + 1, self.tokens + tokens, loss
        self.times.append((seconds, tokens))
        self.session["train_seconds"] += seconds
        self.sync()
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
            "config": self.model.cfg.to_dict(), "train": dataclasses.asdict(self.cfg), "run_id": self.run_id,
            "step": self.step, "tokens": self.tokens, "elapsed": self.elapsed(),
            "best_val": None if math.isinf(self.best_val) else self.best_val, "val_loss": val_loss,
            "embed_source": self.embed_source, "sessions": self.sessions + [self.session_now()],
            "rng": self.rng.bit_generator.state, "model_rng": self.model.rng.bit_generator.state,
            "data": {"key": self.data.meta["key"], "path": self.data.path, "crc32": self.data.meta["crc32"],
                     "source": self.data.meta["source"], "train_tokens": self.data.meta["train_tokens"]},
        }
        cmap = self.model.class_map.state() if self.model.class_map is not None else {}
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

    def session_now(self, ended=None):
        return {**self.session, "end_step": self.step, "end_tokens": self.tokens,
                "ended": ended or self.ended or "running (or killed)", "train_seconds": round(self.session.get("train_seconds", 0), 2)}

    def close(self):
        for s, h in self.old_handlers.items():
            signal.signal(s, h)
        self.old_handlers = {}
        if self.show_profile:
            self.shares = profile.shares()
        self.profiler.close()
        self.stack.close()

    def finish(self):
        """After train(): the checkpoint of a stopped run, the closing line, report.md, the exit status."""
        self.close()
        self.flush()
        if self.stopped and not self.last:
            self.write(LATEST, self.last_val)
        png = runlog.plot(self.cfg.out) if self.log_path and os.path.exists(self.log_path) else None
        out = self.cfg.out
        saved = [f"{out}/{f}" for f in (LATEST, BEST) if os.path.exists(os.path.join(out, f))]
        status = f"stopped by {self.signal}" if self.stopped else "finished"
        card = self.write_report(self.ended or status)
        print(f"{status}: {self.step:,} steps, {self.tokens:,} tokens in {fmt_time(self.elapsed())}"
              + (f" | best val loss {self.best_val:.4f}" if math.isfinite(self.best_val) else "")
              + (f" | checkpoints {', '.join(saved)}" if saved else " | no checkpoint")
              + (f" | curves {png}" if png else "") + (f" | report {card}" if card else ""))
        if self.show_profile and self.shares:
            print("where the time went (share of the training steps' CPU time):")
            for k, v in self.shares.items():
                print(f"  {k:<18} {100 * v:5.1f}%")
        return {"SIGINT": 130, "SIGTERM": 143}.get(self.signal, 0)      # the shell's 128 + signal number

    def diverged(self, e):
        """A Diverged stop: one line, report.md, exit status 1. Nothing is saved over the last checkpoint."""
        self.close()
        with contextlib.suppress(CheckpointError):
            self.flush()                           # the log keeps the steps before (non-finite values as null)
        last = os.path.join(self.cfg.out, LATEST)
        kept = [os.path.join(self.cfg.out, n) for n in (LATEST, BEST) if os.path.exists(os.path.join(self.cfg.out, n))]
        kept = f"the last good checkpoints: {', '.join(kept)}" if kept else "no checkpoint was saved"
        self.write_report(f"diverged ({e})", sample_from=last if os.path.exists(last) else None)
        if self.comm.rank == 0:
            print(f"error: {e}; stopping ({kept}); {suspects(self.cfg)}", file=sys.stderr)
        return 1

    def limit_name(self):
        c = self.cfg
        if c.time_budget and self.elapsed() >= 60.0 * c.time_budget:
            return f"a time budget of {c.time_budget:g} min"
        if c.max_tokens and self.tokens >= c.max_tokens:
            return f"{c.max_tokens:,} tokens"
        return f"{c.max_steps:,} steps" if c.max_steps else "nothing left to do"

    def write_report(self, ended, sample_from=None):
        """OUT/report.md (report.py) on rank 0, for a run that trained at least one step; -> its path."""
        if self.comm.rank != 0 or not hasattr(self, "model") or (self.step == 0 and not self.sessions):
            return None
        try:
            return report.write(self.report_info(ended, sample_from))
        except OSError as e:
            print(f"note: could not write {self.cfg.out}/report.md ({e.strerror or e})", file=sys.stderr)
            return None

    def report_info(self, ended, sample_from=None):
        """What report.render needs, from the run's settings, log and state."""
        cfg = self.cfg
        changed, resolved = report.changed_settings(cfg, self.model.cfg)
        return {
            "out": cfg.out, "status": ended, "step": self.step, "tokens": self.tokens, "elapsed": self.elapsed(),
            "sessions": self.sessions + [self.session_now(ended)], "changed": changed, "resolved": resolved,
            "params": self.model.param_counts()["total"], "head": self.model.cfg.head,
            "ternary": self.model.cfg.ternary, "embed_source": self.embed_source,
            "data": {**self.data.meta, "path": self.data.path},
            "processes": self.comm.size, "threads": "1 thread (--plain)" if cfg.plain else f"{default_workers()} thread(s)",
            "shares": self.shares, "shares_note": "every step, --profile" if self.show_profile else
            "steps 3-5 of the last session, timed by part; CPU time summed over threads",
            "records": runlog.read(self.log_path) if os.path.exists(self.log_path) else [],
            "sample": report.sample(load_model(sample_from) if sample_from else self.model, sample_from),
            "checkpoints": [f for f in (LATEST, BEST) if os.path.exists(os.path.join(cfg.out, f))],
        }


def _finite(x, digits):
    """A number for log.jsonl, which is plain JSON: NaN and infinities are null."""
    return round(float(x), digits) if x is not None and math.isfinite(x) else None


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
    """-> (TrainConfig, ModelConfig, resume path or None, profile flag, overwrite flag, run id). On
    --resume the saved configs are used; only the flags in CHANGEABLE may differ from them. The run id
    names the run in its checkpoints, so that a resume never mixes two runs (runfolder.py)."""
    args = build_parser(TrainConfig, ModelConfig).parse_args(argv)
    given = config.given_flags(build_parser(TrainConfig, ModelConfig), argv) - {"resume", "profile", "overwrite"}
    if args.data:                             # saved as absolute paths: the run resumes from any folder
        args.data = [os.path.abspath(os.path.expanduser(d)) if d else d for d in args.data]
    if args.resume is None:
        model_cfg = config.from_args(ModelConfig, args)
        if args.init_from:                    # the architecture is the checkpoint's
            model_cfg = init_config(args, given, ModelConfig)
        return (config.from_args(TrainConfig, args), model_cfg, None, args.profile, args.overwrite,
                new_run_id())
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
                                   "out": out})
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
    return train_cfg, model_cfg, path, args.profile, False, run_id


def init_config(args, given, ModelConfig):
    """--init-from: the checkpoint's ModelConfig; a model flag given with another value is refused."""
    if not os.path.isfile(args.init_from):
        raise CheckpointError(f"--init-from: no checkpoint {args.init_from}: give a checkpoint file "
                              f"(e.g. runs/x/latest.npz or best.npz)")
    try:
        saved = ModelConfig.from_dict(load_checkpoint(args.init_from)[1]["config"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"--init-from {args.init_from}: its model config is missing or invalid ({e})") from None
    for k in sorted(given & {f.name for f in dataclasses.fields(ModelConfig)}):
        if getattr(args, k) != getattr(saved, k):
            raise CheckpointError(f"--init-from {args.init_from} has {config.flag(k)} {getattr(saved, k)}, not "
                                  f"{getattr(args, k)}: the architecture comes from the checkpoint (drop {config.flag(k)})")
    return saved


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
        cfg, model_cfg, resume, show_profile, overwrite, run_id = dist.from_rank0(
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
        comm.watch(cfg.peer_timeout)          # from here on, a lost process ends the job (fast/watchdog.py)
        with run_folder(cfg.out, resume is not None, overwrite) if comm.rank == 0 else contextlib.nullcontext():
            comm.barrier()                    # rank 0 holds --out (locked: one run per --out)
            command = " ".join(["python train.py"] + [shlex.quote(a) for a in
                                                      (sys.argv[1:] if argv is None else argv)])
            r = Run(cfg, model_cfg, comm, resume, show_profile, command, run_id)
            try:
                train(r)
            except Diverged as e:
                return r.diverged(e)
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
