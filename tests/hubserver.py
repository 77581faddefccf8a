"""A small Hugging Face Hub-compatible HTTP server for tests (stdlib only, 127.0.0.1).

Written against huggingface_hub 2.4.0 (see ../shared/HUB-TESTING.md and the client's source): it
serves exactly the endpoints that client calls for downloads and for ``create_repo`` +
``upload_folder`` over the legacy LFS protocol (``HF_HUB_DISABLE_XET=1``), with the headers the
client relies on (``X-Repo-Commit``, ``ETag``, ``Content-Length``, ``X-Error-Code``). Only the
server is ours: the tests drive the real client, its cache and its error classes.

Repos are created by tests (``add_repo``/``add_folder``) or through the upload endpoints. Every
request is logged (``requests``) so tests can count what was downloaded, and network faults can
be injected: per file (``fail_downloads``: drop the connection, stall mid-body, send fewer bytes,
send other bytes than the listing claims, never answer, or an HTTP status), for the whole server
(``silent``: accept connections and never answer), and a bandwidth limit shared by every
connection (``bandwidth``, bytes/s: a link of that speed).

Endpoints (model repos only):
  GET  /api/models/{repo}[/revision/{rev}]          model_info (id, sha, siblings, gated)
  GET  /api/models/{repo}/tree/{rev}[/{path}]       recursive tree listing
  HEAD|GET /{repo}/resolve/{rev}/{path}             file metadata / bytes (Range supported)
  POST /api/repos/create                            create_repo (initial commit: .gitattributes)
  POST /api/validate-yaml                           README front matter check (PyYAML)
  POST /api/models/{repo}/preupload/{rev}           upload modes ("regular" | "lfs")
  POST /{repo}.git/info/lfs/objects/batch           LFS batch API, basic transfer
  PUT  /lfs-upload/{oid}     POST /lfs-verify       LFS upload + verify (sha256 checked)
  POST /api/models/{repo}/commit/{rev}              NDJSON commit (file, lfsFile, deletedFile)
  POST /api/models/{repo}/branch/{branch}           create_branch (409 when it exists)
Anything else answers 404 without an error code (e.g. the client's best-effort
``GET /api/agent-harnesses``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

#: The client version these endpoints were checked against.
CLIENT_VERSION = "2.4.0"

#: Suffixes the Hub's default .gitattributes stores in LFS.
LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".zst", ".npy", ".npz", ".gz", ".h5", ".msgpack", ".model")
#: The Hub stores text files above this size in LFS too.
LFS_MIN_SIZE = 10 * 1024 * 1024

GITATTRIBUTES = b"".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n".encode() for s in LFS_SUFFIXES)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str, data: bytes) -> bool:
    """Whether the Hub would store this file in LFS (suffix, size or binary content)."""
    if path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE:
        return True
    try:
        data[:512].decode("utf-8")
    except UnicodeDecodeError:
        return True
    return b"\0" in data[:512]


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]
    parent: str | None
    message: str


@dataclass
class Repo:
    repo_id: str
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated: bool = False
    private: bool = False
    readers: set[str] = field(default_factory=set)  # tokens granted access to a gated repo

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.refs:
            return self.commits[self.refs[revision]]
        return self.commits.get(revision)


@dataclass
class Failure:
    """An injected download failure, for GETs of one file's bytes:

    * ``"drop"``: send half the body, then close the connection (a network cut);
    * ``"stall"``: send half the body, then nothing until the server stops (a stalled transfer);
    * ``"hang"``: accept the request and never answer it;
    * ``"short"``: answer with a Content-Length smaller than asked (a complete, short answer);
    * ``"corrupt"``: the right length but other bytes (the listing's LFS sha256 stays right);
    * ``"norange"``: ignore a ``Range`` header (answer 200 with the whole file, as some proxies do);
    * an int: answer that HTTP status.

    ``after``: requests served normally before the failure starts; ``times``: requests that then
    fail with ``mode``; ``then``: the mode of the requests after those (``None``: keep ``mode``;
    ``"ok"``: serve normally); ``min_bytes``: only GETs asking for at least that many bytes are
    counted (so a fault can target a file's body whatever small header reads come first)."""

    mode: str | int
    then: str | int | None = None
    count: int = 0
    after: int = 0
    times: int = 1
    min_bytes: int = 0  # only GETs asking for at least this many bytes count (and fail)


class FakeHub:
    """The server's state plus its lifecycle. Use as a context manager or start()/stop()."""

    def __init__(self, write_tokens: tuple[str, ...] = ("hf_writer",)) -> None:
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.write_tokens = set(write_tokens)
        self.requests: list[tuple[str, str]] = []
        self.ranges: list[tuple[str, str | None]] = []  # (path, Range header) of every GET /resolve
        self.failures: dict[tuple[str, str], Failure] = {}
        self.lock = threading.RLock()
        #: Accept connections and never answer any request (a Hub that stopped answering).
        self.silent = False
        #: Bytes/s shared by every file body sent (None: unlimited): a link of that speed.
        self.bandwidth: float | None = None
        self._link = _Link()
        self.stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()  # releases stalled and silent handlers
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- test helpers ------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", gated: bool = False,
                 readers: tuple[str, ...] = (), message: str = "add files") -> str:
        """Create or extend a repo with one commit holding ``files`` on ``branch``; return its sha."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(repo_id))
            repo.gated = repo.gated or gated
            repo.readers.update(readers)
            return self._commit(repo, branch, dict(files), [], message)

    def add_folder(self, repo_id: str, folder: Path, **kwargs) -> str:
        """``add_repo`` with every file under ``folder`` (paths relative, '/'-separated)."""
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        return self.add_repo(repo_id, files, **kwargs)

    def fail_downloads(self, repo_id: str, path: str, mode: str | int = "drop", then: str | int | None = None,
                       after: int = 0, times: int = 1, min_bytes: int = 0) -> Failure:
        failure = Failure(mode, then, after=after, times=times, min_bytes=min_bytes)
        self.failures[(repo_id, path)] = failure
        return failure

    def clear_failures(self) -> None:
        self.failures.clear()
        self.silent = False
        self.bandwidth = None

    def clear_log(self) -> None:
        with self.lock:
            self.requests.clear()
            self.ranges.clear()

    def file_gets(self, repo_id: str | None = None) -> list[str]:
        """Paths of files whose bytes were requested (GET /resolve), in order."""
        out = []
        for method, path in list(self.requests):
            m = _RESOLVE.match(path)
            if method == "GET" and m and (repo_id is None or unquote(m["repo"]) == repo_id):
                out.append(unquote(m["path"]))
        return out

    def files_at(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        commit = self.repos[repo_id].resolve(revision)
        assert commit is not None
        return dict(commit.files)

    # -- internals ---------------------------------------------------------------------------
    def _commit(self, repo: Repo, branch: str, added: dict[str, bytes], deleted: list[str], message: str) -> str:
        parent_sha = repo.refs.get(branch)
        files = dict(repo.commits[parent_sha].files) if parent_sha else {}
        for path in deleted:
            files.pop(path, None)
            for p in [p for p in files if p.startswith(path.rstrip("/") + "/")]:
                files.pop(p)
        files.update(added)
        listing = json.dumps(sorted((p, git_blob_sha1(d)) for p, d in files.items()))
        sha = hashlib.sha1(f"{listing}\n{parent_sha}\n{message}\n{len(repo.commits)}".encode()).hexdigest()
        repo.commits[sha] = Commit(sha, files, parent_sha, message)
        repo.refs[branch] = sha
        return sha


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_RESOLVE = re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_INFO = re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_PREUPLOAD = re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$")
_COMMIT = re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$")
_BRANCH = re.compile(rf"^/api/models/{_REPO}/branch/(?P<branch>[^/]+)$")
_LFS_BATCH = re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$")
_LFS_UPLOAD = re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$")


class _Link:
    """A shared link: ``send`` paces every connection's bytes so that together they go no faster
    than the given rate (a token bucket with a 50 ms burst)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 0.0  # the time at which the link is free again

    def send(self, wfile, data: bytes, rate: float | None, stopping: threading.Event) -> None:
        step = 64 * 1024 if not rate else int(max(512, min(1 << 20, rate / 50)))  # ~20 ms a piece
        for i in range(0, len(data), step):
            piece = data[i:i + step]
            if rate:
                with self._lock:
                    now = time.monotonic()
                    start = max(now - 0.05, self._next)
                    self._next = start + len(piece) / rate
                    wait = self._next - now
                if wait > 0 and stopping.wait(wait):
                    return
            wfile.write(piece)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: FakeHub

    def log_message(self, format: str, *args) -> None:  # keep test output quiet
        pass

    # -- plumbing ----------------------------------------------------------------------------
    def _path(self) -> tuple[str, dict[str, list[str]]]:
        parts = urlsplit(self.path)
        return parts.path, parse_qs(parts.query)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, status: int, code: str | None, message: str) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers)

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        return repo

    def _commit_for(self, repo: Repo, rev: str) -> Commit | None:
        commit = repo.resolve(rev)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit

    def _log(self) -> None:
        with self.state.lock:
            self.state.requests.append((self.command, self._path()[0]))
            if self.command == "GET" and (m := _RESOLVE.match(self._path()[0])):
                self.state.ranges.append((unquote(m["path"]), self.headers.get("Range")))
        if self.state.silent:  # accept, read the request, never answer
            self.state.stopping.wait()
            self.close_connection = True
            raise _Silenced

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except _Silenced:
            self.close_connection = True
        except (ConnectionError, BrokenPipeError):  # the client gave up on a stalled or throttled body
            self.close_connection = True

    # -- dispatch ----------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._log()
        path, _ = self._path()
        if m := _RESOLVE.match(path):
            return self._resolve(m)
        self._error(404, None, "Not found")

    def do_GET(self) -> None:
        self._log()
        path, query = self._path()
        if m := _RESOLVE.match(path):
            return self._resolve(m)
        if m := _TREE.match(path):
            return self._tree(m, query)
        if m := _INFO.match(path):
            return self._info(m)
        self._error(404, None, "Not found")

    def do_POST(self) -> None:
        self._log()
        path, _ = self._path()
        body = self._body()
        if path == "/api/repos/create":
            return self._create(body)
        if path == "/api/validate-yaml":
            return self._validate_yaml(body)
        if path == "/lfs-verify":
            return self._lfs_verify(body)
        for regex, handler in ((_PREUPLOAD, self._preupload), (_COMMIT, self._commit), (_LFS_BATCH, self._lfs_batch),
                               (_BRANCH, self._branch)):
            if m := regex.match(path):
                return handler(m, body)
        self._error(404, None, "Not found")

    def do_PUT(self) -> None:
        self._log()
        path, _ = self._path()
        body = self._body()
        if m := _LFS_UPLOAD.match(path):
            if hashlib.sha256(body).hexdigest() != m["oid"]:
                return self._error(400, None, "sha256 of the uploaded content does not match the oid")
            with self.state.lock:
                self.state.lfs_store[m["oid"]] = body
            return self._send(200)
        self._error(404, None, "Not found")

    # -- downloads ---------------------------------------------------------------------------
    def _info(self, m: re.Match) -> None:
        repo_id = unquote(m["repo"])
        if (repo := self._repo(repo_id)) is None:
            return
        if (commit := self._commit_for(repo, unquote(m["rev"] or "main"))) is None:
            return
        self._json(200, {"id": repo_id, "modelId": repo_id, "sha": commit.sha, "private": repo.private,
                         "gated": "manual" if repo.gated else False, "disabled": False,
                         "siblings": [{"rfilename": p} for p in sorted(commit.files)]})

    def _tree(self, m: re.Match, query: dict[str, list[str]]) -> None:
        repo_id = unquote(m["repo"])
        if (repo := self._repo(repo_id)) is None:
            return
        if (commit := self._commit_for(repo, unquote(m["rev"]))) is None:
            return
        prefix = unquote(m["path"] or "").strip("/")
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries, dirs = [], set()
        for path in sorted(commit.files):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rel = path[len(prefix) + 1:] if prefix else path
            parts = rel.split("/")
            for i in range(1, len(parts)):
                d = "/".join(([prefix] if prefix else []) + parts[:i])
                if d not in dirs and (recursive or i == 1):
                    dirs.add(d)
                    entries.append({"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest(),
                                    "size": 0})
            if len(parts) > 1 and not recursive:
                continue
            data = commit.files[path]
            entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
            if is_lfs(path, data):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        if prefix and not entries:
            return self._error(404, "EntryNotFound", f"{prefix} does not exist on \"{m['rev']}\"")
        self._json(200, entries)

    def _resolve(self, m: re.Match) -> None:
        repo_id, path = unquote(m["repo"]), unquote(m["path"])
        if (repo := self._repo(repo_id)) is None:
            return
        if repo.gated:
            token = self._token()
            msg = (f"Access to model {repo_id} is restricted. You must have access to it and be authenticated"
                   " to access it. Please log in.")
            if token is None:
                return self._error(401, "GatedRepo", msg)
            if token not in repo.readers:
                return self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in"
                                   " the authorized list. Visit the repo page to ask for access.")
        if (commit := self._commit_for(repo, unquote(m["rev"]))) is None:
            return
        if path not in commit.files:
            return self._error(404, "EntryNotFound", f"{path} does not exist on \"{m['rev']}\"")
        data = commit.files[path]
        etag = hashlib.sha256(data).hexdigest() if is_lfs(path, data) else git_blob_sha1(data)
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        failure = self.state.failures.get((repo_id, path))
        mode: str | int = "ok"
        if self.command == "GET" and failure is not None and failure.min_bytes:
            asked = re.fullmatch(r"bytes=(\d+)-(\d*)", (self.headers.get("Range") or "").strip())
            first, last = (int(asked[1]), int(asked[2]) if asked[2] else len(data) - 1) if asked else (0, len(data) - 1)
            if last + 1 - first < failure.min_bytes:
                failure = None  # a small request (a header): served, and not counted
        if self.command == "GET" and failure is not None:
            with self.state.lock:
                n = failure.count
                failure.count += 1
            if n >= failure.after:
                mode = failure.mode if n < failure.after + failure.times or failure.then is None else failure.then
        if isinstance(mode, int):
            return self._error(mode, None, "Injected failure")
        if mode == "hang":
            self.state.stopping.wait()
            self.close_connection = True
            return
        status, start, end = 200, 0, len(data)
        range_header = self.headers.get("Range")
        if mode == "norange":
            range_header = None
        if self.command == "GET" and range_header and (r := re.fullmatch(r"bytes=(\d+)-(\d*)", range_header.strip())):
            start = int(r[1])
            end = min(len(data), int(r[2]) + 1) if r[2] else len(data)
            if start >= len(data) or start >= end:
                return self._error(416, None, "Range not satisfiable")
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        if self.command == "HEAD":
            self.send_response(200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return
        body = data[start:end]
        if mode == "corrupt":  # same length, other bytes: what the listing's sha256 does not describe
            body = bytes(b ^ 0x5A for b in body[:64]) + body[64:]
        elif mode == "short":  # a complete answer, but fewer bytes than asked for
            body = body[: max(0, len(body) - max(1, len(body) // 4))]
            if status == 206:
                headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{len(data)}"
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/octet-stream")
        full = end - start if mode in ("drop", "stall") else len(body)
        self.send_header("Content-Length", str(full))
        self.end_headers()
        cut = mode in ("drop", "stall")
        self.state._link.send(self.wfile, body[: len(body) // 2] if cut else body, self.state.bandwidth,
                              self.state.stopping)
        self.wfile.flush()
        if mode == "stall":  # half the body, then silence until the server stops
            self.state.stopping.wait()
        if cut:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- uploads -----------------------------------------------------------------------------
    def _require_writer(self) -> bool:
        if self._token() in self.state.write_tokens:
            return True
        self._error(401, None, "Invalid credentials in Authorization header")
        return False

    def _create(self, body: bytes) -> None:
        if not self._require_writer():
            return
        payload = json.loads(body)
        if payload.get("type", "model") != "model":
            return self._error(400, None, "only model repos are served by this test hub")
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if "/" not in repo_id:
            repo_id = f"tester/{repo_id}"
        with self.state.lock:
            if repo_id in self.state.repos:
                # as the Hub answers (and huggingface_hub's create_repo(exist_ok=True) reads "url" of it)
                return self._json(409, {"error": "You already created this model repo",
                                        "url": f"{self.state.url}/{repo_id}"},
                                  {"X-Error-Message": "You already created this model repo"})
            repo = Repo(repo_id, private=payload.get("visibility") == "private")
            self.state.repos[repo_id] = repo
            self.state._commit(repo, "main", {".gitattributes": GITATTRIBUTES}, [], "initial commit")
        self._json(200, {"url": f"{self.state.url}/{repo_id}", "name": repo_id})

    def _branch(self, m: re.Match, body: bytes) -> None:
        """create_branch (push --revision): a new ref at ``startingPoint`` (default: main); 409
        when it exists, which the client's ``exist_ok=True`` accepts."""
        if not self._require_writer():
            return
        if (repo := self._repo(unquote(m["repo"]))) is None:
            return
        branch = unquote(m["branch"])
        start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
        with self.state.lock:
            if branch in repo.refs:
                return self._error(409, None, "Reference already exists")
            commit = repo.resolve(start)
            if commit is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {start}")
            repo.refs[branch] = commit.sha
        self._json(200, {})

    def _validate_yaml(self, body: bytes) -> None:
        import yaml  # a dependency of huggingface_hub itself

        content = json.loads(body)["content"]
        errors = []
        m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        if m is None:
            return self._json(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
        try:
            meta = yaml.safe_load(m[1])
        except yaml.YAMLError as exc:
            meta, errors = None, [{"message": f"invalid YAML: {exc}"}]
        if meta is not None and not isinstance(meta, dict):
            errors.append({"message": "metadata must be a mapping"})
        elif isinstance(meta, dict):
            bases = meta.get("base_model", [])
            for b in [bases] if isinstance(bases, str) else bases:
                if not (isinstance(b, str) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", b)):
                    errors.append({"message": f'"base_model" must be a Hub model id, got {b!r}'})
            if "license" in meta and not isinstance(meta["license"], str):
                errors.append({"message": '"license" must be a string'})
            if "tags" in meta and not (isinstance(meta["tags"], list) and all(isinstance(t, str) for t in meta["tags"])):
                errors.append({"message": '"tags" must be a list of strings'})
        self._json(400 if errors else 200, {"errors": errors, "warnings": []})

    def _writable_repo(self, m: re.Match) -> tuple[Repo, str] | None:
        if not self._require_writer():
            return None
        if (repo := self._repo(unquote(m["repo"]))) is None:
            return None
        rev = unquote(m["rev"])
        if rev not in repo.refs:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return repo, rev

    def _preupload(self, m: re.Match, body: bytes) -> None:
        if (found := self._writable_repo(m)) is None:
            return
        repo, rev = found
        current = repo.resolve(rev).files
        files = []
        for f in json.loads(body)["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE or is_lfs("", sample)
            oid = None
            if f["path"] in current:
                data = current[f["path"]]
                oid = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        self._json(200, {"files": files, "commitOid": repo.refs[rev]})

    def _lfs_batch(self, m: re.Match, body: bytes) -> None:
        if not self._require_writer():
            return
        if self._repo(unquote(m["repo"])) is None:
            return
        payload = json.loads(body)
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.state.lfs_store:
                entry["authenticated"] = True
                entry["actions"] = {"upload": {"href": f"{self.state.url}/lfs-upload/{obj['oid']}"},
                                    "verify": {"href": f"{self.state.url}/lfs-verify"}}
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_verify(self, body: bytes) -> None:
        obj = json.loads(body)
        stored = self.state.lfs_store.get(obj["oid"])
        if stored is None or len(stored) != obj["size"]:
            return self._error(404, None, "object not uploaded")
        self._json(200, {"success": True})

    def _commit(self, m: re.Match, body: bytes) -> None:
        if (found := self._writable_repo(m)) is None:
            return
        repo, rev = found
        added: dict[str, bytes] = {}
        deleted: list[str] = []
        message = "commit"
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value["summary"]
            elif key == "file":
                added[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                data = self.state.lfs_store.get(value["oid"])
                if data is None:
                    return self._error(400, None, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                added[value["path"]] = data
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                return self._error(400, None, f"unsupported commit operation {key!r}")
        with self.state.lock:
            sha = self.state._commit(repo, rev, added, deleted, message)
        self._json(200, {"success": True, "commitOid": sha, "commitUrl": f"{self.state.url}/{repo.repo_id}/commit/{sha}",
                         "pullRequestUrl": None})


class _Silenced(Exception):
    """Raised in a handler of a silent server once it is stopped: end the request unanswered."""


def free_port() -> int:
    """A port on 127.0.0.1 with nothing listening (for "server down" tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
