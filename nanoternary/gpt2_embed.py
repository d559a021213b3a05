"""GPT-2's token embedding projected to d_model dimensions by truncated SVD: the reference's init.

FlashLM v3 starts its 50257 x 256 tied embedding from GPT-2's token embedding `wte.weight`
(openai-community/gpt2, 50257 x 768) projected to 256 dimensions by a truncated SVD, P = U_k S_k.
This file does that with NumPy alone:

    fetch_gpt2_wte()       reads only the wte tensor (154 MB of the 548 MB model.safetensors) through
                           huggingface_hub's HfFileSystem: the safetensors header, then one byte
                           range, and nothing more (no read-ahead)
    svd_project(W, d)      P = U_d S_d and the fraction of the variance kept
    load_gpt2_embedding(d) the two above, cached as data/gpt2_wte_svd{d}.npy; None when offline
    random_embedding(...)  the fallback: N(0, std^2), as the PyTorch peer initialises (std 0.02)

    python -m nanoternary.gpt2_embed --d-model 256     # fetch, project, cache, print the numbers

The safetensors format (https://huggingface.co/docs/safetensors): an 8-byte little-endian
unsigned header size N, then N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin,
end]}, "__metadata__": {...}}, then the raw little-endian tensor bytes; offsets count from the end
of the header.

Scale (what the caller gets). GPT-2's wte rows have norms of about 3 to 4 (entries of std about
0.14). The projection is not centred (the reference takes U_k S_k of the raw matrix, and so do we),
so each row keeps its coordinates in the top-d right singular directions: row norms shrink only
by the share of variance dropped (about sqrt(kept) on average), i.e. rows of norm about 3. The
model ties this matrix with the output head, logits = h @ E^T with h RMS-normalised (norm
sqrt(d_model) = 16), so a raw GPT-2 row gives logits of size |h| |e| cos, tens for a token
aligned with h, against 0.02 * 16 = 0.3 for the random init. `target_std` rescales the whole
matrix so that its entries have that standard deviation (0.02 matches the random init; the
geometry, i.e. which tokens are near which, is kept); None (the default) returns U_k S_k as the
reference does.
"""
import argparse
import json
import math
import os
import struct

import numpy as np

from .fileio import atomic_open, remove_stale_temps
from .sources import brief, call_with_timeout, hub_offline_reason

GPT2_PATH = "openai-community/gpt2/model.safetensors"  # HfFileSystem path: repo id + file
WTE_NAMES = ("wte.weight", "transformer.wte.weight")     # GPT-2's file says the first; HF's
                                                         # GPT2LMHeadModel exports say the second
GPT2_VOCAB, GPT2_DIM = 50257, 768
HUB_TIMEOUT = 15.0       # seconds the hub has to answer the opening of the file (see fetch_gpt2_wte)

# safetensors dtype -> how to read its bytes (all little-endian). NumPy has no bfloat16: BF16 is
# read as uint16 and widened to float32 (a bfloat16 is the top 16 bits of a float32).
SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


# ----------------------------------------------------------------------------------------------
# reading one tensor of a safetensors file


def read_safetensors_header(f):
    """Read the header of an open safetensors file -> (header dict, offset where the data starts)."""
    raw = f.read(8)
    if len(raw) != 8:
        raise ValueError("not a safetensors file: shorter than its 8-byte header size")
    (n,) = struct.unpack("<Q", raw)                 # u64, little-endian
    if n > 100_000_000:
        raise ValueError(f"not a safetensors file: header size {n} bytes")
    header = json.loads(f.read(n))
    return header, 8 + n


def read_tensor(f, names):
    """Read one tensor from an open safetensors file, touching only the header and its own bytes.

    names: a name or a tuple of alternative spellings (the first present is read).
    Returns an array of the stored shape: float64 / float32 / float16 as stored, BF16 as float32.
    """
    names = (names,) if isinstance(names, str) else tuple(names)
    header, data_start = read_safetensors_header(f)
    name = next((n for n in names if n in header), None)
    if name is None:
        found = [k for k in header if k != "__metadata__"]
        raise KeyError(f"none of {names} in the safetensors header (it has {found[:5]}...)")
    info = header[name]
    dtype = info["dtype"]
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"{name}: dtype {dtype} not supported (F64, F32, F16, BF16)")
    shape = tuple(info["shape"])
    begin, end = info["data_offsets"]
    np_dtype = np.dtype(SAFETENSORS_DTYPES[dtype])
    if end - begin != math.prod(shape) * np_dtype.itemsize:
        raise ValueError(f"{name}: {end - begin} bytes for shape {shape} of {dtype}")
    f.seek(data_start + begin)
    raw = f.read(end - begin)                       # the one large read: this tensor's bytes only
    if len(raw) != end - begin:
        raise ValueError(f"{name}: file truncated ({len(raw)} of {end - begin} bytes)")
    x = np.frombuffer(raw, dtype=np_dtype).reshape(shape)
    if dtype == "BF16":
        x = (x.astype(np.uint32) << 16).view(np.float32)
    return x


