"""The hub paths (FineWeb-Edu in data.py, GPT-2's wte.weight in gpt2_embed.py) through
huggingface_hub's real HTTP client, against a local server that speaks like huggingface.co
(tests/hubserver.py): the repository API, a 302 from /resolve/ to a file host, Range requests
answered with 206. The files are small ones the tests write. What is checked: the bytes fetched
against the bytes needed, the one-line notice when the hub fails (HTTP 500, a hang, a body cut
short), that nothing half-fetched is kept, and that a later run gives the right tokens / the exact
GPT-2 projection, with the hub or from the local cache alone.

    python -m pytest -q tests/test_hub.py
"""
import hashlib
import io
import json
import os
import subprocess
import sys
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.dirfs import DirFileSystem
from huggingface_hub import HfFileSystem

from hubserver import COMMIT, FakeHub, use_endpoint
from nanoternary import data  # noqa: F401
from nanoternary import sources as S
from nanoternary import tokens as D
from nanoternary import gpt2_embed as G
from test_data import make_docs, n_tokens, read_docs
from test_gpt2_embed import write_safetensors

FOOTER_READ = 64 * 1024      # pyarrow reads a parquet file's last 64 KiB at once, for the footer
REPO = "HuggingFaceFW/fineweb-edu"
SHARD = "sample/10BT/{:03d}_00000.parquet"


# ----------------------------------------------------------------------------------------------
# the files: two FineWeb-Edu shards and a GPT-2 model.safetensors


