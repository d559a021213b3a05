"""Sample text from a trained nanoternary model, printed token by token as it is generated.

    python sample.py --prompt "The history of"              # out/latest.npz, the last training save
    python sample.py --prompt ""                            # empty prompt: starts from <|endoftext|>
    python sample.py --checkpoint out/best.npz --temperature 0 --max-new-tokens 50     # greedy
    python sample.py --checkpoint out/model-packed.npz --kernel blas --num-samples 3

The checkpoint is a train.py checkpoint (file or run folder) or a packed one written by
`python -m nanoternary.generate export`. The prompt is processed in one batched pass; then each new
token costs the same whatever the length of the context (ring buffers in the dilated convs, see
nanoternary/generate.py), with the ternary layers computed by additions and subtractions
(--kernel addsub, the default) or by float GEMVs (--kernel blas). The continuation goes to stdout;
the speed (prompt pass and generation separately, tokens/s) goes to stderr at the end.

Sampling follows nanoGPT's sample.py defaults (temperature 0.8, top-k 200) and one seed: the same
seed and flags give the same text.
"""
import codecs
import os
import sys
from dataclasses import dataclass

import numpy as np

from nanoternary import config
from nanoternary.config import OneLineParser, setting


@dataclass
class SampleConfig:
    """What sample.py does, each setting declared once (the command line is derived from it)."""
    checkpoint: str = setting("out", "checkpoint file (full or packed) or run folder, which means its "
                              "latest.npz (or best.npz if it has no latest.npz)", group="model")
    kernel: str = setting("addsub", "ternary layers by additions/subtractions only, or by float GEMVs (a "
                          "float core, train.py --no-ternary, always runs with blas)", choices=("addsub", "blas"))
    ema: bool = setting(False, "use the checkpoint's EMA-averaged weights (train.py --ema), as its "
                        "evaluation does (default: the trained weights)")
    head: str = setting(None, "the output head to expect; it comes from the checkpoint, which was trained "
                        "with train.py --head (default: whatever the checkpoint has)", choices=("full", "hier"))
    prompt: str = setting("", "text to continue (default: empty, which starts from <|endoftext|>)",
                          group="prompt and length")
    max_new_tokens: int = setting(200, "tokens to generate per sample", range="[0, inf)")
    num_samples: int = setting(1, "independent continuations of the prompt", range="[1, inf)")
    no_stop: bool = setting(False, "keep going past <|endoftext|> (default: stop there)")
    temperature: float = setting(0.8, "divide the logits by T; 0 = greedy, always the most likely token",
                                 range="[0, inf)", group="sampling")
    top_k: int = setting(200, "sample among the K most likely tokens; 0 = all", range="[0, inf)")
    top_p: float = setting(1.0, "sample from the smallest set of tokens with probability >= P (nucleus); "
                           "1 = off", range="(0, 1]")
    seed: int = setting(1337, "random seed: the same seed gives the same text", range="[0, inf)")

    def __post_init__(self):
        config.check(self)


def parse_args(argv=None):
    ap = OneLineParser(
        description="Generate text from a nanoternary checkpoint, printed as it is generated.")
    config.add_arguments(ap, SampleConfig)
    args = ap.parse_args(argv)
    try:
        return config.from_args(SampleConfig, args)
    except ValueError as e:                  # NaN, inf or out of range: one line naming the flag
        ap.error(str(e))


class TextStream:
    """Token ids in, printable text out, as soon as it is complete.

    A token is a byte string, and one UTF-8 character can span several tokens (most emoji and CJK
    characters do in GPT-2's vocabulary). Decoding token by token would print replacement marks
    for the halves; the incremental decoder instead returns every complete character and keeps
    the bytes of an unfinished one until the next token completes it. Bytes that can never form
    a character come out as U+FFFD, as enc.decode(ids, errors="replace") would.
    """

    def __init__(self, enc):
        self.enc = enc
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids):
        return self.utf8.decode(b"".join(self.enc.decode_single_token_bytes(t) for t in ids))

    def close(self):
        return self.utf8.decode(b"", final=True)