def fetch_gpt2_wte(fs=None, path=GPT2_PATH):
    """GPT-2's token embedding (50257, 768) as float32, read from model.safetensors on the hub.

    fs: an fsspec filesystem; None for huggingface_hub.HfFileSystem (some tests pass a local one).
    Only the header and the wte bytes are transferred: the file is opened without read-ahead
    (cache_type="none"), so each read is one HTTP range request for exactly the bytes asked for,
    where fsspec's default cache would fetch a 5 MiB block for the 8-byte header size alone.
    Opening the file (the repository's info and its folder listing, which has no timeout of its
    own) must answer within HUB_TIMEOUT seconds, else sources.HubUnreachable; the reads are bounded by
    huggingface_hub's own timeout and retries (HF_HUB_DOWNLOAD_TIMEOUT, 10 s without a byte).
    """
    if fs is None:
        from huggingface_hub import HfFileSystem
        fs = HfFileSystem()
    with call_with_timeout(lambda: fs.open(path, "rb", cache_type="none"), HUB_TIMEOUT) as f:
        W = read_tensor(f, WTE_NAMES)
    return W.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------------
# truncated SVD


def gram_eigh(W, rows_per_chunk=8192):
    # W (V, D) -> s2 (D,), Vecs (D, D)
    """The right singular vectors and squared singular values of W, from the D x D Gram matrix.

    W = U S V^T gives W^T W = V S^2 V^T, so an eigendecomposition of the 768 x 768 matrix W^T W
    yields V and S^2 without ever forming the 50257 x 768 U. W^T W is summed in float64 over row
    chunks (float32 would square the rounding of the small singular values; chunks keep the
    float64 copy of W small). Returned in decreasing order; each column's sign is fixed so its
    largest entry is positive, so the result does not depend on the LAPACK build.
    """
    V_, D = W.shape
    G = np.zeros((D, D))
    for i in range(0, V_, rows_per_chunk):
        Wc = W[i:i + rows_per_chunk].astype(np.float64)
        G += Wc.T @ Wc                                       # (D, D)
    s2, Vecs = np.linalg.eigh(G)                             # ascending
    s2, Vecs = np.maximum(s2[::-1], 0.0), Vecs[:, ::-1]      # descending; -1e-12 roundoff -> 0
    signs = np.sign(Vecs[np.argmax(np.abs(Vecs), axis=0), np.arange(D)])
    return s2, Vecs * signs


def svd_project(W, d, rows_per_chunk=8192):
    # W (V, D) -> P (V, d), kept
    """Truncated SVD: P = U_d S_d = W V_d, the coordinates of each row in W's top-d right
    singular directions, and kept = sum(S_d^2) / sum(S^2), the fraction of variance kept.

    Not centred, as the reference: the raw matrix, so the mean row (a large common component in
    GPT-2's embedding) is part of what is kept. P is the best rank-d approximation in the sense
    that P V_d^T = U_d S_d V_d^T (Eckart-Young); P P^T = W W^T when d is W's full rank.
    """
    V_, D = W.shape
    if not 1 <= d <= min(V_, D):
        raise ValueError(f"cannot project {W.shape} to {d} dimensions (at most {min(V_, D)})")
    s2, Vecs = gram_eigh(W, rows_per_chunk)
    Vd = Vecs[:, :d]                                         # (D, d)
    P = np.empty((V_, d), dtype=W.dtype)
    for i in range(0, V_, rows_per_chunk):
        P[i:i + rows_per_chunk] = W[i:i + rows_per_chunk].astype(np.float64) @ Vd  # U_d S_d
    kept = float(s2[:d].sum() / s2.sum())
    return P, kept


def random_embedding(V, d, rng, std=0.02, dtype=np.float32):
    """The fallback init: (V, d) entries drawn from N(0, std^2), as the PyTorch peer's nn.init.normal_.
    dtype float32 or float64 (what Generator.standard_normal can draw)."""
    E = rng.standard_normal((V, d), dtype=dtype)  # float32 drawn directly: no 100 MB float64 copy
    E *= std
    return E


# ----------------------------------------------------------------------------------------------
# the cached, offline-aware entry point