def fineweb_parquet(docs, row_group_size):
    """A shard in FineWeb-Edu's column layout, as bytes."""
    n = len(docs)
    table = pa.table({
        "text": docs,
        "id": [f"<urn:uuid:{i:08d}-0000-0000-0000-000000000000>" for i in range(n)],
        "dump": ["CC-MAIN-2013-20"] * n,
        "url": [f"http://example.org/page/{i}" for i in range(n)],
        "file_path": ["s3://commoncrawl/crawl-data/CC-MAIN-2013-20/segments/x.warc.gz"] * n,
        "language": ["en"] * n,
        "language_score": np.full(n, 0.97),
        "token_count": np.array([n_tokens([d]) for d in docs], dtype=np.int64),
        "score": np.full(n, 3.2),
        "int_score": np.full(n, 3, dtype=np.int64),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size, compression="snappy")
    return buf.getvalue()


@pytest.fixture(scope="module")
def fineweb():
    """(files {path in repo: bytes}, all documents in order, documents per row group): shard 000
    with 8 row groups of 12 documents of a few KB, shard 001 with 2."""
    docs = make_docs(120, seed=11, words=(300, 600))
    files = {SHARD.format(0): fineweb_parquet(docs[:96], 12), SHARD.format(1): fineweb_parquet(docs[96:], 12)}
    return files, docs, 12


@pytest.fixture(scope="module")
def gpt2():
    """(model.safetensors bytes, wte (50257, 16) float32, the bytes a reader needs): wte between
    other tensors, as in GPT-2's file, with 2.6 MB after it (for fsspec's 5 MiB read-ahead to show)."""
    import tempfile
    rng = np.random.default_rng(3)
    wte = rng.standard_normal((G.GPT2_VOCAB, 16)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        ranges = write_safetensors(path, {"h.0.mlp.c_fc.weight": ("F32", rng.standard_normal((16, 4000))),
                                          "wte.weight": ("F32", wte),
                                          "wpe.weight": ("F32", rng.standard_normal((1024, 16))),
                                          "h.0.mlp.c_proj.weight": ("F32", rng.standard_normal((40000, 16)))})
        with open(path, "rb") as f:
            raw = f.read()
    header = 8 + int.from_bytes(raw[:8], "little")
    begin, end = ranges["wte.weight"]
    return raw, wte, header + (end - begin)


def text_bytes_needed(raw, groups):
    """What a reader of the `text` column of these row groups needs: the footer and the column's
    chunks (each chunk is one read, from its first page to the end of its data)."""
    md = pq.ParquetFile(io.BytesIO(raw)).metadata
    footer = 8 + int.from_bytes(raw[-8:-4], "little")
    col = md.schema.to_arrow_schema().get_field_index("text")
    return footer + sum(md.row_group(g).column(col).total_compressed_size for g in groups)


@pytest.fixture
def hub(fineweb, gpt2, monkeypatch):
    """The fake hub, running, with huggingface_hub pointed at it."""
    repos = {("dataset", REPO): fineweb[0], ("model", "openai-community/gpt2"): {"model.safetensors": gpt2[0]}}
    with FakeHub(repos) as h:
        use_endpoint(monkeypatch, h.url)
        yield h
    HfFileSystem.clear_instance_cache()


@pytest.fixture
def small_docs(monkeypatch):
    """The offline fallback builds its corpus from json/'s docstrings only: fast."""
    import json as json_module
    real = D.python_docs_corpus
    monkeypatch.setattr(D, "python_docs_corpus",
                        lambda c, v: real(c, v, stdlib=os.path.dirname(json_module.__file__)))


def new_run():
    """What a new process would start from: no HfFileSystem remembering listings of an earlier run."""
    HfFileSystem.clear_instance_cache()


def reference_tokens(fineweb, tmp_path, **kw):
    """The same prepare through a local fsspec filesystem holding the same files: the tokens to expect."""
    root = tmp_path / "local-hub"
    for path, raw in fineweb[0].items():
        dest = root / S.HUB_DATASET / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(raw)
    fs = DirFileSystem(path=str(root), fs=fsspec.filesystem("file"))
    return D.prepare(cache_dir=str(tmp_path / "reference"), verbose=False, hub_fs=fs, **kw)


def same_tokens(a, b):
    return (np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
            and a.meta["documents"] == b.meta["documents"])


def cached_row_groups(cache):
    folder = os.path.join(cache, "fineweb-edu", "sample", "10BT")
    return sorted(os.path.relpath(os.path.join(d, f), folder)
                  for d, _, files in os.walk(folder) for f in files if f.startswith("rg"))


def temp_files(folder):
    return [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.endswith(".tmp")]


def wait_for(condition, seconds=10.0):
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.02)
    return condition()


def one_notice(text, marker):
    """The single line of `text` containing `marker`; the text must not run over to other lines."""
    lines = [line for line in text.splitlines() if marker in line]
    assert len(lines) == 1, text
    assert "Traceback" not in text and "For more information" not in text and "Internal Error" not in text, text
    return lines[0]


# ----------------------------------------------------------------------------------------------
# the fake hub itself


def test_fake_hub_speaks_like_the_hub(hub, gpt2):
    """HEAD on /resolve/ gives what huggingface_hub checks (commit, etag, size), ranges come as 206,
    and the API answers as HfApi expects."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import get_session
    raw = gpt2[0]
    meta = get_hf_file_metadata(hf_hub_url("openai-community/gpt2", "model.safetensors"))
    assert (meta.commit_hash, meta.size) == (COMMIT, len(raw))
    assert meta.etag == hashlib.sha256(raw).hexdigest()                   # LFS: the linked etag
    assert meta.location.startswith(hub.cdn_url + "/cdn/")
    r = get_session().get(hf_hub_url("openai-community/gpt2", "model.safetensors"), headers={"Range": "bytes=8-15"})
    assert r.status_code == 206 and r.content == raw[8:16]
    assert r.headers["Content-Range"] == f"bytes 8-15/{len(raw)}"
    assert [q[3] for q in hub.requests if q[0] == "GET"][-2:] == [302, 206]
    # the API: paths-info and a recursive tree listing, as HfApi reads them
    from huggingface_hub import HfApi
    api = HfApi()
    infos = api.get_paths_info(REPO, [SHARD.format(0), "sample", "missing"], repo_type="dataset")
    assert [(type(i).__name__, i.path) for i in infos] == [("RepoFile", SHARD.format(0)), ("RepoFolder", "sample")]
    assert infos[0].size == len(hub.repos[("dataset", REPO)][SHARD.format(0)]) and infos[0].lfs is not None
    tree = api.list_repo_tree(REPO, recursive=True, repo_type="dataset")
    assert sorted(e.path for e in tree) == ["sample", "sample/10BT", SHARD.format(0), SHARD.format(1)]
    assert api.repo_info(REPO, repo_type="dataset").sha == COMMIT


# ----------------------------------------------------------------------------------------------
# FineWeb-Edu


def test_fineweb_fetches_only_the_bytes_it_needs(hub, fineweb, tmp_path, monkeypatch):
    files, docs, _ = fineweb
    monkeypatch.setattr(D, "BATCH_CHARS", 1)      # one document per batch: read ahead by one document
    cap = n_tokens(docs[:18]) + 18                # 1.5 row groups: row groups 0 and 1 are read
    cache = str(tmp_path / "cache")
    d = D.prepare(cache_dir=cache, verbose=False, max_tokens=cap)
    assert d.meta["source"] == "fineweb-edu" and d.meta["documents"] == 18
    assert d.meta["row_groups_downloaded"] == 2 and cached_row_groups(cache) == [
        "000_00000/rg00000.parquet", "000_00000/rg00001.parquet"]
    assert same_tokens(d, reference_tokens(fineweb, tmp_path, max_tokens=cap))
    raw = files[SHARD.format(0)]
    needed = text_bytes_needed(raw, [0, 1])
    print(f"fineweb: sent {hub.sent:,} bytes of a {len(raw):,}-byte shard; needed {needed:,} "
          f"(+ API {hub.api_sent:,} bytes of JSON)")
    assert needed <= hub.sent <= needed + FOOTER_READ
    assert not temp_files(cache)

    # what the bound above catches: fsspec's default read-ahead fetches the rest of the file
    new_run()
    hub.reset_counts()
    with HfFileSystem().open(f"{S.HUB_DATASET}/{SHARD.format(0)}", "rb") as f:
        pq.ParquetFile(f).read_row_group(0, columns=["text"])
    assert hub.sent > text_bytes_needed(raw, [0]) + FOOTER_READ + 100_000


def test_fineweb_offline_from_the_local_copy_once_complete(hub, fineweb, tmp_path, monkeypatch, small_docs, capsys):
    files, docs, _ = fineweb
    cache = str(tmp_path / "cache")
    first = D.prepare(cache_dir=cache, verbose=False, max_tokens=10**9)       # all of it: 2 shards
    assert first.meta["documents"] == len(docs) and len(cached_row_groups(cache)) == 10
    shards = os.path.join(cache, "fineweb-edu", "sample", "10BT", "shards.json")
    with open(shards) as f:
        assert json.load(f) == {"shards": 2}          # the end of the data, learned from the hub
    hub.fail("500")                                   # from now on the hub answers nothing useful
    before = len(hub.requests)
    for seed, offline in ((1, {"HF_HUB_OFFLINE": "1"}), (2, {})):    # told so, or finding out
        for name, value in offline.items():
            monkeypatch.setenv(name, value)
        new_run()
        again = D.prepare(cache_dir=cache, verbose=False, max_tokens=10**9, seed=seed)   # new token files
        assert not again.cached and again.meta["source"] == "fineweb-edu"
        assert again.meta["row_groups_downloaded"] == 0
        assert sorted(read_docs(again.train) + read_docs(again.val)) == sorted(docs)
        assert "cannot be reached" not in capsys.readouterr().err
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert not [q for q in hub.requests[before:] if "fineweb-edu" in q[1] or q[1].startswith("/cdn/")]
    # without the record of where the data ends, the hub would have to be asked: it fails, we fall back
    os.remove(shards)
    new_run()
    fallback = D.prepare(cache_dir=cache, verbose=False, max_tokens=10**9, seed=5)
    assert fallback.meta["source"] == "python-docs"
    assert "HfHubHTTPError: Server error '500" in one_notice(capsys.readouterr().err, "cannot be reached")


@pytest.mark.parametrize("fault", ["500", "hang"])
def test_fineweb_hub_failing_at_the_start(hub, fineweb, tmp_path, monkeypatch, small_docs, capsys, fault):
    """The hub fails when the shard is opened: one line, the fallback, nothing cached; then a run
    with the hub healthy again gives the right tokens."""
    cache = str(tmp_path / "cache")
    if fault == "500":
        hub.fail("500", r"^GET /api/")
    else:
        monkeypatch.setattr(S, "HUB_TIMEOUT", 0.5)
        hub.fail("hang", r"^GET /api/datasets/.*/tree/")          # the shard folder's listing
    d = D.prepare(cache_dir=cache, verbose=False, max_tokens=3000)
    notice = one_notice(capsys.readouterr().err, "cannot be reached")
    assert d.meta["source"] == "python-docs" and "Python's own documentation" in notice
    assert {"500": "HfHubHTTPError: Server error '500 Internal Server Error'",
            "hang": "(no answer within 0.5 s)"}[fault] in notice
    assert cached_row_groups(cache) == [] and not temp_files(cache)
    assert not [f for f in os.listdir(os.path.join(cache, "tokens")) if f.startswith("fineweb")]
    hub.heal()                                        # a hanging request goes on, in its thread
    if fault == "hang":                               # let it finish before the next run
        assert wait_for(lambda: any(q[1].startswith("/cdn/") for q in hub.requests))
    new_run()
    healthy = D.prepare(cache_dir=cache, verbose=False, max_tokens=3000)
    assert healthy.meta["source"] == "fineweb-edu"
    assert same_tokens(healthy, reference_tokens(fineweb, tmp_path, max_tokens=3000))


@pytest.mark.parametrize("fault", ["500", "cut"])
def test_fineweb_hub_failing_during_a_download(hub, fineweb, tmp_path, monkeypatch, fault):
    """A row group's download fails once (a 500, or the body cut off half-way): huggingface_hub
    asks again and the tokens come out right, with no temporary file left."""
    monkeypatch.setattr(D, "BATCH_CHARS", 1)
    files, docs, _ = fineweb
    cache = str(tmp_path / "cache")
    raw = files[SHARD.format(0)]
    md = pq.ParquetFile(io.BytesIO(raw)).metadata
    rg1 = md.row_group(1).column(0)
    first = rg1.dictionary_page_offset or rg1.data_page_offset
    hub.fail(fault, rf"^GET /cdn/.* bytes={first}-", times=1)            # row group 1's text
    cap = n_tokens(docs[:30]) + 30
    d = D.prepare(cache_dir=cache, verbose=False, max_tokens=cap)
    answers = [q[3] for q in hub.requests if q[1].startswith("/cdn/") and (q[2] or "").startswith(f"bytes={first}-")]
    assert answers == [{"500": 500, "cut": "206 cut"}[fault], 206]         # failed once, asked again
    assert d.meta["source"] == "fineweb-edu" and d.meta["documents"] == 30
    assert same_tokens(d, reference_tokens(fineweb, tmp_path, max_tokens=cap))
    assert not temp_files(cache)
    for name in cached_row_groups(cache):                                # every saved row group is whole
        path = os.path.join(cache, "fineweb-edu", "sample", "10BT", name)
        g = int(name[-13:-8])
        assert pq.read_table(path).column("text").to_pylist() == docs[12 * g:12 * g + 12]


def test_fineweb_a_damaged_saved_row_group_is_fetched_again(hub, fineweb, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    D.prepare(cache_dir=cache, verbose=False, max_tokens=3000)
    path = os.path.join(cache, "fineweb-edu", "sample", "10BT", "000_00000", "rg00000.parquet")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\x00" * 64)
    new_run()
    d = D.prepare(cache_dir=cache, verbose=False, max_tokens=3000, seed=1)
    assert "rg00000.parquet is damaged" in one_notice(capsys.readouterr().err, "damaged")
    assert d.meta["row_groups_downloaded"] == 1
    assert same_tokens(d, reference_tokens(fineweb, tmp_path, max_tokens=3000, seed=1))


def test_fineweb_command_line_with_HF_ENDPOINT(hub, fineweb, tmp_path):
    """The real route, in a new process: HF_ENDPOINT set before huggingface_hub is imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB_OFFLINE")}
    env.update(HF_ENDPOINT=hub.url, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(D.__file__))))
    cache = str(tmp_path / "cache")
    out = subprocess.run([sys.executable, "-m", "nanoternary.data", "--max-tokens", "3000", "--cache-dir", cache,
                          "--json", "--quiet"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    report = json.loads(out.stdout)
    assert report["source"] == "fineweb-edu" and report["tokens"] == 3000
    ref = reference_tokens(fineweb, tmp_path, max_tokens=3000)
    assert np.array_equal(np.fromfile(os.path.join(report["path"], "train.bin"), np.uint16), ref.train)


# ----------------------------------------------------------------------------------------------
# GPT-2's embedding


def test_gpt2_fetches_only_the_header_and_wte(hub, gpt2, tmp_path, capsys):
    raw, wte, needed = gpt2
    P = G.load_gpt2_embedding(8, str(tmp_path / "data"))
    want, kept = G.svd_project(wte, 8)
    assert P is not None and np.array_equal(P, want)
    assert f"{kept:.1%} of the variance kept; cached as" in capsys.readouterr().out
    print(f"gpt2: sent {hub.sent:,} bytes of a {len(raw):,}-byte file; needed {needed:,}")
    assert needed <= hub.sent <= needed + 1024
    assert not temp_files(str(tmp_path))
    # what the bound above catches: fsspec's default read-ahead fetches 5 MiB past the first read
    new_run()
    hub.reset_counts()
    with HfFileSystem().open(G.GPT2_PATH, "rb") as f:
        G.read_tensor(f, G.WTE_NAMES)
    assert hub.sent > needed + 1_000_000


@pytest.mark.parametrize("fault", ["500", "hang"])
def test_gpt2_hub_failing_gives_one_line_and_no_cache(hub, gpt2, tmp_path, monkeypatch, capsys, fault):
    raw, wte, _ = gpt2
    cache_dir = tmp_path / "data"
    if fault == "500":
        hub.fail("500", r"^GET /api/")
    else:
        monkeypatch.setattr(G, "HUB_TIMEOUT", 0.5)
        hub.fail("hang", r"^GET /api/models/.*/tree/")
    assert G.load_gpt2_embedding(8, str(cache_dir)) is None
    out = capsys.readouterr().out
    notice = one_notice(out, "could not fetch")
    assert out.count("\n") == 1 and "using a random initialisation" in notice
    assert {"500": "HfHubHTTPError: Server error '500 Internal Server Error'",
            "hang": "HubUnreachable: no answer within 0.5 s"}[fault] in notice
    assert not cache_dir.exists() or not os.listdir(cache_dir)
    hub.heal()
    if fault == "hang":                               # let the hanging request finish first
        assert wait_for(lambda: any("/tree/" in q[1] and q[3] == 200 for q in hub.requests))
    new_run()
    P = G.load_gpt2_embedding(8, str(cache_dir), verbose=False)
    assert np.array_equal(P, G.svd_project(wte, 8)[0])


def test_gpt2_body_cut_off_is_fetched_again(hub, gpt2, tmp_path):
    raw, wte, needed = gpt2
    hub.fail("cut", r"^GET /cdn/", times=1, after=2)        # the third read: wte's bytes
    P = G.load_gpt2_embedding(8, str(tmp_path / "data"), verbose=False)
    cdn = [q[3] for q in hub.requests if q[1].startswith("/cdn/")]
    assert cdn == [206, 206, "206 cut", 206]
    assert np.array_equal(P, G.svd_project(wte, 8)[0])
    assert needed < hub.sent <= needed + (needed - 8) // 2 + 1024          # the cut-off half, once
    assert not temp_files(str(tmp_path))
    # and the cache written is the exact projection
    new_run()
    hub.fail("500")
    assert np.array_equal(G.load_gpt2_embedding(8, str(tmp_path / "data"), verbose=False), P)
