"""A local stand-in for huggingface.co, for tests of the hub paths through huggingface_hub's real
HTTP client (HfFileSystem). It serves small files the test gives it and answers the requests
HfFileSystem makes when a file is opened and read:

    GET  /api/{models,datasets}/{repo}[/revision/{rev}]    repo info (HfApi.repo_info)
    GET  /api/{models,datasets}/{repo}/tree/{rev}[/{dir}]  a folder's listing (HfFileSystem.ls / info)
    POST /api/{models,datasets}/{repo}/paths-info/{rev}    info on some paths (HfApi.get_paths_info)
    GET/HEAD [/datasets]/{repo}/resolve/{rev}/{file}       302 to the file host, with X-Repo-Commit,
                                                           ETag, X-Linked-Size and X-Linked-Etag
    GET/HEAD /cdn/{sha256}                                 the file host (on a second port, as the
                                                           hub's CDN is another host): the bytes,
                                                           Range requests answered with 206
                                                           Partial Content and Content-Range

Faults are injected per request (`hub.fail(kind, match, times, after)`): "500" (an Internal Server
Error with a JSON body, as the hub sends), "hang" (the answer waits until `hub.release()` or 10 s),
"cut" (on the file host: Content-Length says the whole range, half of it is sent, then the
connection is closed). `hub.sent` counts the file bytes sent by the file host (bodies of /cdn/
answers; the small JSON answers of the API are counted apart in `hub.api_sent`); `hub.requests`
logs every request as (method, path, Range header, status).

    with FakeHub({("dataset", "HuggingFaceFW/fineweb-edu"): {"sample/10BT/000_00000.parquet": raw}}) as hub:
        use_endpoint(monkeypatch, hub.url)          # huggingface_hub now talks to it
"""
import hashlib
import json
import re
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"          # the revision every repo is at
HANG_LIMIT = 10.0                                           # a "hang" never outlasts this (seconds)


def use_endpoint(monkeypatch, url):
    """Point huggingface_hub at `url` for the rest of the test.

    huggingface_hub (2.x) reads HF_ENDPOINT once, at import, into constants.ENDPOINT and builds
    constants.HUGGINGFACE_CO_URL_TEMPLATE (the download URLs) from it; both are read again at every
    request, so patching the two is enough. HfFileSystem instances are cached per endpoint and
    thread: clear that cache so no listing from an earlier test is reused.
    """
    from huggingface_hub import HfFileSystem, constants
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    HfFileSystem.clear_instance_cache()