def _load_cache(path, vocab_size, d_model, verbose):
    """The cached projection, or None if absent or unusable (then it is rebuilt)."""
    if not os.path.exists(path):
        return None
    try:
        P = np.load(path, allow_pickle=False)
        if P.shape != (vocab_size, d_model) or P.dtype != np.float32 or not np.isfinite(P).all():
            raise ValueError(f"shape {P.shape} {P.dtype}, expected ({vocab_size}, {d_model}) float32")
        return P
    except Exception as e:  # a truncated or foreign file: np.load raises several kinds
        if verbose:
            print(f"gpt2_embed: cache {path} is unusable ({e}); rebuilding it")
        return None


def load_gpt2_embedding(d_model, cache_dir="data", fs=None, verbose=True, target_std=None,
                        path=GPT2_PATH, vocab_size=GPT2_VOCAB):
    """GPT-2's embedding projected to (vocab_size, d_model) float32, or None without network.

    Cached as `cache_dir/gpt2_wte_svd{d_model}.npy` (with a .json beside it recording the
    variance kept); a cache of the wrong shape or dtype, or unreadable, is rebuilt. Without a
    cache and without the hub (HF_HUB_OFFLINE=1, or the host unreachable) it prints one line
    saying so and returns None: the caller then uses random_embedding().

    target_std: None returns U_k S_k unscaled (the reference; rows of norm about 3); a number
    rescales the whole matrix so its entries have that std (see the module docstring).
    fs, path, vocab_size: where to read from (tests pass a local fsspec filesystem and a tiny file).
    """
    say = print if verbose else (lambda *a, **k: None)
    cache = os.path.join(cache_dir, f"gpt2_wte_svd{d_model}.npy")
    info_path = cache[:-len(".npy")] + ".json"
    P = _load_cache(cache, vocab_size, d_model, verbose)
    if P is not None:
        kept = None
        try:
            with open(info_path) as f:
                kept = json.load(f)["kept"]
        except (OSError, ValueError, KeyError):
            pass
        say(f"gpt2_embed: GPT-2 embedding projected to {d_model} dims from {cache}"
            + (f" ({kept:.1%} of the variance kept)" if kept is not None else ""))
    else:
        if fs is None:
            reason = hub_offline_reason()
            if reason is not None:
                say(f"gpt2_embed: no network ({reason}): cannot fetch GPT-2's embedding, "
                    "using a random initialisation")
                return None
        try:
            W = fetch_gpt2_wte(fs, path)
        except Exception as e:  # the hub went away half-way, a proxy answered, ...: not fatal
            # one line: an HTTP error's own text runs over several (status, URL, the server's message)
            say(f"gpt2_embed: could not fetch GPT-2's embedding ({brief(e)}), using a random initialisation")
            return None
        if W.shape[0] != vocab_size:
            raise ValueError(f"GPT-2's wte has {W.shape[0]} rows, the model's vocabulary {vocab_size}")
        P, kept = svd_project(W, d_model)
        src_shape = W.shape
        del W
        try:
            os.makedirs(cache_dir, exist_ok=True)
            remove_stale_temps(cache_dir)       # left by a run killed while saving
            with atomic_open(cache) as f:       # a crash or a full disk leaves the old file or the new one
                np.save(f, P)
            with atomic_open(info_path, "w") as f:
                json.dump({"source": path, "tensor": "wte.weight", "shape": list(P.shape), "kept": kept,
                           "centred": False}, f)
            where = f"cached as {cache}"
        except OSError as e:                    # a folder we cannot write: the embedding is still good
            where = f"not cached ({brief(e)}; make {cache_dir} writable to keep it)"
        say(f"gpt2_embed: GPT-2 wte {src_shape} -> {P.shape} by truncated SVD, "
            f"{kept:.1%} of the variance kept; {where}")
    if target_std is not None:
        P *= np.float32(target_std / P.std())
    return P


def main():
    ap = argparse.ArgumentParser(description="Fetch GPT-2's token embedding, project it by SVD, cache it.")
    ap.add_argument("--d-model", type=int, default=256, help="dimensions to keep (default 256)")
    ap.add_argument("--cache-dir", default="data", help="where the .npy goes (default data)")
    a = ap.parse_args()
    P = load_gpt2_embedding(a.d_model, a.cache_dir)
    if P is not None:
        norms = np.linalg.norm(P, axis=1)
        print(f"rows: norm mean {norms.mean():.3f} (min {norms.min():.3f}, max {norms.max():.3f}); "
              f"entries: std {P.std():.4f}")


if __name__ == "__main__":
    main()
