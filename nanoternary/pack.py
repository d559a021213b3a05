"""Packed storage for ternary weights {-1, 0, +1}.

A ternary weight carries log2(3) = 1.585 bits of information, yet NumPy's smallest integer,
int8, spends 8 bits on it. This file stores ternary tensors compactly in generation-time
checkpoints (`python -m nanoternary.generate export`), in two layouts ("schemes"):

  "2bit"   2 bits per weight, 4 weights per byte: one "plus" bit and one "minus" bit.
           Unpacking is a shift and a mask, and the two bits ARE the masks of the add/subtract
           product (y = sum of x where plus - sum of x where minus; `masks_from_packed`). The
           generator unpacks once at load and turns the masks into index lists (generate.py).
  "base3"  5 trits per byte, since 3^5 = 243 <= 256: 8/5 = 1.6 bits per weight, 99% of the
           log2(3) bound. Smaller, but unpacking needs a division (done once, as a table).

For the 256 x 683 GLU matrices of the reference model (174,848 weights each):

  int8    174,848 bytes   8.0 bits/weight
  2bit     43,712 bytes   2.0 bits/weight
  base3    34,970 bytes   1.6 bits/weight

API (every function works for any shape, including empty and 0-d):

    packed, shape = pack2(t)           # t: values in {-1, 0, +1}, any int or float dtype
    t = unpack2(packed, shape)         # -> int8 array of `shape`
    packed, shape = pack5(t); t = unpack5(packed, shape)
    packed, shape = pack(t, scheme); t = unpack(packed, shape, scheme)
    plus, minus = masks_from_packed(packed, shape, scheme)     # bool arrays of `shape`
    packed_nbytes(n, scheme)           # ceil(n / 4) or ceil(n / 5)
    bits_per_weight(packed, shape)     # 8 * bytes / weights, for reports

The shape is not stored in the buffer: keep it next to the bytes (the export does). Weights are
taken in C order (row-major), so tensor element i (flat index) is weight i below.

Run `python -m nanoternary.pack` for a demonstration on a reference-sized matrix.

Packed checkpoints for generation (`export_packed`, `load_weights`, `python -m nanoternary.generate
export`): the bit packing above applied to a whole model.

A .npz with the checkpoint.py conventions (JSON meta, written to a .tmp and renamed):

    param/<name>    every float tensor except the 4 ternary latents (embed.w as float16 optionally)
    ternary/<name>  the QUANTIZED ternary weights, packed here: "2bit" (2 bits/weight) or
                    "base3" (5 trits per byte, 1.6 bits/weight); shape and scale s in the meta
    cmap/<key>      the hier head's class map
    meta            {"format": "nanoternary-packed-1", "kind": "packed", "scheme", "config", ...}

The ternary weights are stored as the model's quantizer produced them, and the generator uses them
as they are. Quantizing them again would not be safe: absmean is not idempotent (a ternary matrix
without zeros has mean|W| = 1, and the rule W > 1 then turns every weight to 0).
"""
import math
import os
import zipfile
from dataclasses import dataclass, field

import numpy as np

from .checkpoint import (CheckpointError, check_params, check_replaceable, check_zip, class_map_from_state,
                         load_checkpoint, load_model, parse_meta, read_npz, resolve)
from .fileio import atomic_open
from .runlog import dumps
from .model import TERNARY, Model, ModelConfig, param_shapes, quantize

PACKED_FORMAT = "nanoternary-packed-1"

SCHEMES = ("2bit", "base3")


# ----------------------------------------------------------------------------------------------
# validation helpers


def _as_shape(shape):
    """Normalise an int or a sequence of ints to a tuple; reject negative sizes."""
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must have non-negative sizes, got {shape}")
    return shape


