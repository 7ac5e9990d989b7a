"""A small fake of the Hugging Face Hub's HTTP API, for tests (standard library only).

It serves what ``huggingface_hub`` 2.x requests in ``snapshot_download`` and
``hf_hub_download`` (model repos only):

``GET /api/models/{repo_id}`` and ``GET /api/models/{repo_id}/revision/{revision}``
    Repo info. Its ``sha`` is the commit the revision points to; ``siblings`` lists the files.
``GET /api/models/{repo_id}/tree/{revision}[/{folder}]?recursive=true``
    The files of a commit, paginated like the Hub (``Link: <next url>; rel="next"``).
``HEAD`` / ``GET /{repo_id}/resolve/{revision}/{path}``
    A file, with the headers the client reads: ``X-Repo-Commit``, ``ETag`` (the git blob
    sha1; for LFS files the sha256, also as ``X-Linked-Etag``, with ``X-Linked-Size``) and
    ``Content-Length``. ``Range: bytes=N-`` (the client's resume after a cut download)
    gets ``206 Partial Content`` with ``Content-Range``.

The server never advertises Xet storage (no ``X-Xet-Hash`` header, no ``xetHash`` in
tree entries), so the client always downloads over plain HTTP.

Errors carry the Hub's ``X-Error-Code`` header, so the client raises the exceptions it
raises against the real Hub:

=========================================  ===========================================
unknown repo                               404 ``RepoNotFound``
private repo, no token                     401 ``RepoNotFound``
token the Hub does not know (any repo)     401 "Invalid credentials in Authorization header"
private repo, known token without access   404 ``RepoNotFound``
gated repo file, no token / no access      401 / 403 ``GatedRepo`` (info and tree stay public)
unknown branch, tag or commit              404 ``RevisionNotFound``
unknown file                               404 ``EntryNotFound`` (with ``X-Repo-Commit``)
=========================================  ===========================================

Every request is recorded (:class:`Request`) so tests can assert what went over the wire.
Connections are HTTP/1.0 (one request each), so nothing lingers after :meth:`FakeHub.stop`.

Usage::

    with FakeHub() as hub:
        hub.create_repo("user/adapter")
        sha = hub.upload_folder("user/adapter", folder)  # a commit on "main"
        hub.url  # "http://127.0.0.1:PORT", to use as the Hub endpoint
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import itertools
import json
import re
import sys
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

__all__ = ["FakeHub", "Request"]

DEFAULT_BRANCH = "main"
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt")  # what the Hub's default .gitattributes tracks
GITATTRIBUTES = b"".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n".encode() for pattern in LFS_PATTERNS)
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class Request:
    """One request the server answered."""

    method: str  # "GET" or "HEAD"
    path: str  # URL path, percent-decoded, without the query string
    query: dict[str, str]
    authorization: str | None  # the Authorization header as sent
    range: str | None  # the Range header as sent
    kind: str  # "info", "tree", "file" or "unknown"
    repo_id: str | None
    revision: str | None  # as requested (branch, tag or commit sha)
    filename: str | None  # for "file" requests: the path inside the repo
    status: int
    body_bytes: int  # bytes of body actually sent


@dataclass
class _Repo:
    repo_id: str
    private: bool
    gated: bool
    access_token: str | None  # grants access to a private repo / passes a gated repo's gate
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> {path: content}


@dataclass
class _Cut:
    after_bytes: int  # no GET of the file delivers a byte at or past this offset...
    times: int | None  # ...for this many more GETs (None: forever)


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


class FakeHub:
    """An in-memory Hub on ``127.0.0.1`` (ephemeral port), served from a background thread."""

    def __init__(self, *, tree_page_size: int = 1000) -> None:
        self.tree_page_size = tree_page_size
        # Called with each Request once its answer is decided, before it is sent (e.g. to move a
        # branch between two downloads: the change applies to the requests after this one).
        self.on_request: Callable[[Request], None] | None = None
        self._repos: dict[str, _Repo] = {}
        self._tokens: set[str] = set()  # tokens the Hub knows (whatever they grant)
        self._cuts: dict[tuple[str, str], _Cut] = {}
        self._requests: list[Request] = []
        self._errors: list[BaseException] = []
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> FakeHub:
        assert self._server is None, "already started"
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the port; waits for requests in progress. Idempotent."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()  # joins the handler threads (daemon_threads is off)
        assert self._thread is not None
        self._thread.join(timeout=10)
        self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- content -------------------------------------------------------------
    def create_repo(self, repo_id: str, *, private: bool = False, gated: bool = False, token: str | None = None) -> str:
        """Create a model repo whose "main" holds a ``.gitattributes``; return that commit's sha.

        ``token`` is the token that grants access to a private repo (or passed a gated repo's gate).
        """
        if (private or gated) and not token:
            raise ValueError("a private or gated repo needs the token that grants access")
        with self._lock:
            if repo_id in self._repos:
                raise ValueError(f"repo {repo_id!r} exists")
            self._repos[repo_id] = _Repo(repo_id, private, gated, token)
            if token:
                self._tokens.add(token)
        return self.upload_files(repo_id, {".gitattributes": GITATTRIBUTES})

    def add_token(self, token: str) -> None:
        """Make ``token`` known to the Hub (a user's token) without granting it access to anything."""
        with self._lock:
            self._tokens.add(token)

    def upload_files(self, repo_id: str, files: dict[str, bytes], *, branch: str = DEFAULT_BRANCH) -> str:
        """Commit ``files`` (path -> content) on top of ``branch``; return the new commit's sha.

        A new branch starts from the head of "main".
        """
        with self._lock:
            repo = self._repos[repo_id]
            parent = repo.refs.get(branch) or repo.refs.get(DEFAULT_BRANCH)
            tree = {**(repo.commits[parent] if parent else {}), **files}
            digest = hashlib.sha1(f"{repo_id}\0{parent}\0{next(self._counter)}".encode())
            for path in sorted(tree):
                digest.update(f"\0{path}\0{_git_blob_sha(tree[path])}".encode())
            sha = digest.hexdigest()
            repo.commits[sha] = tree
            repo.refs[branch] = sha
            return sha

    def upload_folder(
        self, repo_id: str, folder: str | Path, *, path_in_repo: str = "", branch: str = DEFAULT_BRANCH
    ) -> str:
        """Commit every file under ``folder`` (into ``path_in_repo``); return the new commit's sha."""
        folder = Path(folder)
        prefix = f"{path_in_repo.strip('/')}/" if path_in_repo.strip("/") else ""
        files = {
            prefix + path.relative_to(folder).as_posix(): path.read_bytes()
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        }
        if not files:
            raise ValueError(f"{folder} has no files")
        return self.upload_files(repo_id, files, branch=branch)

    def cut_downloads(self, repo_id: str, filename: str, *, after_bytes: int | None, times: int | None = None) -> None:
        """Make GETs of ``filename`` fail midway: send the headers (``Content-Length`` of the whole
        answer), the body up to file offset ``after_bytes``, then close the connection.

        ``times``: how many GETs to cut (None: every one). ``after_bytes=None`` stops the cutting.
        """
        with self._lock:
            if after_bytes is None:
                self._cuts.pop((repo_id, filename), None)
            else:
                self._cuts[(repo_id, filename)] = _Cut(after_bytes, times)

    def file(self, repo_id: str, revision: str, filename: str) -> bytes:
        """The content of a file at a branch, tag or commit."""
        with self._lock:
            repo = self._repos[repo_id]
            return repo.commits[repo.refs.get(revision, revision)][filename]

    # -- what happened -------------------------------------------------------
    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    @property
    def unhandled(self) -> list[Request]:
        """Requests for endpoints this fake does not implement (the client's API use changed?)."""
        return [r for r in self.requests if r.kind == "unknown"]

    @property
    def errors(self) -> list[BaseException]:
        """Exceptions raised while serving (bugs in this fake), other than clients hanging up."""
        with self._lock:
            return list(self._errors)

    # -- the API (called from handler threads) ------------------------------
    def _repo(self, repo_id: str, authorization: str | None, *, reading_file: bool = False) -> _Repo:
        token = authorization.removeprefix("Bearer ").strip() if authorization else None
        if token is not None and token not in self._tokens:
            raise _HubError(401, "Invalid credentials in Authorization header")
        repo = self._repos.get(repo_id)
        if repo is None:
            raise _HubError(404, "Repository not found", "RepoNotFound")
        if repo.private and token != repo.access_token:
            raise _HubError(401 if token is None else 404, "Repository not found", "RepoNotFound")
        if repo.gated and reading_file and token != repo.access_token:
            raise _HubError(
                401 if token is None else 403,
                f"Access to model {repo_id} is restricted. You must have access to it and be authenticated.",
                "GatedRepo",
            )
        return repo

    @staticmethod
    def _commit(repo: _Repo, revision: str) -> str:
        if revision in repo.refs:
            return repo.refs[revision]
        if _COMMIT_SHA.fullmatch(revision) and revision in repo.commits:
            return revision
        raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _info(self, repo_id: str, revision: str, authorization: str | None) -> dict:
        with self._lock:
            repo = self._repo(repo_id, authorization)
            sha = self._commit(repo, revision)
            paths = sorted(repo.commits[sha])
        return {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": sha,
            "private": repo.private,
            "gated": "auto" if repo.gated else False,
            "disabled": False,
            "tags": [],
            "siblings": [{"rfilename": path} for path in paths],
        }

    def _tree(self, repo_id: str, revision: str, folder: str, recursive: bool, authorization: str | None) -> list:
        with self._lock:
            repo = self._repo(repo_id, authorization)
            sha = self._commit(repo, revision)
            tree = repo.commits[sha]
        prefix = f"{folder}/" if folder else ""
        if folder and not any(path.startswith(prefix) for path in tree):
            raise _HubError(404, f"{folder} does not exist on {revision!r}", "EntryNotFound", sha)
        files = sorted(path for path in tree if path.startswith(prefix))
        folders = sorted({"/".join(p.split("/")[: i + 1]) for p in files for i in range(p.count("/"))} - {folder})
        entries = [{"type": "directory", "oid": _git_blob_sha(d.encode()), "size": 0, "path": d} for d in folders]
        for path in files:
            content = tree[path]
            entry = {"type": "file", "oid": _git_blob_sha(content), "size": len(content), "path": path}
            if _is_lfs(path):
                entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
            entries.append(entry)
        if not recursive:
            depth = folder.count("/") + 1 if folder else 0
            entries = [e for e in entries if e["path"].count("/") == depth]
        return entries

    def _file(self, repo_id: str, revision: str, filename: str, authorization: str | None) -> tuple[str, bytes]:
        with self._lock:
            repo = self._repo(repo_id, authorization, reading_file=True)
            sha = self._commit(repo, revision)
            content = repo.commits[sha].get(filename)
        if content is None:
            raise _HubError(404, f"Entry not found: {filename}", "EntryNotFound", sha)
        return sha, content

    def _take_cut(self, repo_id: str, filename: str) -> int | None:
        """The offset at which this GET gets cut, if it does."""
        with self._lock:
            cut = self._cuts.get((repo_id, filename))
            if cut is None or cut.times == 0:
                return None
            if cut.times is not None:
                cut.times -= 1
            return cut.after_bytes

    def _record(self, request: Request) -> None:
        with self._lock:
            self._requests.append(request)
        if self.on_request is not None:
            self.on_request(request)

    def _record_error(self, error: BaseException) -> None:
        with self._lock:
            self._errors.append(error)


def _git_blob_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _is_lfs(path: str) -> bool:
    return any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], pattern) for pattern in LFS_PATTERNS)


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # so that server_close() waits for the requests in progress
    hub: FakeHub

    def handle_error(self, request: object, client_address: object) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, (BrokenPipeError, ConnectionResetError)):  # a client hanging up is fine
            self.hub._record_error(error)