def no_checkpoint(path):
    """True when there is nothing at `path` to load: no file, or a run folder with neither
    latest.npz nor best.npz (a run stopped before its first save has only best.npz)."""
    if os.path.isdir(path):
        return not any(os.path.exists(os.path.join(path, f)) for f in ("latest.npz", "best.npz"))
    return not os.path.exists(path)


def main(argv=None):
    config.safe_output()                     # any character the model emits, on any terminal
    args = parse_args(argv)
    if no_checkpoint(args.checkpoint):
        print(f"no checkpoint at {args.checkpoint}: run `python train.py` first "
              f"(or pass --checkpoint PATH)", file=sys.stderr)
        return 1

    from nanoternary.checkpoint import CheckpointError
    from nanoternary.generate import Generator
    from nanoternary.pack import load_weights
    from nanoternary.tokenizer import EOT, get_encoding

    try:
        weights = load_weights(args.checkpoint, ema=args.ema)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cfg = weights.cfg
    if not cfg.ternary and args.kernel == "addsub":   # float weights: no additions-only product to run
        args.kernel = "blas"
    step = weights.meta.get("step", weights.meta.get("source", {}).get("step"))
    print(f"{weights.kind} checkpoint {weights.path}" + (f" (step {step})" if step is not None else "")
          + (", EMA weights" if weights.meta.get("ema") or weights.meta.get("source", {}).get("ema") else "")
          + f", head {cfg.head}, {'ternary' if cfg.ternary else 'float (--no-ternary)'} core, kernel {args.kernel}",
          file=sys.stderr)
    enc = get_encoding()
    prompt_ids = enc.encode(args.prompt, allowed_special="all")
    if prompt_ids and max(prompt_ids) >= cfg.vocab_size:
        print(f"error: the prompt has token ids up to {max(prompt_ids)}, but this model's vocabulary "
              f"has {cfg.vocab_size} tokens", file=sys.stderr)
        return 1
    if args.head and args.head != cfg.head:
        print(f"error: {weights.path} has the {cfg.head} head, not {args.head}: the head is part of "
              f"the trained model (drop --head, or pick a checkpoint trained with --head {args.head})",
              file=sys.stderr)
        return 1
    try:
        gen = Generator(weights, kernel=args.kernel, eot=EOT)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rng = np.random.default_rng(args.seed)
    top_k = args.top_k or None
    top_p = args.top_p if args.top_p < 1 else None

    totals = [0, 0.0, 0, 0.0]  # prompt tokens, prompt seconds, new tokens, generation seconds
    out = sys.stdout
    for n in range(args.num_samples):
        if n:
            out.write("\n" + "-" * 40 + "\n")
        text = TextStream(enc)
        out.write(text.feed(prompt_ids))
        out.flush()
        for tok in gen.generate(prompt_ids, args.max_new_tokens, args.temperature, top_k, top_p, rng,
                                stop_at_eot=not args.no_stop):
            out.write(text.feed([tok]))           # printed as it comes
            out.flush()
        out.write(text.close() + "\n")
        out.flush()
        st = gen.stats
        totals[0] += st.prompt_tokens
        totals[1] += st.prompt_seconds
        totals[2] += st.new_tokens
        totals[3] += st.gen_seconds
    pt, ps, nt, gs = totals
    rate = lambda k, s: f"{k / s:,.1f} tok/s" if s > 0 else "-"
    print(f"prompt: {pt} tokens in {1e3 * ps:.1f} ms ({rate(pt, ps)}) | generation: {nt} tokens in "
          f"{gs:.2f} s ({rate(nt, gs)}) | kernel {args.kernel}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:          # Ctrl-C while generating: stop quietly
        print(file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:            # e.g. `python sample.py | head`
        sys.exit(0)
