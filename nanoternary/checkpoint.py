"""Checkpoints: one .npz file per checkpoint, written atomically, validated on load.

Inside the file (np.savez, no pickle):
    param/<name>    the model's latent float weights, one array per parameter
    opt/<key>       optimizer and EMA state (optimizer_state below: "adamw/m/<name>", ...)
    cmap/<key>      the hierarchical head's class map, when the model has one
    meta            a JSON document: format version, model config, step, tokens seen, random
                    state, training arguments, data fingerprint, validation loss

A run folder holds `latest.npz` (every save) and `best.npz` (best validation loss so far).
`load_model(path)`, which is also `Model.load(path)`, takes either file or the folder (then its
`latest.npz`, or its `best.npz` when a run was stopped before its first save: resolve()).

Writes go to a temporary file first, are flushed to disk, then renamed over the old file (fileio.py):
a crash or a full disk in the middle leaves the previous checkpoint as it was. On load, the zip's CRC checks
catch a truncated or corrupted file, the config is checked against the arrays (shapes, a float
dtype, finite values) and what resuming reads of the metadata against its types (check_resumable),
so a damaged or crafted file gives a CheckpointError that says what is wrong instead of a model
with garbage or a traceback. No checkpoint or packed export is ever written over a file of another
kind (check_replaceable): a training checkpoint is not lost to an export that names it as --out.
"""
import json
import numbers
import os
import zipfile

import numpy as np

from .classmap import ClassMap
from .fileio import atomic_open
from .model import Model, ModelConfig, n_hier_classes, param_shapes
from .runlog import dumps

FORMAT = "nanoternary-checkpoint-1"
LATEST, BEST = "latest.npz", "best.npz"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, damaged, or from another configuration."""


def save_checkpoint(path, params, meta, opt_state=None, class_map=None):
    """Write params (+ optimizer state, class map) and the JSON `meta` to `path`, atomically."""
    arrays = {f"param/{k}": v for k, v in params.items()}
    for k, v in (opt_state or {}).items():
        arrays[f"opt/{k}"] = np.asarray(v)
    for k, v in (class_map or {}).items():
        arrays[f"cmap/{k}"] = np.asarray(v)
    meta = {"format": FORMAT, **meta}
    arrays["meta"] = np.frombuffer(dumps(meta).encode(), dtype=np.uint8)   # plain JSON: NaN is null
    check_replaceable(path, "full")
    with atomic_open(path) as f:                    # a full disk, Ctrl-C: the old file stays as it was
        np.savez(f, **arrays)


def resolve(path):
    """A checkpoint file, or a run folder -> its latest.npz, or its best.npz when there is no
    latest.npz (a run stopped after an evaluation and before its first save)."""
    if os.path.isdir(path):
        for name in (LATEST, BEST):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise CheckpointError(f"no checkpoint in {path}/ (looked for {LATEST} and {BEST}): "
                              f"train one first with `python train.py --out {path}`")
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist: train one first with `python train.py`")
    return path


def existing_kind(path):
    """What is at `path` now: None (nothing), "folder", "full" (a training checkpoint), "packed"
    (a generation export), "damaged" (a .npz that cannot be read: truncated, corrupt), or "other"
    (a file that is no nanoternary checkpoint)."""
    if not os.path.lexists(path):
        return None
    if os.path.isdir(path):
        return "folder"
    try:
        check_zip(path)
    except CheckpointError:
        return "other" if os.path.isfile(path) and os.path.getsize(path) else "damaged"
    try:
        with np.load(path, allow_pickle=False) as z:
            if "meta" not in z.files:
                return "other"
            meta = parse_meta(z["meta"], path)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, AttributeError):
        return "damaged"                                  # (CheckpointError is a ValueError)
    return "packed" if meta.get("kind") == "packed" else "full" if meta.get("format") == FORMAT else "other"


KINDS = {"full": "a training checkpoint (it can be resumed)", "packed": "a packed export for generation",
         "other": "not a nanoternary checkpoint", "folder": "a folder"}


def check_replaceable(path, kind):
    """A CheckpointError unless a checkpoint of `kind` ("full" or "packed") may be written at `path`:
    nothing there, one of the same kind, or a damaged one. Anything else would be lost."""
    there = existing_kind(path)
    if there in (None, kind, "damaged"):
        return
    fix = (f"give a file name, such as {os.path.join(path, 'model-packed.npz')}" if there == "folder" else
           "choose another name (--out)")
    raise CheckpointError(f"{path} is {KINDS[there]}: writing {KINDS[kind].split(' (')[0]} over it would lose "
                          f"it; {fix}")


def check_zip(path):
    """np.load reads a file that is not a zip as a pickle and complains about pickles: say it plainly."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if magic != b"PK\x03\x04":
        raise CheckpointError(f"{path} is not a nanoternary checkpoint (not a .npz file: "
                              f"{'empty' if not magic else 'it starts with ' + repr(magic)}); "
                              "train one with `python train.py`")