@dataclass
class _Answer:
    status: int
    headers: dict[str, str]
    body: bytes  # the whole body that Content-Length announces
    cut_at: int | None = None  # send only this many bytes of it, then hang up


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: nothing stays open after stop()
    timeout = 10  # seconds a connection may idle before the server gives up on it
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass  # keep the test output clean; the request log has everything

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._serve(send_body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(send_body=True)

    def _serve(self, *, send_body: bool) -> None:
        hub = self.server.hub
        url = urlsplit(self.path)
        # Split first, then decode each part: a revision may hold an encoded "/" (quote(rev, safe="")).
        parts = [unquote(part) for part in url.path.strip("/").split("/")]
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        kind, repo_id, revision, filename = _route(parts)
        try:
            answer = self._answer(url.path, query, kind, repo_id, revision, filename)
        except _HubError as error:
            headers = {"X-Error-Message": error.message}
            if error.code:
                headers["X-Error-Code"] = error.code
            if error.commit:
                headers["X-Repo-Commit"] = error.commit
            answer = _Answer(error.status, headers, json.dumps({"error": error.message}).encode())
        body = answer.body if answer.cut_at is None else answer.body[: answer.cut_at]
        # Logged (and on_request called) before anything is sent: when the client has its answer,
        # the log already shows the request, and whatever on_request changed applies to the next ones.
        hub._record(
            Request(
                method=self.command,
                path="/" + "/".join(parts),
                query=query,
                authorization=self.headers.get("Authorization"),
                range=self.headers.get("Range"),
                kind=kind,
                repo_id=repo_id,
                revision=revision,
                filename=filename,
                status=answer.status,
                body_bytes=len(body) if send_body else 0,
            )
        )
        self.send_response(answer.status)
        self.send_header("Content-Length", str(len(answer.body)))
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)
        if answer.cut_at is not None:
            self.close_connection = True  # short of Content-Length: the client sees a broken download

    def _answer(
        self, path: str, query: dict[str, str], kind: str, repo_id: str, revision: str, filename: str | None
    ) -> _Answer:
        hub = self.server.hub
        authorization = self.headers.get("Authorization")
        json_type = {"Content-Type": "application/json; charset=utf-8"}
        if kind == "info":
            return _Answer(200, json_type, json.dumps(hub._info(repo_id, revision, authorization)).encode())
        if kind == "tree":
            recursive = query.get("recursive", "false").lower() in ("true", "1")
            entries = hub._tree(repo_id, revision, filename or "", recursive, authorization)
            start = int(query.get("cursor", "0"))
            end = start + hub.tree_page_size
            headers = dict(json_type)
            if end < len(entries):
                next_query = urlencode({**query, "cursor": str(end)})
                headers["Link"] = f'<{hub.url}{quote(path)}?{next_query}>; rel="next"'
            return _Answer(200, headers, json.dumps(entries[start:end]).encode())
        if kind == "file":
            assert filename is not None
            return self._answer_file(repo_id, revision, filename, authorization)
        raise _HubError(404, f"no such endpoint: {path}")

    def _answer_file(self, repo_id: str, revision: str, filename: str, authorization: str | None) -> _Answer:
        hub = self.server.hub
        sha, content = hub._file(repo_id, revision, filename, authorization)
        size = len(content)
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", "X-Repo-Commit": sha}
        if _is_lfs(filename):
            lfs_etag = f'"{hashlib.sha256(content).hexdigest()}"'
            headers.update({"ETag": lfs_etag, "X-Linked-Etag": lfs_etag, "X-Linked-Size": str(size)})
        else:
            headers["ETag"] = f'"{_git_blob_sha(content)}"'
        start, status = 0, 200
        requested = self.headers.get("Range")
        if requested:
            match = re.fullmatch(r"bytes=(\d+)-", requested.strip())
            if match is None or int(match.group(1)) >= size:
                raise _HubError(416, f"unsupported or unsatisfiable range {requested!r}")
            start, status = int(match.group(1)), 206
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        cut_at = hub._take_cut(repo_id, filename) if self.command == "GET" else None
        return _Answer(status, headers, content[start:], None if cut_at is None else max(0, cut_at - start))


