"""Streaming generation: constant cost per token, add/subtract ternary layers, packed checkpoints.

    gen = Generator("out")                 # a run folder or file, full or packed; or a Model
    ids = []
    for tok in gen.generate(enc.encode("The history of"), max_new_tokens=100, temperature=0.8,
                            top_k=200, rng=np.random.default_rng(0)):
        ids.append(tok)                    # a generator: tokens arrive one at a time
    enc.decode(ids); gen.stats             # prompt / generation tokens and seconds

    python -m nanoternary.generate export --checkpoint out --out out/model-packed.npz
    python -m nanoternary.generate bench   # tokens/s: reference config, random weights, JSON

sample.py (the command people run) is a thin layer over `Generator.generate` that prints each
token as it comes (taking care of UTF-8 characters split across tokens).

Speed (`python -m nanoternary.generate bench`: reference configuration, random weights, 64-token
prompt, 200 new tokens, temperature 0.8, top-k 200) on our shared 2-core VM: 209 tokens/s with
kernel "addsub" and 265 with "blas" with the full 50,257-way head (its GEMV alone, 51 MB of
embedding read per token, takes 1.75-2.23 ms); 1,141 and 2,427 with the hier head.
docs/generation.md has the table.

## Why a new token costs the same whatever the context length

The model has no attention and no positional embedding: its only mixing over time is the causal
dilated convolutions of the ConvMixer, n_recursions x len(dilations) of them (2 x 3 = 6 for the
reference), and each looks back a fixed (K-1)*D steps. So the prompt is processed once, in one
batched pass of the model's own `body_forward`, and from then on a new token needs, per conv,
only the last (K-1)*D inputs of that conv: a ring buffer.

One conv with kernel K and dilation D reads the normalised input u of its layer (C,) at the taps

    y_t = sum_k  W_k  u_{t - (K-1-k) D}            k = 0 .. K-1, tap K-1 is the new input u_t

Its ring buffer holds L = (K-1) * D rows: row (p mod L) is u_p for the last L positions
p = t-L .. t-1, and zeros for p < 0 (that IS the causal left padding of the full conv). At position t

    tap K-1:  u_t                           the new input, not in the buffer yet
    tap k:    u_{t - L + kD}                at row (t - L + kD) mod L = (t + kD) mod L, k < K-1

then u_t is written to row t mod L, over u_{t-L}: the oldest tap of position t+1 is t+1-L, so
u_{t-L} is never needed again. Reference sizes: L = 3, 12 and 192 rows of C = 256 for the
dilations 1, 4, 64, about 0.4 MB in all for both recursions. Per layer and token: gather the K taps
once (gate and value read the same u), one small (1, K*Ci) @ (K*Ci, 2*Co) product per group (the
two weights side by side), write one row. The prompt pass writes its last L inputs into the buffers.

Everything else in the block works on each position alone (RMSNorm, the ternary linears, the GLU),
so a step is the model's `body_forward` on ONE row, with `RingConv`s in place of the convs
(`model.mixer_forward`'s `convs`): the architecture is written once, in model.py. The whole model
sees cfg.receptive_field tokens (1 + 2 * 3 * (1+4+64) = 415 for the reference); the buffers hold
exactly what that needs.

## The ternary layers: additions and subtractions

kernel="addsub" (the default here) runs the four ternary matrices of the block (mix.out, glu.gate,
glu.up, glu.down) without a multiplication: the op's own add/subtract kernel
(`ops.ternary.addsub_matmul` with a plan made once per matrix), for the prompt and for each token:

    xx = [x, -x, 0]                                   (2I+1,)  negation: a subtraction from 0
    y[o] = sum of xx[j] over row o's signed column list
         = sum_{i: W_t[o,i] = +1} x_i  -  sum_{i: W_t[o,i] = -1} x_i

one gather (np.take) and one segmented sum (np.add.reduceat) per matrix. kernel="blas" runs the same
products as float GEMVs, for comparison.

## The head

Full head: logits = h @ E^T for the last position only: a (V, C) x (C,) GEMV, 50,257 x 256 float32
= 51 MB read per token; memory-bound, the floor of the per-token cost (`bench` measures it alone).
Hier head: a class c ~ P(class | h) from the n_classes logits h @ W_c^T, then a token ~
P(token | c, h) from the |S_c| logits h @ E[S_c]^T, nothing else. The embedding rows are kept
class by class (E[order]), so a class's tokens are a contiguous slice. Temperature, top-k and top-p
apply to each of the two draws (exact for temperature 1 without filters; otherwise the natural
two-level analogue of the full-vocabulary filter, as the full one would need all V logits).

Packed checkpoints (2 bits per ternary weight) are written and read by pack.py.
"""
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from .checkpoint import CheckpointError, resolve
from .config import OneLineParser, number, run_cli, safe_output
from .model import Model, ModelConfig, body_forward
from .ops.conv import conv1d_forward, split_weight
from .ops.hier_head import hier_log_probs
from .ops.ternary import addsub_plan
from .pack import SCHEMES, as_weights, export_packed, load_packed
from .resources import check_generation
from .sampling import sample_token
from .tokenizer import EOT          # GPT-2's <|endoftext|>: the start token of an empty prompt

