"""Tests for sample.py, run as a user runs it: a subprocess, a checkpoint in a run folder.

A small random model with GPT-2's vocabulary (50,257 tokens, d_model 16) is saved the way train.py
saves, in <tmp>/out/latest.npz; sample.py must continue a prompt and report tokens/s, give the same
text for the same seed, read packed checkpoints, and fail with one clear line on bad input.
The tests that only compare texts call sample.main(argv) in this process (a new process spends about
a second loading the tokenizer); the exit codes and messages are checked on real subprocesses.
Run: python -m pytest -q tests/test_sample.py
"""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from nanoternary.checkpoint import save_checkpoint
from nanoternary.pack import export_packed
from nanoternary.model import Model, ModelConfig

SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sample.py")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """<tmp>/out/latest.npz (a full checkpoint) and <tmp>/out/model-packed.npz."""
    root = tmp_path_factory.mktemp("run")
    cfg = ModelConfig(d_model=16, glu_hidden=24, dilations=(1, 4, 16), conv_groups=4)
    m = Model(cfg, seed=0)
    m.params["embed.w"] *= 100          # logits of order 1: varied text, and seeds that matter
    os.makedirs(root / "out")
    save_checkpoint(str(root / "out" / "latest.npz"), m.params, {"config": cfg.to_dict(), "step": 3})
    export_packed(m, str(root / "out" / "model-packed.npz"))
    return root


def load_sample_module():
    spec = importlib.util.spec_from_file_location("sample_cli", SAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sample_here(run_dir, capsys, *args):
    """sample.py's main in this process, from run_dir -> (exit code, stdout, stderr)."""
    cwd = os.getcwd()
    os.chdir(run_dir)
    try:
        code = load_sample_module().main(list(args))
    finally:
        os.chdir(cwd)
    out, err = capsys.readouterr()
    return code, out, err


def sample(cwd, *args):
    r = subprocess.run([sys.executable, SAMPLE, *args], cwd=cwd, capture_output=True, text=True,
                       timeout=120)
    return r.returncode, r.stdout, r.stderr


def test_prints_a_continuation_and_its_speed(run_dir):
    code, out, err = sample(run_dir, "--prompt", "The history of", "--max-new-tokens", "20")
    assert code == 0, err
    assert out.startswith("The history of") and len(out) > len("The history of\n")
    assert "tok/s" in err and "generation: " in err and "prompt: 3 tokens" in err


def test_same_seed_same_text_packed_too(run_dir, capsys):
    args = ("--prompt", "Hello", "--max-new-tokens", "15", "--no-stop")
    a = sample_here(run_dir, capsys, *args, "--seed", "1")
    b = sample_here(run_dir, capsys, *args, "--seed", "1", "--checkpoint", "out/model-packed.npz",
                    "--kernel", "blas")
    c = sample_here(run_dir, capsys, *args, "--seed", "2")
    assert a[0] == b[0] == c[0] == 0, a[2] + b[2] + c[2]
    assert a[1] == b[1], "same seed: the packed checkpoint and the blas kernel give the same text"
    assert a[1] != c[1]
    assert "packed checkpoint" in b[2]


def test_empty_prompt_unicode_prompt_and_num_samples(run_dir, capsys):
    code, out, err = sample_here(run_dir, capsys, "--prompt", "", "--max-new-tokens", "5",
                                 "--num-samples", "2", "--temperature", "0")
    assert code == 0, err
    assert out.count("-" * 40) == 1
    first, second = out.split("-" * 40)
    assert first.strip() == second.strip()               # greedy: both samples the same
    code, out, err = sample_here(run_dir, capsys, "--prompt", "日本語 🙂", "--max-new-tokens", "5")
    assert code == 0, err
    assert out.startswith("日本語 🙂")                     # multi-byte characters printed whole


def test_text_stream_prints_whole_characters():
    from nanoternary.tokenizer import get_encoding
    enc = get_encoding()
    text = "naïve 日本語 🙂 ok"
    ids = enc.encode(text)
    assert any(b"\xf0" in enc.decode_single_token_bytes(t) for t in ids) and len(ids) > len(text.split())
    stream = load_sample_module().TextStream(enc)
    pieces = [stream.feed([t]) for t in ids] + [stream.close()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)          # never half a character
    bad = load_sample_module().TextStream(enc)
    assert bad.feed([enc.encode("🙂")[0]]) + bad.close() == "\ufffd"    # an unfinished one, at the end


def test_no_checkpoint_says_train_first(tmp_path):
    code, out, err = sample(tmp_path)                    # no out/ here
    assert code == 1
    assert err.count("\n") == 1 and "python train.py" in err and "Traceback" not in err


def test_corrupt_and_foreign_files(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"\x00" * 100)
    np.savez(tmp_path / "foreign.npz", w=np.zeros(4))
    for name in ("junk.npz", "foreign.npz"):
        code, out, err = sample(tmp_path, "--checkpoint", name)
        assert code == 1, err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_unknown_flag_is_argparse_error(tmp_path):
    code, out, err = sample(tmp_path, "--tempreature", "0.5")
    assert code == 2 and "unrecognized arguments" in err
    code, out, err = sample(tmp_path, "--top-p", "0")
    assert code == 2 and "--top-p" in err


def test_bad_numbers_get_one_line(tmp_path):
    for flag, value in (("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-1"),
                        ("--top-p", "nan"), ("--top-k", "-3"), ("--max-new-tokens", "-1"),
                        ("--num-samples", "0"), ("--seed", "-1")):
        code, out, err = sample(tmp_path, flag, value)
        assert code == 2 and flag in err and "Traceback" not in err, (flag, value, err)