def _route(parts: list[str]) -> tuple[str, str | None, str | None, str | None]:
    """(kind, repo_id, revision, filename) of a request path split into decoded parts."""
    if parts[:2] == ["api", "models"] and len(parts) >= 4:
        repo_id, rest = "/".join(parts[2:4]), parts[4:]
        if not rest:
            return "info", repo_id, DEFAULT_BRANCH, None
        if len(rest) == 2 and rest[0] == "revision":
            return "info", repo_id, rest[1], None
        if len(rest) >= 2 and rest[0] == "tree":
            return "tree", repo_id, rest[1], "/".join(rest[2:]) or None
    elif len(parts) >= 5 and parts[2] == "resolve" and parts[0] != "api":
        return "file", "/".join(parts[:2]), parts[3], "/".join(parts[4:])
    return "unknown", None, None, None


@contextlib.contextmanager
def serving_as_the_hub(monkeypatch, tmp_path: Path) -> Iterator[FakeHub]:
    """A running FakeHub that huggingface_hub uses as the Hub: no token, online, a cache under ``tmp_path``."""
    from huggingface_hub import constants, file_download

    with FakeHub() as server:
        # huggingface_hub reads HF_ENDPOINT into these at import time; HfApi and hf_hub_url read them per call.
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # plain HTTP downloads even if hf_xet is installed
        # No user-agent "agent detection", which fetches {ENDPOINT}/api/agent-harnesses and writes into HF_HOME.
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        # No stray writes to, or tokens from, the real home folder.
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "default-hub-cache"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-here"))
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
            monkeypatch.delenv(name, raising=False)
        # http_get sleeps 1 s before each attempt to resume a broken download; the tests need no pause.
        monkeypatch.setattr(file_download, "time", types.SimpleNamespace(sleep=lambda seconds: None))
        yield server
    assert server.errors == [], "the fake Hub crashed while serving"
    assert server.unhandled == [], "huggingface_hub used endpoints the fake Hub does not implement"