KERNELS = ("addsub", "blas")


# ----------------------------------------------------------------------------------------------
# the one place where generation differs from the model's forward: the convolution's input


class RingConv:
    """The convs (gate and value) of one ConvMixer layer in one block application, called by
    model.mixer_forward in place of conv1d_forward(u, w, D, G), with a ring buffer of the layer's
    last L = (K-1)*D inputs (module docstring):

      - the prompt (u (1, T, C) from position 0): plain conv1d_forward; the empty ring is exactly
        the causal zero padding;
      - one new position t (u (1, 1, C)): the K inputs it reads, u_{t-(K-1-k)D} for k < K-1 from
        the ring and u_t itself, then ops/conv.py's equation at that one position,
            y[o] = sum_k sum_i w[o, i, k] * tap_k[g(o)*Ci + i]
        for the gate's and the value's weights at once: one (1, K*Ci) @ (K*Ci, 2*Co) product per
        group, with the two weights laid out side by side once, here.

    Gate and value read the same u: the first call (the gate's) gathers the taps, computes both
    outputs and writes the new inputs into the ring; the second (the value's) returns its half.
    """

    def __init__(self, w_gate, w_value, dilation, groups, dtype):
        C_out, Ci, K = w_gate.shape
        G, Co = groups, C_out // groups
        self.K, self.G, self.Ci = K, G, Ci
        self.L = L = (K - 1) * dilation
        # buf (G, L+1, Ci), group-major: row p mod L holds u_p (zeros for p < 0), row L the new input
        self.buf = np.zeros((G, L + 1, Ci), dtype=dtype)
        # the rows position t reads, taps 0 .. K-1: tap k < K-1 at row (t + kD) mod L, tap K-1 at row L
        t = np.arange(max(L, 1))[:, None]
        self.taps = np.concatenate([(t + np.arange(K - 1) * dilation) % max(L, 1), np.full((max(L, 1), 1), L)], 1)
        self.w_gate, self.w_value = w_gate, w_value
        # the conv's per-group, per-tap weights (G, K, Ci, Co) as (G, K*Ci, Co): row k*Ci + i, column o;
        # the gate's columns, then the value's
        split = lambda w: split_weight(w, G).reshape(G, K * Ci, Co)
        self.W = np.ascontiguousarray(np.concatenate([split(w_gate), split(w_value)], axis=2), dtype=dtype)
        self.reset()

    def reset(self):
        self.buf[:] = 0
        self.t = 0                                             # the position of the next input
        self.u_in = self.y = None

    def __call__(self, u, w, D, G):
        # u (1,T,C), w (C_out, C/G, K) -> y (1,T,C_out), cache: as conv1d_forward
        assert w is self.w_gate or w is self.w_value, "RingConv serves its own layer's two convs"
        first = u is not self.u_in
        self.u_in = u
        if u.shape[1] > 1:                                     # the prompt, from position 0
            if first:
                assert self.t == 0, "a prompt of several tokens starts at position 0"
                T, L = u.shape[1], self.L                      # its last L inputs go to their rows
                p = np.arange(max(0, T - L), T)
                self.buf[:, p % max(L, 1)] = u[0, p].reshape(-1, self.G, self.Ci).transpose(1, 0, 2)
                self.t = T
            return conv1d_forward(u, w, D, G)
        if first:
            self.buf[:, self.L] = u.reshape(self.G, self.Ci)   # the new input, u_t
            taps = self.buf[:, self.taps[self.t % max(self.L, 1)]]          # (G, K, Ci)
            self.y = np.matmul(taps.reshape(self.G, 1, -1), self.W)[:, 0]  # (G, 2Co): [gate | value]
            if self.L:
                self.buf[:, self.t % self.L] = self.buf[:, self.L]         # u_t over u_{t-L}
            self.t += 1
        Co = self.y.shape[1] // 2
        half = self.y[:, :Co] if w is self.w_gate else self.y[:, Co:]
        return half.reshape(1, 1, -1), None


# ----------------------------------------------------------------------------------------------
# the generator