def _ternary_masks(t, who):
    """Return (plus, minus) bool masks of t, raising ValueError if t is not ternary."""
    t = np.asarray(t)
    if not (np.issubdtype(t.dtype, np.number) or t.dtype == np.bool_):
        raise ValueError(f"{who}: expected a numeric array of -1/0/+1, got dtype {t.dtype}")
    plus = t == 1
    minus = t == -1
    bad = ~(plus | minus | (t == 0))  # also catches 0.5, NaN, inf
    if bad.any():
        where = np.unravel_index(int(np.flatnonzero(bad)[0]), t.shape)
        raise ValueError(
            f"{who}: weights must be ternary (-1, 0, +1); found {t[where].item()!r} at index "
            f"{tuple(int(i) for i in where)} ({int(bad.sum())} of {t.size} values are not ternary)"
        )
    return plus, minus


def _as_packed(packed, shape, scheme, who):
    """Check that `packed` is a uint8 buffer of exactly the size `shape` needs; return it flat."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise ValueError(f"{who}: packed buffer must be uint8, got dtype {packed.dtype}")
    shape = _as_shape(shape)
    n = math.prod(shape)
    expected = packed_nbytes(n, scheme)
    if packed.size != expected:
        raise ValueError(
            f"{who}: a buffer for shape {shape} ({n} weights, scheme {scheme!r}) must hold "
            f"{expected} bytes, got {packed.size}"
        )
    return packed.reshape(-1), shape, n


def packed_nbytes(n, scheme):
    """Bytes needed for n ternary weights: ceil(n/4) for "2bit", ceil(n/5) for "base3"."""
    per_byte = {"2bit": 4, "base3": 5}.get(scheme)
    if per_byte is None:
        raise ValueError(f"unknown packing scheme {scheme!r}; expected one of {SCHEMES}")
    return -(-int(n) // per_byte)  # ceil division on integers


def bits_per_weight(packed, shape):
    """Storage cost 8 * bytes / weights of a packed tensor (the shape itself is not counted).

    2.0 for "2bit" and 1.6 for "base3" on large tensors; a little more on small ones, whose
    last byte is only partly used. NaN for an empty tensor (no weights to divide by).
    """
    n = math.prod(_as_shape(shape))
    return 8.0 * np.asarray(packed).nbytes / n if n else float("nan")


# ----------------------------------------------------------------------------------------------
# "2bit": 4 weights per byte
#
#   byte k holds weights 4k .. 4k+3, lowest bits first:
#
#       bit:     7     6  |  5     4  |  3     2  |  1     0
#              minus plus | minus plus| minus plus| minus plus
#              weight 4k+3| weight 4k+2| weight 4k+1| weight 4k
#
#   so weight j of a byte has the 2-bit code (plus + 2 * minus) at bits 2j, 2j+1:
#       code 0 -> 0,  code 1 -> +1,  code 2 -> -1,  code 3 -> invalid (both bits set).
#   Example: [+1, -1, 0, +1] -> codes 1, 2, 0, 1 -> 1 + 2*4 + 0*16 + 1*64 = 73.
#
#   Written as a bit stream this is just [plus_0, minus_0, plus_1, minus_1, ...], which
#   np.packbits(bitorder="little") turns into bytes, 8 bits (= 4 weights) at a time, padding
#   the last byte with zero bits (= weights 0).


def pack2(t):
    """Pack a ternary tensor at 2 bits per weight. t any shape -> (packed (ceil(n/4),) uint8, shape)."""
    t = np.asarray(t)
    plus, minus = _ternary_masks(t, "pack2")
    bits = np.stack([plus.reshape(-1), minus.reshape(-1)], axis=1)  # (n, 2): plus bit, minus bit
    packed = np.packbits(bits.reshape(-1), bitorder="little")
    return packed, t.shape


def _unpack2_bits(packed, shape, who):
    """packed (ceil(n/4),) uint8 -> (plus (n,), minus (n,)) bools, checking codes and padding."""
    packed, shape, n = _as_packed(packed, shape, "2bit", who)
    bits = np.unpackbits(packed, bitorder="little")  # (8 * nbytes,) = 2 bits per weight + padding
    if bits[2 * n:].any():
        raise ValueError(f"{who}: padding bits after weight {n} are not zero: wrong shape or corrupt buffer")
    bits = bits[: 2 * n].reshape(n, 2).view(np.bool_)
    plus, minus = bits[:, 0], bits[:, 1]
    both = plus & minus
    if both.any():
        i = int(np.flatnonzero(both)[0])
        raise ValueError(f"{who}: invalid code 3 (plus and minus bits both set) for weight {i} in byte {i // 4}")
    return plus, minus, shape


def unpack2(packed, shape):
    """Inverse of pack2: packed (ceil(n/4),) uint8 -> int8 array of `shape` with values -1/0/+1."""
    plus, minus, shape = _unpack2_bits(packed, shape, "unpack2")
    t = plus.astype(np.int8) - minus.astype(np.int8)  # code (plus, minus) -> plus - minus
    return t.reshape(shape)


# ----------------------------------------------------------------------------------------------
# "base3": 5 weights per byte
#
#   Shift each weight to a base-3 digit d = t + 1 in {0, 1, 2} and read 5 digits as one number
#   written in base 3, least significant first:
#
#       byte k = d_{5k} + 3 d_{5k+1} + 9 d_{5k+2} + 27 d_{5k+3} + 81 d_{5k+4}   (0 .. 242)
#
#   Example: [+1, -1, 0, +1, 0] -> digits 2, 0, 1, 2, 1 -> 2 + 0 + 9 + 54 + 81 = 146.
#   A short last group is padded with digit 0, so when n % 5 = r > 0 the last byte is < 3^r
#   (unpacking checks it, which catches most shape mix-ups). Bytes 243..255 never occur.
#
#   Unpacking a byte b is repeated divmod: d_0 = b % 3, d_1 = (b // 3) % 3, ... With only 243
#   possible bytes, we do it once for every byte value into a (243, 5) table of trits and then
#   unpack any tensor with one fancy-indexing lookup: TRITS[packed] -> (nbytes, 5).

_POW3 = 3 ** np.arange(5, dtype=np.int32)  # [1, 3, 9, 27, 81]
_TRITS = ((np.arange(243)[:, None] // _POW3) % 3 - 1).astype(np.int8)  # (243, 5): byte -> 5 trits


def pack5(t):
    """Pack a ternary tensor at 5 trits per byte. t any shape -> (packed (ceil(n/5),) uint8, shape)."""
    t = np.asarray(t)
    plus, minus = _ternary_masks(t, "pack5")
    n = t.size
    digits = np.zeros(packed_nbytes(n, "base3") * 5, dtype=np.int32)  # padding digits stay 0
    digits[:n] = plus.reshape(-1).astype(np.int32) - minus.reshape(-1) + 1  # d = t + 1 in {0,1,2}
    packed = digits.reshape(-1, 5) @ _POW3  # one base-3 number per group of 5: at most 242
    return packed.astype(np.uint8), t.shape


def _check_base3(packed, shape, who):
    packed, shape, n = _as_packed(packed, shape, "base3", who)
    if packed.size and packed.max() >= 243:
        k = int(np.flatnonzero(packed >= 243)[0])
        raise ValueError(f"{who}: byte {k} is {int(packed[k])}, but 5 trits only reach 3^5 - 1 = 242")
    r = n % 5
    if r and packed[-1] >= 3**r:
        raise ValueError(f"{who}: padding trits of the last byte are not zero: wrong shape or corrupt buffer")
    return packed, shape, n


def unpack5(packed, shape):
    """Inverse of pack5: packed (ceil(n/5),) uint8 -> int8 array of `shape` with values -1/0/+1."""
    packed, shape, n = _check_base3(packed, shape, "unpack5")
    t = _TRITS[packed].reshape(-1)[:n]  # (nbytes, 5) trits, flattened in weight order, padding cut
    return t.reshape(shape)


# ----------------------------------------------------------------------------------------------
# by scheme name, and the masks the add/subtract kernel consumes

_PACK = {"2bit": pack2, "base3": pack5}
_UNPACK = {"2bit": unpack2, "base3": unpack5}


def _scheme(scheme):
    if scheme not in SCHEMES:
        raise ValueError(f"unknown packing scheme {scheme!r}; expected one of {SCHEMES}")
    return scheme


def pack(t, scheme="2bit"):
    """pack2 or pack5 by scheme name ("2bit" or "base3") -> (packed uint8, shape)."""
    return _PACK[_scheme(scheme)](t)


def unpack(packed, shape, scheme="2bit"):
    """unpack2 or unpack5 by scheme name -> int8 array of `shape`."""
    return _UNPACK[_scheme(scheme)](packed, shape)


def masks_from_packed(packed, shape, scheme="2bit"):
    """Packed ternary weights -> (plus, minus): bool arrays of `shape`, W = plus - minus.

    These are what an add/subtract matvec needs: y_j = sum_i x_i [plus_ij] - sum_i x_i [minus_ij].
    For "2bit" the masks are read straight off the bits, never building the int8 tensor.
    """
    if _scheme(scheme) == "2bit":
        plus, minus, shape = _unpack2_bits(packed, shape, "masks_from_packed")
        return plus.reshape(shape), minus.reshape(shape)
    packed, shape, n = _check_base3(packed, shape, "masks_from_packed")
    t = _TRITS[packed].reshape(-1)[:n].reshape(shape)
    return t == 1, t == -1


# ----------------------------------------------------------------------------------------------
# what the generator runs from: float tensors + the quantized ternary matrices


@dataclass
class InferenceWeights:
    """Everything generation needs, from a Model or from a packed checkpoint.

    params   name -> float array: embedding, norm gains, conv weights, hier class vectors
             (every parameter except the four ternary latents)
    ternary  name -> (W_t (O, I) int8 in {-1, 0, +1}, s float): the quantized matrices, as they are
    """
    cfg: ModelConfig
    params: dict
    ternary: dict
    class_map: object = None          # ops.hier_head.ClassMap for the hier head
    meta: dict = field(default_factory=dict)
    kind: str = "model"               # "model" (in memory), "full" or "packed" (loaded from a file)
    path: str = None

    @property
    def dtype(self):
        return self.params["norm_f.g"].dtype


def weights_from_model(model):
    """A Model's weights for generation: its ternary weights quantized now (model.quantize) and
    its float tensors (the model's own arrays, not copies): build a new Generator after training more."""
    q = quantize(model.params, model.cfg)
    ternary = {}
    for name in TERNARY:
        wt, s = q[name]
        if model.cfg.ternary:
            ternary[name] = (wt.astype(np.int8), float(s))
        else:  # float weights (ternary=False): kept as they are, only the "blas" kernel applies
            ternary[name] = (np.array(wt), float(s))
    params = {k: v for k, v in model.params.items() if k not in TERNARY}
    return InferenceWeights(model.cfg, params, ternary, model.hier, dict(getattr(model, "meta", {})),
                            "model", None)


def _peek_kind(path):
    """"packed" or "full", reading only the meta member (a full checkpoint is validated by Model.load)."""
    check_zip(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if "meta" not in z.files:
                raise CheckpointError(f"{path} is a .npz file but not a nanoternary checkpoint (no 'meta' entry)")
            meta = parse_meta(z["meta"], path)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a readable nanoternary checkpoint ({type(e).__name__}: "
                              f"{e}); it may be truncated or corrupt") from None
    return "packed" if isinstance(meta, dict) and meta.get("kind") == "packed" else "full"


def load_weights(path, dtype=None, ema=False):
    """A checkpoint for generation: a full one (train.py's) or a packed one, the file or its run
    folder (-> latest.npz). Raises CheckpointError for missing, damaged or foreign files.
    ema=True: a full checkpoint's EMA-averaged weights (what train.py evaluates with --ema)."""
    f = resolve(path)
    if _peek_kind(f) == "packed":
        if ema:
            raise CheckpointError(f"{f} is a packed checkpoint with one set of weights; to sample "
                                  f"the EMA weights, export them with `export --ema`")
        return load_packed(f, dtype)
    w = weights_from_model(_load_full(f, dtype, ema))
    w.kind, w.path = "full", f
    return w


def _load_full(path, dtype=None, ema=False):
    """Model.load, with the EMA weights (opt/ema/shadow/<name>) in place of the trained ones if ema."""
    model = load_model(path, dtype=dtype)
    if ema:
        _, _, opt, _ = load_checkpoint(path)
        prefix = "ema/shadow/"
        shadow = {k[len(prefix):]: v for k, v in opt.items() if k.startswith(prefix)}
        if not shadow:
            raise CheckpointError(f"{path} has no EMA weights (trained without --ema)")
        check_params(shadow, {k: v.shape for k, v in model.params.items()}, f"{path} (EMA weights)")
        for k, v in shadow.items():
            model.params[k] = np.ascontiguousarray(v, dtype=model.dtype)
        model.meta = {**model.meta, "ema": True}
    return model


def as_weights(source, dtype=None):
    """InferenceWeights from a Model, InferenceWeights, or a checkpoint path (full or packed)."""
    if isinstance(source, InferenceWeights):
        return source
    if isinstance(source, Model):
        return weights_from_model(source)
    if isinstance(source, (str, os.PathLike)):
        return load_weights(os.fspath(source), dtype)
    raise TypeError(f"expected a Model, InferenceWeights or a checkpoint path, got {type(source).__name__}")


# ----------------------------------------------------------------------------------------------
# packed checkpoints: a whole model for generation


def export_packed(source, path, scheme="2bit", embed_fp16=False, ema=False):
    """Write a compact generation checkpoint; -> a report dict (sizes in bytes, bits per weight).

    source: a Model, or a checkpoint path (file or run folder). The four ternary matrices are
    quantized with the model's own rule (model.quantize) and packed with `scheme` ("2bit" or
    "base3"); every other tensor is stored as float (embed.w as float16 if embed_fp16: half the
    file, a rounding of the embedding, so logits change slightly). ema=True packs a checkpoint's
    EMA-averaged weights instead of the trained ones.
    """
    source_path = None
    if isinstance(source, Model):
        if ema:
            raise ValueError("ema=True needs a checkpoint path (the EMA weights are in the checkpoint)")
        model = source
    else:
        source_path = resolve(os.fspath(source))
        model = _load_full(source_path, ema=ema)
    if not model.cfg.ternary:
        raise ValueError("this model has a float core (trained with --no-ternary): there are no ternary weights "
                         "to pack; sample.py and evaluate read its checkpoint as it is")
    w = weights_from_model(model)
    w.path = source_path
    rep = save_packed(w, path, scheme, embed_fp16)
    rep["source_checkpoint"] = source_path
    rep["source_bytes"] = os.path.getsize(source_path) if source_path else None
    return rep


def save_packed(w, path, scheme="2bit", embed_fp16=False):
    """Write InferenceWeights `w` as a packed checkpoint, atomically; -> the size report.
    The ternary weights are packed exactly as they are in w.ternary (int8 -1/0/+1)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown packing scheme {scheme!r}; expected one of {SCHEMES}")
    arrays, tern_meta = {}, {}
    for k, v in w.params.items():
        arrays[f"param/{k}"] = v.astype(np.float16) if (k == "embed.w" and embed_fp16) else v
    n_weights = n_bytes = 0
    for name, (wt, s) in w.ternary.items():
        packed, shape = pack(wt, scheme)                      # ValueError if not -1/0/+1
        arrays[f"ternary/{name}"] = packed
        tern_meta[name] = {"shape": list(shape), "scale": float(s),
                           "bits_per_weight": bits_per_weight(packed, shape)}
        n_weights += wt.size
        n_bytes += packed.nbytes
    if w.class_map is not None:
        for k, v in w.class_map.state().items():
            arrays[f"cmap/{k}"] = np.asarray(v)
    meta = {
        "format": PACKED_FORMAT,
        "kind": "packed",
        "scheme": scheme,
        "config": w.cfg.to_dict(),
        "dtype": str(w.dtype),
        "embed_dtype": "float16" if embed_fp16 else str(w.dtype),
        "ternary": tern_meta,
        "source": {"path": w.path, **{k: w.meta[k] for k in ("step", "tokens", "val_loss", "ema")
                                      if k in w.meta}},
    }
    arrays["meta"] = np.frombuffer(dumps(meta).encode(), dtype=np.uint8)     # plain JSON: NaN is null
    check_replaceable(path, "packed")           # never over a training checkpoint, a folder, another file
    with atomic_open(path) as f:                 # atomic, as checkpoint.save_checkpoint
        np.savez(f, **arrays)
    float_bytes = sum(v.nbytes for v in w.params.values()) + n_weights * w.dtype.itemsize
    return {
        "path": path,
        "scheme": scheme,
        "bytes": os.path.getsize(path),
        "float_weights_bytes": float_bytes,        # every parameter as float: a params-only checkpoint
        "ternary_weights": n_weights,
        "ternary_bytes": n_bytes,
        "ternary_float_bytes": n_weights * w.dtype.itemsize,
        "bits_per_ternary_weight": 8.0 * n_bytes / n_weights,
        "embed_dtype": meta["embed_dtype"],
    }


def load_packed(path, dtype=None):
    """InferenceWeights from a packed checkpoint (export_packed's), validated; CheckpointError if not."""
    arrays, meta = read_npz(path)
    if meta.get("format") != PACKED_FORMAT or meta.get("kind") != "packed":
        raise CheckpointError(f"{path}: not a packed generation checkpoint (format {meta.get('format')!r})")
    try:
        cfg = ModelConfig.from_dict(meta["config"])
        scheme = meta["scheme"]
        tern_meta = meta["ternary"]
        saved_dtype = np.dtype(meta["dtype"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its metadata is missing or invalid ({e})") from None
    dtype = np.dtype(dtype) if dtype is not None else saved_dtype
    groups = {"param": {}, "ternary": {}, "cmap": {}}
    for k, v in arrays.items():
        prefix, _, name = k.partition("/")
        if prefix not in groups:
            raise CheckpointError(f"{path}: unexpected entry {k!r}")
        groups[prefix][name] = v
    shapes = param_shapes(cfg)
    float_shapes = {k: s for k, s in shapes.items() if k not in TERNARY}
    check_params(groups["param"], float_shapes, path, floats=(np.float16, np.float32, np.float64))
    if sorted(groups["ternary"]) != sorted(TERNARY) or sorted(tern_meta) != sorted(TERNARY):
        raise CheckpointError(f"{path}: expected packed tensors {list(TERNARY)}, found {sorted(groups['ternary'])}")
    ternary = {}
    for name in TERNARY:
        shape = tuple(tern_meta[name]["shape"])
        if shape != tuple(shapes[name]):
            raise CheckpointError(f"{path}: {name} has shape {shape}, the configuration needs {shapes[name]}")
        try:
            wt = unpack(groups["ternary"][name], shape, scheme)
        except ValueError as e:
            raise CheckpointError(f"{path}: {name} cannot be unpacked ({e})") from None
        ternary[name] = (wt, float(tern_meta[name]["scale"]))
    params = {k: np.ascontiguousarray(v, dtype=dtype) for k, v in groups["param"].items()}
    class_map = None
    if cfg.head == "hier":
        class_map = class_map_from_state(groups["cmap"], cfg, path)
    return InferenceWeights(cfg, params, ternary, class_map, meta, "packed", path)



if __name__ == "__main__":
    # demo: pack a reference-sized GLU matrix both ways and report sizes and round-trip speed
    import time

    rng = np.random.default_rng(0)
    w = rng.choice(np.array([-1, 0, 1], dtype=np.int8), size=(256, 683), p=[0.3, 0.4, 0.3])
    print(f"ternary tensor {w.shape}: {w.size:,} weights, {w.nbytes:,} bytes as int8")
    for scheme in SCHEMES:
        t0 = time.perf_counter()
        packed, shape = pack(w, scheme)
        t1 = time.perf_counter()
        back = unpack(packed, shape, scheme)
        t2 = time.perf_counter()
        assert np.array_equal(back, w)
        print(f"{scheme:>5}: {packed.nbytes:,} bytes, {bits_per_weight(packed, shape):.3f} bits/weight, "
              f"pack {1e3 * (t1 - t0):.2f} ms, unpack {1e3 * (t2 - t1):.2f} ms, round trip exact")
