"""OUT/report.md: the card of a training run, written by run.py whenever a run ends (its steps, tokens
or time budget done, Ctrl-C, a divergence), from what the run logged. A resumed run rewrites it with
its earlier sessions in it, so the card always covers the whole run.

    what the run was     each session's command, how it ended; the settings that differ from the defaults
    the data             source, path, tokens and documents of each split
    how fast             steps, tokens and time, tokens/s, where the time of a training step went
                         (a few steps of each session timed by part, fast/profile.py)
    what it learnt       best and last validation loss (nats/token) and bits per byte, the evaluations,
                         the curves (loss.png, with matplotlib), a short sample from the final weights

nanochat writes such a card for every run; this is ours. render() builds the text from a dict
(run.py's Run.report_info()), so tests can read it without a run.
"""
import dataclasses
import os

import numpy as np

from . import config
from .fileio import atomic_open


def changed_settings(cfg, model_cfg):
    """-> (the settings that differ from their defaults as (flag, value, default) rows, the defaults
    that train.py's resolve_defaults filled in as (flag, value))."""
    changed, resolved = [], []
    for c in (cfg, model_cfg):
        for f in dataclasses.fields(c):
            value, default = getattr(c, f.name), f.default
            if f.name == "out" or value == default:
                continue
            if default is None and f.name in ("loss_frac", "freeze_embed_steps", "max_steps"):
                resolved.append((config.flag(f.name), value))
            else:
                changed.append((f"`{config.flag(f.name)}`", _show(value), _show(default)))
    return changed, resolved


def _show(v):
    return ",".join(map(str, v)) if isinstance(v, tuple) else " ".join(v) if isinstance(v, list) \
        else "-" if v is None else v


def sample(model, path=None, prompt="The", n=48, seed=0):
    """A short continuation from `model` (the final weights, or those of the checkpoint at `path`)."""
    from .generate import Generator
    from .tokenizer import get_encoding
    if not all(np.isfinite(v).all() for v in model.params.values()):
        return None
    enc = get_encoding()
    ids = list(Generator(model, kernel="blas").generate(enc.encode(prompt), n, 0.8, 200, None,
                                                         np.random.default_rng(seed), stop_at_eot=False))
    return {"weights": path or "the final weights", "prompt": prompt, "tokens": n, "temperature": 0.8,
            "top_k": 200, "seed": seed, "text": prompt + enc.decode(ids)}


def _fmt_time(seconds):
    seconds = int(max(0, seconds or 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def render(info):
    """The markdown of report.md from `info` (keys: see Run.report_info in run.py)."""
    out, recs = info["out"], info["records"]
    vals = [r for r in recs if r.get("val_loss") is not None]
    lines = [f"# Run report: {out}/", "", f"**{info['status'][:1].upper() + info['status'][1:]}**: "
             f"{info['step']:,} steps, {info['tokens']:,} tokens in {_fmt_time(info['elapsed'])}.", ""]

    lines += ["## The run", ""]
    lines += _table(["session", "command", "steps", "ended"],
                    [(i + 1, f"`{s['command']}`", f"{s['start_step']:,} -> {s.get('end_step', s['start_step']):,}",
                      s.get("ended", "?")) for i, s in enumerate(info["sessions"])])
    changed = info["changed"]
    lines += ["", "Settings that differ from the defaults"
              + (":" if changed else ": none (the reference recipe, train.py's defaults)."), ""]
    if changed:
        lines += _table(["setting", "value", "default"], changed)
        lines.append("")
    if info["resolved"]:
        lines += ["Defaults that follow from other settings (train.py's `resolve_defaults`): "
                  + ", ".join(f"{k} {v}" for k, v in info["resolved"]) + ".", ""]
    lines += [f"Model: {info['params']:,} parameters, head {info['head']}, "
              f"{'ternary' if info['ternary'] else 'float (--no-ternary)'} core, embedding {info['embed_source']}.", ""]

    d = info["data"]
    lines += ["## Data", "", f"{d['source']}: `{d['path']}`", ""]
    lines += _table(["split", "documents", "tokens", "bytes"],
                    [(s, f"{d.get(s + '_documents', 0):,}", f"{d.get(s + '_tokens', 0):,}", f"{d.get(s + '_bytes', 0):,}")
                     for s in ("train", "val")])

    lines += ["", "## Speed", ""]
    secs = sum(s.get("train_seconds", 0.0) for s in info["sessions"])
    toks = sum(s.get("end_tokens", s["start_tokens"]) - s["start_tokens"] for s in info["sessions"])
    lines.append(f"{info['step']:,} steps, {info['tokens']:,} tokens in {_fmt_time(info['elapsed'])} of wall clock; "
                 f"the training steps alone ran at **{toks / max(secs, 1e-9):,.0f} tokens/s** "
                 f"({info['processes']} process(es) x {info['threads']}).")
    if info.get("shares"):
        lines += ["", f"Where a training step's time went ({info['shares_note']}):", ""]
        lines += _table(["part", "share of the step"], [(k, f"{100 * v:.1f}%") for k, v in info["shares"].items()])

    lines += ["", "## Validation", ""]
    if vals:
        best = min(vals, key=lambda r: r["val_loss"])
        last = vals[-1]
        lines += _table(["", "step", "val loss (nats/token)", "bits per byte"],
                        [("best", f"{best['step']:,}", f"{best['val_loss']:.4f}", f"{best.get('val_bpb', 0):.4f}"),
                         ("last", f"{last['step']:,}", f"{last['val_loss']:.4f}", f"{last.get('val_bpb', 0):.4f}")])
        if len(vals) > 2:
            lines += ["", "Every evaluation: " + ", ".join(f"{r['step']}: {r['val_loss']:.3f}" for r in vals) + "."]
    else:
        lines.append("No evaluation was logged.")
    if os.path.exists(os.path.join(out, "loss.png")):
        lines += ["", "![training and validation loss](loss.png)"]

    if info.get("sample"):
        s = info["sample"]
        text = s["text"].replace("```", "'''")
        lines += ["", "## A sample", "", f"From {s['weights']}: prompt `{s['prompt']}`, {s['tokens']} tokens, "
                  f"temperature {s['temperature']}, top-k {s['top_k']}, seed {s['seed']} "
                  f"(`python sample.py` gives more):", "", "```", text, "```"]
    lines += ["", f"Checkpoints: {', '.join(info['checkpoints']) or 'none'}. The log: `{out}/log.jsonl`."]
    return "\n".join(lines) + "\n"


def write(info):
    """OUT/report.md, atomically; -> its path."""
    path = os.path.join(info["out"], "report.md")
    with atomic_open(path, "w") as f:
        f.write(render(info))
    return path