def read_npz(path):
    """All arrays and the parsed JSON meta of a .npz checkpoint (a full one, or generate.py's packed
    one), or a CheckpointError saying why not."""
    check_zip(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}       # reading every member checks every CRC
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise CheckpointError(f"{path} is not a readable nanoternary checkpoint ({type(e).__name__}: {e}); "
                              "it may be truncated or corrupt: use the run's other checkpoint "
                              "(latest.npz / best.npz) or train again") from None
    if "meta" not in arrays:
        raise CheckpointError(f"{path} is a .npz file but not a nanoternary checkpoint (no 'meta' entry)")
    odd = [k for k, v in arrays.items() if not isinstance(v, np.ndarray)]   # np.load gives raw bytes for those
    if odd:
        raise CheckpointError(f"{path}: its entry {odd[0]!r} is not an array (.npy): the file is damaged or "
                              f"was not written by nanoternary; use the run's other checkpoint")
    meta = parse_meta(arrays.pop("meta"), path)
    return arrays, meta


def parse_meta(array, path):
    """The JSON object stored as the uint8 array `meta`, or a CheckpointError."""
    try:
        meta = json.loads(array.tobytes().decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: its metadata is damaged ({type(e).__name__})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: its metadata is not a JSON object")
    return meta


def load_checkpoint(path):
    """-> (params, meta, opt_state, class_map_state), each a dict; raises CheckpointError."""
    path = resolve(path)
    arrays, meta = read_npz(path)
    if meta.get("kind") == "packed":
        raise CheckpointError(f"{path} is a packed export for generation (sample.py reads it): it holds no "
                              f"optimizer state and cannot be resumed or trained on; use the run's latest.npz "
                              f"or best.npz")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r} (expected {FORMAT})")
    groups = {"param": {}, "opt": {}, "cmap": {}}
    for k, v in arrays.items():
        prefix, _, name = k.partition("/")
        if prefix not in groups:
            raise CheckpointError(f"{path}: unexpected entry {k!r}")
        groups[prefix][name] = v
    return groups["param"], meta, groups["opt"], groups["cmap"]


def check_params(params, shapes, where, floats=(np.float32, np.float64)):
    """Every expected tensor present with its shape, a float dtype (`floats`: float32 or float64 in a
    training checkpoint) and finite values, nothing else: or a CheckpointError naming it."""
    missing = sorted(set(shapes) - set(params))
    extra = sorted(set(params) - set(shapes))
    if missing or extra:
        raise CheckpointError(f"{where} does not match its configuration: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
    for k, shape in shapes.items():
        if tuple(params[k].shape) != tuple(shape):
            raise CheckpointError(f"{where}: {k} has shape {tuple(params[k].shape)}, the configuration "
                                  f"needs {tuple(shape)}")
        if params[k].dtype not in floats:
            raise CheckpointError(f"{where}: {k} holds {params[k].dtype} values, not {' or '.join(np.dtype(f).name for f in floats)} "
                                  f"(the file is damaged or was not written by nanoternary)")
        if not np.isfinite(params[k]).all():
            raise CheckpointError(f"{where}: {k} contains NaN or infinite values")


def load_model(path, dtype=None):
    """A model from a checkpoint written by train.py (the file, or its run folder), with the saved
    dtype unless `dtype` is given; its JSON metadata in `model.meta`. Also `Model.load(path)`."""
    path = resolve(path)
    params, meta, _, cmap_state = load_checkpoint(path)
    return model_from_state(params, meta, cmap_state, path, dtype)


def model_from_state(params, meta, cmap_state, where, dtype=None):
    """A Model from what a checkpoint holds (load_checkpoint's params, meta and class map), checked;
    `where` names the checkpoint in errors."""
    try:
        if not isinstance(meta.get("config"), dict):
            raise TypeError(f"config is {type(meta.get('config')).__name__}, not an object")
        cfg = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{where}: its model config is missing or invalid ({e})") from None
    check_params(params, param_shapes(cfg), where)
    class_map = class_map_from_state(cmap_state, cfg, where) if cfg.head == "hier" else None
    model = Model(cfg, seed=0, dtype=dtype or next(iter(params.values())).dtype, class_map=class_map)
    for k, v in params.items():
        model.params[k] = np.ascontiguousarray(v, dtype=model.dtype)
    model.meta = meta
    return model


def class_map_from_state(state, cfg, where):
    """The hier head's class map saved in a checkpoint (`state`), checked against the model's config."""
    V, n = cfg.vocab_size, n_hier_classes(cfg)
    tc = state.get("token_class")
    if tc is None:
        raise CheckpointError(f"{where}: a hier-head checkpoint without its class map (cmap/token_class)")
    if tc.shape != (V,) or not np.issubdtype(tc.dtype, np.integer) or tc.min() < 0 or tc.max() >= n:
        raise CheckpointError(f"{where}: its class map does not fit the model ({tc.shape} {tc.dtype}, classes "
                              f"{tc.min()}..{tc.max()}; the model has {V} tokens and {n} classes)")
    try:
        return ClassMap.from_state(state)
    except ValueError as e:
        raise CheckpointError(f"{where}: its class map is invalid ({e})") from None


def check_resumable(meta, where):
    """A CheckpointError unless what a resume reads of the metadata has its types: the counters
    (step, tokens: integers >= 0; elapsed: seconds), the two generators' states (NumPy's PCG64
    accepts them), the settings (objects), best_val (a number or null)."""
    def bad(what):
        return CheckpointError(f"{where}: its metadata is damaged ({what}); resume from the run's other "
                               f"checkpoint (latest.npz / best.npz)")
    for k in ("step", "tokens"):
        v = meta.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise bad(f"{k} is {v!r}, not a count")
    for k, allow_none in (("elapsed", False), ("best_val", True)):
        v = meta.get(k)
        if not ((v is None and allow_none) or (isinstance(v, numbers.Real) and not isinstance(v, bool)
                                                and np.isfinite(v) and (k != "elapsed" or v >= 0))):
            raise bad(f"{k} is {v!r}")
    for k in ("config", "train"):
        if not isinstance(meta.get(k), dict):
            raise bad(f"{k} is {type(meta.get(k)).__name__}, not an object")
    for k in ("rng", "model_rng"):
        try:
            np.random.default_rng().bit_generator.state = meta[k]
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise bad(f"{k} is not a generator's state: {type(e).__name__}") from None
    if not isinstance(meta.get("data", {}), dict) or not isinstance(meta.get("embed_source"), str):
        raise bad("data or embed_source")


# Model.load(path), the name people reach for, is load_model: model.py knows the architecture and no
# file format, so it imports nothing of this file, and the method is attached here (nanoternary's
# __init__.py imports this module, so Model.load works whatever was imported first).
Model.load = staticmethod(load_model)


# ----------------------------------------------------------------------------------------------
# optimizer state: the moments of AdamW and NorMuon, the EMA's averaged weights


def optimizer_state(opt):
    """A flat dict of arrays for np.savez: {"kind": ..., "m/<name>", "v/<name>", "t/<name>"} for
    AdamW and NorMuon, {"kind", "num_updates", "shadow/<name>"} for the EMA. Hyperparameters are not
    stored: they come from the run's config."""
    if opt.kind == "EMA":
        return {"kind": "EMA", "num_updates": opt.num_updates, **{"shadow/" + k: s for k, s in opt.shadow.items()}}
    d = {"kind": opt.kind}
    for k in opt.names:
        d["m/" + k], d["v/" + k], d["t/" + k] = opt.m[k], opt.v[k], opt.t[k]
    return d


def optimizers_state(optimizers):
    """{"muon": NorMuon, "adamw": AdamW, ...} -> one flat dict for save_checkpoint's opt_state,
    each optimizer's entries under its name: "adamw/m/embed.w", ..."""
    return {f"{name}/{k}": v for name, o in optimizers.items() for k, v in optimizer_state(o).items()}


def load_optimizers(state, optimizers, where):
    """Restore every optimizer of {"muon": NorMuon, ...} from a checkpoint's optimizer state (the
    third part of load_checkpoint's answer); `where` names the checkpoint in errors."""
    for name, o in optimizers.items():
        part = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + "/")}
        if not part:
            raise CheckpointError(f"{where} has no {name} state to resume from")
        load_optimizer_state(o, part, where)