@dataclass
class GenStats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    new_tokens: int = 0
    gen_seconds: float = 0.0
    stop_reason: str = ""              # "eot" or "length"

    def rates(self):
        """(prompt tokens/s, generation tokens/s)."""
        pr = self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else float("nan")
        gr = self.new_tokens / self.gen_seconds if self.gen_seconds > 0 else float("nan")
        return pr, gr


class Generator:
    """Incremental decoding for a model: one batched prompt pass, then one token at a time.

    source: a Model, InferenceWeights, or a checkpoint path (full or packed, file or run folder).
    kernel: "addsub" (default) or "blas" for the ternary layers. eot: the <|endoftext|> id, the
    start token of an empty prompt and where generation stops.

    Low level (what `generate` strings together, and what the tests compare with the full forward):
        H = gen.prefill(ids)        # ids (T,) -> H (T, C): final hidden states; state at position T
        h = gen.step(token)         # the next position: h (C,)
        gen.logits(h)               # full head: (V,) logits;  gen.log_probs(h): (V,) either head
        tok = gen.sample(h, rng, temperature, top_k, top_p)
    """

    def __init__(self, source, kernel="addsub", dtype=None, eot=EOT):
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}: use one of {KERNELS}")
        w = as_weights(source, dtype)
        self.weights, self.cfg, self.kernel, self.eot = w, w.cfg, kernel, int(eot)
        cfg = self.cfg
        self.dtype = np.dtype(dtype) if dtype is not None else w.dtype
        dt = self.dtype
        p = {k: np.ascontiguousarray(v, dtype=dt) for k, v in w.params.items()}
        self.p = p
        if kernel == "addsub" and not cfg.ternary:
            raise ValueError("kernel 'addsub' needs ternary weights; this model has float weights "
                             "(ternary=False): use kernel='blas'")
        # the ternary layers, as model.quantize gives them, plus the kernel the op should use:
        # block_forward calls ternary_linear_forward(x, *q[name]) = (x, W_t, s, kernel, plan)
        self.q = {name: (wt.astype(dt), dt.type(s), kernel, addsub_plan(wt) if kernel == "addsub" else None)
                  for name, (wt, s) in w.ternary.items()}
        # ring buffers of (K-1) D rows per layer: a crafted config's huge dilations fail here, on one line
        check_generation(cfg, dt.itemsize, where=f"generating with {w.path or 'this model'}")
        # one RingConv per ConvMixer layer of every block application (the weights are shared, the state not)
        self.rings = [[RingConv(p[f"block.mix.conv{i}.gate.w"], p[f"block.mix.conv{i}.value.w"], D,
                                cfg.conv_groups, dt) for i, D in enumerate(cfg.dilations)]
                      for _ in range(cfg.n_recursions)]
        # the head
        if cfg.head == "full":
            self.E = p["embed.w"]                                  # (V, C), rows by token id
            self.row_of = None
            self._logits = np.empty(cfg.vocab_size, dtype=dt)      # preallocated: 200 KB, reused
        else:
            cm = w.class_map
            self.E = np.ascontiguousarray(p["embed.w"][cm.order])  # rows class by class
            self.row_of = np.empty(cfg.vocab_size, dtype=np.intp)  # token -> its row in self.E
            self.row_of[cm.order] = np.arange(cfg.vocab_size)
            self.Wc = p["head.class_w"]
            self.class_map = cm
        del p["embed.w"]                                           # self.E holds it
        self.pos = 0
        self.stats = GenStats()

    # ------------------------------------------------------------------ the model, position by position

    def _embed(self, ids):
        # ids (...) int -> (..., C)
        return self.E[ids] if self.row_of is None else self.E[self.row_of[ids]]

    def _forward(self, ids):
        # ids (T,) the tokens at positions self.pos .. self.pos+T-1 -> h (T, C) their final hidden
        # states: the model's own body_forward, with convs that read their rings
        h, _ = body_forward(self._embed(ids)[None], self.p, self.q, self.cfg, convs=self.rings)
        self.pos += len(ids)
        return h

    def prefill(self, ids):
        # ids (T,) int -> H (T, C) final hidden state of every position, from an empty state; the
        # rings then hold everything position T needs
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("prefill needs at least one token (generate() starts an empty prompt with eot)")
        if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}), got [{ids.min()}, {ids.max()}]")
        for ring in (ring for rings in self.rings for ring in rings):
            ring.reset()
        self.pos = 0
        return self._forward(ids)

    def step(self, token):
        # token int at position self.pos -> h (C,) its final hidden state; advances self.pos
        if not 0 <= token < self.cfg.vocab_size:
            raise ValueError(f"token {token} is not in [0, {self.cfg.vocab_size})")
        return self._forward([token])[0]

    # ------------------------------------------------------------------ the head

    def logits(self, h):
        # h (C,) -> (V,) logits = E @ h (full head). A buffer reused by the next call.
        if self.cfg.head != "full":
            raise ValueError("logits() is for the full head; the hier head has log_probs()")
        return np.dot(self.E, h, out=self._logits)

    def log_probs(self, h):
        # h (C,) -> (V,) log P(token | h) for every token (all V dot products: tests, inspection)
        if self.cfg.head == "full":
            l = self.logits(h).astype(np.float64)
            m = l.max()
            return l - (m + np.log(np.exp(l - m).sum()))
        cm = self.class_map
        E_by_id = self.E[self.row_of]
        return hier_log_probs(h[None], E_by_id, self.Wc, cm)[0]

    def sample(self, h, rng, temperature=1.0, top_k=None, top_p=None):
        # h (C,) -> the next token id
        if self.cfg.head == "full":
            return sample_token(self.logits(h), rng, temperature, top_k, top_p)
        cm = self.class_map
        c = sample_token(self.Wc @ h, rng, temperature, top_k, top_p)       # class ~ P(c | h)
        lo, hi = cm.offsets[c], cm.offsets[c + 1]
        j = sample_token(self.E[lo:hi] @ h, rng, temperature, top_k, top_p)  # token ~ P(. | c, h)
        return int(cm.order[lo + j])

    # ------------------------------------------------------------------ the loop

    def generate(self, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, rng=None,
                 stop_at_eot=True):
        """Yield up to max_new_tokens new token ids, one at a time, as they are sampled.

        An empty prompt starts from eot. Stops before yielding eot unless stop_at_eot=False.
        rng: a np.random.Generator (None: a fresh unseeded one). Timings go to self.stats.
        """
        ids = [int(i) for i in prompt_ids] or [self.eot]
        if ids == [self.eot] and not 0 <= self.eot < self.cfg.vocab_size:
            raise ValueError(f"empty prompt: the start token eot={self.eot} is not in this model's "
                             f"vocabulary of {self.cfg.vocab_size}; give a prompt or pass eot=")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        sample_token(np.zeros(2), np.random.default_rng(0), temperature, top_k, top_p)  # check options now
        rng = rng if rng is not None else np.random.default_rng()
        return self._generate(ids, int(max_new_tokens), temperature, top_k, top_p, rng, stop_at_eot)

    def _generate(self, ids, n, temperature, top_k, top_p, rng, stop_at_eot):
        st = self.stats = GenStats()
        t0 = time.perf_counter()
        h = self.prefill(ids)[-1]
        st.prompt_tokens, st.prompt_seconds = len(ids), time.perf_counter() - t0
        st.stop_reason = "length"
        for k in range(n):
            t0 = time.perf_counter()
            tok = self.sample(h, rng, temperature, top_k, top_p)
            if tok == self.eot and stop_at_eot:
                st.gen_seconds += time.perf_counter() - t0
                st.stop_reason = "eot"
                return
            if k + 1 < n:
                h = self.step(tok)          # computed before yielding: the caller's time is not ours
            st.gen_seconds += time.perf_counter() - t0
            st.new_tokens += 1
            yield tok