class FakeHub:
    def __init__(self, repos):
        """repos: {(repo_type, repo_id): {path in repo: bytes}}, repo_type "model" or "dataset"."""
        self.repos = {key: dict(files) for key, files in repos.items()}
        self.blobs = {}                                     # sha256 -> bytes, what /cdn/ serves
        for files in self.repos.values():
            for raw in files.values():
                self.blobs[hashlib.sha256(raw).hexdigest()] = raw
        self.faults = []                                    # [kind, match, times left or None]
        self.requests = []                                  # (method, path, Range header, status)
        self.sent = 0                                       # file bytes sent by the file host
        self.api_sent = 0                                   # bytes of the API's JSON answers
        self.lock = threading.Lock()
        self.released = threading.Event()
        self.connections = set()

    # -------------------------------------------------------------------------------- control

    def fail(self, kind, match=".*", times=None, after=0):
        """Requests whose "METHOD /path Range" (e.g. "GET /cdn/ab12... bytes=0-7") matches the
        regex `match` get the fault `kind` ("500", "hang" or "cut"): the first `after` of them are
        answered normally, then the next `times` (None: all) fail."""
        assert kind in ("500", "hang", "cut")
        self.faults.append([kind, re.compile(match), times, after])

    def heal(self):
        self.faults.clear()
        self.release()

    def release(self):
        """Let every hanging request go on (and the ones to come)."""
        self.released.set()

    def reset_counts(self):
        with self.lock:
            self.requests.clear()
            self.sent = self.api_sent = 0

    def __enter__(self):
        hub = self

        class Handler(_Handler):
            pass
        Handler.hub = hub
        # two listeners, like huggingface.co and the CDN its /resolve/ redirects to: a redirect to
        # another origin is where huggingface_hub's HEAD stops and reads the X-Linked-* headers
        self.servers = [ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2)]
        self.url, self.cdn_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in self.servers)
        for server in self.servers:
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.release()
        for server in self.servers:
            server.shutdown()
            server.server_close()
        with self.lock:
            for conn in list(self.connections):           # keep-alive connections still open
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    # -------------------------------------------------------------------------------- answers

    def _fault_for(self, line):
        with self.lock:
            for fault in self.faults:
                kind, match, times, after = fault
                if not match.search(line) or times == 0:
                    continue
                if after > 0:
                    fault[3] -= 1
                    continue
                if times is not None:
                    fault[2] -= 1
                return kind
        return None

    def _entries(self, repo_key, folder, recursive):
        """The tree endpoint's JSON entries under `folder` ('' for the root)."""
        files = self.repos[repo_key]
        prefix = folder + "/" if folder else ""
        out, dirs = [], set()
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest and not recursive:
                dirs.add(prefix + rest.split("/")[0])
                continue
            parts = rest.split("/")
            for i in range(1, len(parts)):                  # the folders on the way (recursive)
                dirs.add(prefix + "/".join(parts[:i]))
            out.append(self._file_entry(path, files[path]))
        out += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "path": d} for d in sorted(dirs)]
        return out

    @staticmethod
    def _file_entry(path, raw):
        sha256 = hashlib.sha256(raw).hexdigest()
        return {"type": "file", "oid": hashlib.sha1(raw).hexdigest(), "size": len(raw), "path": path,
                "lfs": {"oid": sha256, "size": len(raw), "pointerSize": 134}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"                           # keep-alive, as the hub
    hub = None

    def log_message(self, *args):                          # quiet
        pass

    def setup(self):
        super().setup()
        with self.hub.lock:
            self.hub.connections.add(self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            with self.hub.lock:
                self.hub.connections.discard(self.connection)

    def do_GET(self):
        self._answer()

    def do_HEAD(self):
        self._answer()

    def do_POST(self):
        self._answer()

    # ------------------------------------------------------------------------------------------

    def _log(self, status):
        with self.hub.lock:
            self.hub.requests.append((self.command, self.path, self.headers.get("Range"), status))

    def _send(self, status, body=b"", headers=(), api=True):
        self._log(status)
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            with self.hub.lock:                 # counted before the write: the client may read the
                if api:                         # body and the test check the count before this thread
                    self.hub.api_sent += len(body)      # runs again
                else:
                    self.hub.sent += len(body)
            self.wfile.write(body)

    def _json(self, obj, status=200, headers=()):
        self._send(status, json.dumps(obj).encode(), [("Content-Type", "application/json"), *headers])

    def _not_found(self, code, message):
        self._json({"error": message}, 404, [("X-Error-Code", code), ("X-Error-Message", message)])

    def _answer(self):
        url = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(length).decode()) if length else {}
        if url.path == "/api/agent-harnesses":             # huggingface_hub's telemetry: not ours
            return self._not_found("EntryNotFound", "not here")
        fault = self.hub._fault_for(f"{self.command} {url.path} {self.headers.get('Range') or ''}".rstrip())
        if fault == "hang":
            self.hub.released.wait(HANG_LIMIT)
        elif fault == "500":
            self._json({"error": "Internal Error - We're working hard to fix this as soon as possible!"}, 500)
            return
        api = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)(?:/(revision|tree|paths-info)/([^/]+)(?:/(.*))?)?",
                           url.path)
        resolve = re.fullmatch(r"/(?:(datasets)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", url.path)
        cdn = re.fullmatch(r"/cdn/([0-9a-f]{64})", url.path)
        if api:
            kind, repo_id, op, _rev, folder = api.groups()
            key = (kind[:-1], repo_id)
            if key not in self.hub.repos:
                return self._not_found("RepoNotFound", "Repository not found")
            files = self.hub.repos[key]
            if op in (None, "revision"):
                return self._json({"id": repo_id, "sha": COMMIT, "private": False,
                                   "siblings": [{"rfilename": p} for p in sorted(files)]})
            if op == "tree":
                folder = urllib.parse.unquote(folder or "").strip("/")
                recursive = urllib.parse.parse_qs(url.query).get("recursive", ["False"])[0].lower() == "true"
                if folder and not any(p.startswith(folder + "/") for p in files):
                    return self._not_found("EntryNotFound", f"{folder} does not exist on \"main\"")
                return self._json(self.hub._entries(key, folder, recursive))
            paths = form.get("paths", [])                   # paths-info
            out = [self.hub._file_entry(p, files[p]) for p in paths if p in files]
            out += [{"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "path": p}
                    for p in paths if p not in files and any(f.startswith(p + "/") for f in files)]
            return self._json(out)
        if resolve:
            kind, repo_id, _rev, path = resolve.groups()
            key = ("dataset" if kind else "model", repo_id)
            path = urllib.parse.unquote(path)
            if key not in self.hub.repos:
                return self._not_found("RepoNotFound", "Repository not found")
            if path not in self.hub.repos[key]:
                return self._not_found("EntryNotFound", "Entry not found")
            raw = self.hub.repos[key][path]
            sha256 = hashlib.sha256(raw).hexdigest()
            return self._send(302, headers=[
                ("Location", f"{self.hub.cdn_url}/cdn/{sha256}"), ("X-Repo-Commit", COMMIT),
                ("ETag", f'"{hashlib.sha1(raw).hexdigest()}"'), ("X-Linked-Size", str(len(raw))),
                ("X-Linked-Etag", f'"{sha256}"')])
        if cdn and cdn.group(1) in self.hub.blobs:
            return self._file(self.hub.blobs[cdn.group(1)], fault == "cut")
        return self._send(404, b"not found")

    def _file(self, raw, cut):
        """The file host: the whole file, or one byte range of it (206 Partial Content)."""
        size, header = len(raw), self.headers.get("Range")
        status, begin, end = 200, 0, size
        if header:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
            if not m or m.groups() == ("", ""):
                return self._send(416, headers=[("Content-Range", f"bytes */{size}")])
            first, last = m.groups()
            if first == "":                                 # bytes=-N: the last N bytes
                begin, end = max(0, size - int(last)), size
            else:
                begin, end = int(first), min(size, int(last) + 1 if last else size)
            if begin >= size or begin >= end:
                return self._send(416, headers=[("Content-Range", f"bytes */{size}")])
            status = 206
        headers = [("Content-Type", "application/octet-stream"), ("Accept-Ranges", "bytes"),
                   ("ETag", f'"{hashlib.sha256(raw).hexdigest()}"')]
        if status == 206:
            headers.append(("Content-Range", f"bytes {begin}-{end - 1}/{size}"))
        body = raw[begin:end]
        if not cut:
            return self._send(status, body, headers, api=False)
        self._log(f"{status} cut")                          # Content-Length promises all, half comes
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        half = body[:len(body) // 2]
        with self.hub.lock:
            self.hub.sent += len(half)
        self.wfile.write(half)
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)