def load_optimizer_state(opt, d, where="checkpoint"):
    """Restore what optimizer_state saved into the live optimizer `opt` (copied, shapes checked),
    or a CheckpointError naming what does not fit."""
    kind = str(np.asarray(d.get("kind", opt.kind)))
    if kind != opt.kind:
        raise CheckpointError(f"{where}: holds the state of a {kind} where a {opt.kind} was expected")
    if opt.kind == "EMA":
        arrays = {"shadow/" + k: s for k, s in opt.shadow.items()}
    else:
        arrays = {f"{s}/{k}": getattr(opt, s)[k] for k in opt.names for s in ("m", "v")}
    counts = {"num_updates"} if opt.kind == "EMA" else {"t/" + k for k in opt.names}
    missing = [k for k in (*arrays, *counts) if k not in d]
    extra = sorted(set(d) - set(arrays) - counts - {"kind"})
    if missing or extra:
        raise CheckpointError(f"{where}: the {opt.kind} state does not fit this model: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}")
    try:
        for k, live in arrays.items():
            saved = np.asarray(d[k])
            if saved.shape != live.shape:
                raise CheckpointError(f"{where}: {opt.kind} {k} has shape {saved.shape}, expected {live.shape}")
            if saved.dtype.kind != "f" or not np.isfinite(saved).all():
                raise CheckpointError(f"{where}: {opt.kind} {k} holds {saved.dtype} values or non-finite ones")
            np.copyto(live, saved, casting="same_kind")
        counts = {k: np.asarray(d[k]) for k in counts}
        if any(c.shape != () or c.dtype.kind not in "iu" or c < 0 for c in counts.values()):
            raise CheckpointError(f"{where}: the {opt.kind} state's step counts are not counts")
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{where}: the {opt.kind} state is damaged ({e})") from None
    if opt.kind == "EMA":
        opt.num_updates = int(counts["num_updates"])
    else:
        for k in opt.names:
            opt.t[k] = int(counts["t/" + k])