# ----------------------------------------------------------------------------------------------
# benchmark


def _best_ms(fn, repeat=5, number=50):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return 1e3 * best


def bench(head="full", tokens=200, prompt_len=64, kernels=KERNELS, temperature=0.8, top_k=200,
          top_p=None, seed=0, cfg=None):
    """Generation speed for the reference configuration (or cfg) with random weights -> a dict."""
    cfg = cfg if cfg is not None else ModelConfig(head=head)
    head = cfg.head
    model = Model(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, cfg.vocab_size, prompt_len)
    out = {"config": cfg.to_dict(), "tokens": tokens, "prompt_tokens": prompt_len,
           "sampling": {"temperature": temperature, "top_k": top_k, "top_p": top_p}, "kernels": {}}
    for kernel in kernels:
        gen = Generator(model, kernel=kernel)
        best = None
        for _ in range(3):                                       # best of 3 runs: a shared machine
            list(gen.generate(prompt, tokens, temperature, top_k, top_p, np.random.default_rng(seed),
                              stop_at_eot=False))
            if best is None or gen.stats.gen_seconds < best.gen_seconds:
                best = gen.stats
        pr, gr = best.rates()
        # the parts of one token, each timed alone
        h = gen.prefill(prompt)[-1]
        tok = int(prompt[-1])
        core_ms = _best_ms(lambda: gen.step(tok))               # the block, twice: no head
        r = np.random.default_rng(0)
        sample_ms = _best_ms(lambda: gen.sample(h, r, temperature, top_k, top_p))   # head + draw
        head_ms = _best_ms(lambda: gen.logits(h)) if head == "full" else None
        out["kernels"][kernel] = {
            "tokens_per_s": round(gr, 1), "ms_per_token": round(1e3 / gr, 3),
            "prompt_tokens_per_s": round(pr, 1),
            "step_core_ms": round(core_ms, 3),            # embedding lookup + block x n_recursions
            "head_ms": head_ms and round(head_ms, 3),     # full head: the logits GEMV alone
            "head_and_sampling_ms": round(sample_ms, 3),  # logits (or the two hier levels) + the draw
        }
    if head == "full":
        E = model.params["embed.w"]
        hv = np.random.default_rng(1).standard_normal(cfg.d_model).astype(E.dtype)
        buf = np.empty(cfg.vocab_size, dtype=E.dtype)
        gemv = _best_ms(lambda: np.dot(E, hv, out=buf))
        out["head_gemv_ms"] = round(gemv, 3)
        out["head_gemv_ceiling_tokens_per_s"] = round(1e3 / gemv, 1)
    return out


# ----------------------------------------------------------------------------------------------
# command line


def _human(n):
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def main(argv=None):
    ap = OneLineParser(prog="python -m nanoternary.generate",
                                 description="Packed generation checkpoints and the generation benchmark.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="write a packed checkpoint for generation and print its size")
    ex.add_argument("--checkpoint", default="out", help="checkpoint file or run folder (default: out)")
    ex.add_argument("--out", default=None,
                    help="output .npz (default: model-packed.npz next to the checkpoint)")
    ex.add_argument("--scheme", choices=SCHEMES, default="2bit",
                    help="2bit: 2 bits/weight; base3: 5 trits/byte, 1.6 bits/weight (default: 2bit)")
    ex.add_argument("--embed-fp16", action="store_true",
                    help="store the embedding as float16: about half the file (default: float32)")
    ex.add_argument("--ema", action="store_true",
                    help="pack the checkpoint's EMA weights (train.py --ema) instead of the trained ones")
    ex.add_argument("--json", action="store_true", help="print the report as one JSON object")
    be = sub.add_parser("bench", help="generation tokens/s, reference config, random weights (JSON)")
    be.add_argument("--head", choices=("full", "hier"), default="full", help="output head (default: full)")
    be.add_argument("--tokens", type=number(int, "[1, inf)"), default=200, help="tokens generated per run (default: 200)")
    be.add_argument("--prompt-len", type=number(int, "[1, inf)"), default=64, help="prompt tokens (default: 64)")
    be.add_argument("--kernel", choices=KERNELS + ("both",), default="both",
                    help="ternary kernel(s) to time (default: both)")
    args = ap.parse_args(argv)
    safe_output()
    try:
        if args.cmd == "bench":
            kernels = KERNELS if args.kernel == "both" else (args.kernel,)
            check_generation(ModelConfig(head=args.head), 4, args.prompt_len, "the benchmark (--prompt-len)")
            print(json.dumps(bench(args.head, args.tokens, args.prompt_len, kernels), indent=1))
            return 0
        src = resolve(args.checkpoint)
        out = args.out or os.path.join(os.path.dirname(src) or ".", "model-packed.npz")
        rep = export_packed(src, out, args.scheme, args.embed_fp16, args.ema)
        w = load_packed(out)                       # read it back: the check a user would do next
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:                           # an --out that cannot be written: nothing was replaced
        print(f"error: cannot write {args.out} ({e.strerror or e}): choose a file in a folder you can write to",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: nothing half-written was kept", file=sys.stderr)
        return 130
    rep["reloaded"] = bool(w.kind == "packed")
    if args.json:
        print(json.dumps(rep))
        return 0
    print(f"wrote {out}: {_human(rep['bytes'])} ({rep['bytes']:,} bytes)")
    print(f"  from {src}: {_human(rep['source_bytes'])} (the full checkpoint: float weights, plus optimizer state if saved)")
    print(f"  all weights as {w.dtype}: {_human(rep['float_weights_bytes'])}")
    print(f"  ternary: {rep['ternary_weights']:,} weights in {rep['ternary_bytes']:,} bytes "
          f"({rep['scheme']}: {rep['bits_per_ternary_weight']:.3f} bits/weight; "
          f"{rep['ternary_float_bytes']:,} bytes as {w.dtype})")
    print(f"  embedding stored as {rep['embed_dtype']}")
    return 0


if __name__ == "__main__":
    run_cli(main)
