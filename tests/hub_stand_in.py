"""An offline, in-process stand-in for the Hugging Face Hub.

huggingface_hub 2.x sends every request through one shared ``httpx2.Client`` (the ``httpx`` fork it vendors as a
dependency) built by a replaceable factory. :func:`install` swaps that factory for one whose client carries an
``httpx2.MockTransport`` bound to :meth:`HubStandIn.handle`, so ``push_to_hub`` / ``from_pretrained`` /
``datasets.push_to_hub`` / ``load_dataset(..., streaming=True)`` made by transformers, peft and datasets all talk
to this in-memory Hub without opening a socket. :meth:`HubStandIn.serve` serves the same handler on a loopback HTTP
server for subprocess and CLI tests.

Use it from a test (or register the ``hub`` fixture in conftest with ``from hub_stand_in import hub``)::

    def test_round_trip(hub):
        model.push_to_hub("user/tiny")
        assert "model.safetensors" in hub.files("user/tiny")
        loaded = Model.from_pretrained("user/tiny")

    def test_in_a_subprocess(hub):
        with hub.serve() as endpoint:
            subprocess.run([...], env=hub.subprocess_env(endpoint), check=True)

Repos live in memory: each repo keeps its commits (a full ``{path: blob}`` snapshot each, a 40-hex sha) and its
branches (``main`` plus ``refs/pr/N`` for ``create_pr=True``). Requests no route matches get a 404 whose
``X-Error-Message`` names the method and path and are recorded in ``hub.unknown_requests``; errors inside the
stand-in answer 501 (not retried by huggingface_hub) and are recorded in ``hub.errors``.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import fnmatch
import hashlib
import http.server
import itertools
import json
import os
import re
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs, quote, unquote, urlsplit

import httpx2
import pytest

ENDPOINT = "https://hub-stand-in.invalid"  # ".invalid" never resolves: a request that escapes the stand-in fails fast
TOKEN = "hf_stand_in_token"
USER = "user"
REPO_TYPES = ("model", "dataset", "space")
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# Files the real Hub's default .gitattributes sends to LFS (the ones these libraries write), plus anything binary.
LFS_PATTERNS = (
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.npy", "*.npz",
    "*.parquet", "*.arrow", "*.zip", "*.gz", "*.tar", "*.zst", "*.pkl", "*.pickle", "*.model", "*.tflite",
    "*.png", "*.jpg", "*.jpeg", "*.webp", "*.mp4", "*.wav", "*.mp3",
)
GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in LFS_PATTERNS).encode()
LFS_THRESHOLD = 10 * 1024 * 1024


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _iso(moment: _dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def oid(self) -> str:
        """The git blob id: of the content for regular files, of the LFS pointer for LFS files."""
        return git_blob_oid(self.pointer if self.lfs else self.data)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else git_blob_oid(self.data)


@dataclass
class Commit:
    sha: str
    parent: str | None
    files: dict[str, Blob]
    title: str
    description: str
    date: _dt.datetime


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created: _dt.datetime
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # "main", other branches and "refs/pr/N" -> sha
    tags: dict[str, str] = field(default_factory=dict)
    pull_requests: int = 0

    @property
    def url_path(self) -> str:
        return URL_PREFIXES[self.repo_type] + self.repo_id

    def resolve(self, revision: str) -> Commit | None:
        sha = self.branches.get(revision) or self.tags.get(revision)
        if sha is None and re.fullmatch(r"[0-9a-f]{7,40}", revision):
            matches = [full for full in self.commits if full.startswith(revision)]
            sha = matches[0] if len(matches) == 1 else None
        return self.commits.get(sha) if sha else None


class HubError(Exception):
    """An error answered as a Hub error response (status, X-Error-Code, X-Error-Message)."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HubStandIn:
    """An in-memory Hub: repos with commits and branches, an LFS store, and an httpx2 handler that serves them."""

    def __init__(self, endpoint: str = ENDPOINT):
        self.endpoint = endpoint.rstrip("/")
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path?query, status) for every request served
        self.unknown_requests: list[str] = []  # "METHOD /path?query" of requests to the endpoint no route matched
        self.foreign_requests: list[str] = []  # "METHOD URL" of requests to other hosts (all answered 404)
        self.hosts = {urlsplit(self.endpoint).hostname}  # hosts served; serve() adds 127.0.0.1
        self.errors: list[str] = []  # tracebacks of exceptions raised inside the stand-in
        self._lock = threading.RLock()
        self._counter = itertools.count()

    # ------------------------------------------------------------------ direct access for tests
    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False, exist_ok: bool = True) -> Repo:
        """Create a repo with an initial commit holding ``.gitattributes``, as the real Hub does."""
        if repo_type not in REPO_TYPES:
            raise ValueError(f"unknown repo type {repo_type!r}")
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise ValueError(f"the stand-in wants 'namespace/name' repo ids, got {repo_id!r}")
        with self._lock:
            key = (repo_type, repo_id)
            if key in self.repos:
                if not exist_ok:
                    raise HubError(409, f"You already created this {repo_type} repo: {repo_id}", "RepoExists")
                return self.repos[key]
            repo = self.repos[key] = Repo(repo_type, repo_id, private, _dt.datetime.now(_dt.timezone.utc))
            self._commit(repo, "main", None, {".gitattributes": Blob(GITATTRIBUTES, False)}, "initial commit", "")
            return repo

    def upload(self, repo_id: str, files: dict[str, bytes | str], repo_type: str = "model",
               message: str = "upload") -> str:
        """Seed a repo (created if needed) with files on ``main`` without going through a client; returns the sha."""
        repo = self.create_repo(repo_id, repo_type)
        with self._lock:
            head = repo.commits[repo.branches["main"]]
            snapshot = dict(head.files)
            for path, data in files.items():
                data = data.encode() if isinstance(data, str) else bytes(data)
                snapshot[path] = Blob(data, self._wants_lfs(path, len(data), data[:512]))
            return self._commit(repo, "main", head.sha, snapshot, message, "").sha

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        try:
            return self.repos[(repo_type, repo_id)]
        except KeyError:
            raise KeyError(f"no {repo_type} repo {repo_id!r} in the stand-in; repos: {sorted(self.repos)}") from None

    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        """``{path: content}`` of a repo at a revision."""
        commit = self.repo(repo_id, repo_type).resolve(revision)
        if commit is None:
            raise KeyError(f"no revision {revision!r} in {repo_type} repo {repo_id!r}")
        return {path: blob.data for path, blob in commit.files.items()}

    def read(self, repo_id: str, path: str, repo_type: str = "model", revision: str = "main") -> bytes:
        return self.files(repo_id, repo_type, revision)[path]

    def history(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> list[Commit]:
        """Commits reachable from ``revision``, newest first."""
        repo = self.repo(repo_id, repo_type)
        commit, chain = repo.resolve(revision), []
        while commit is not None:
            chain.append(commit)
            commit = repo.commits.get(commit.parent) if commit.parent else None
        return chain

    # ------------------------------------------------------------------ wiring
    def client_factory(self) -> httpx2.Client:
        """A client like huggingface_hub's default one (same request hook: offline check, request id), on a
        MockTransport."""
        from huggingface_hub.utils._http import hf_request_event_hook

        return httpx2.Client(
            transport=httpx2.MockTransport(self.handle),
            event_hooks={"request": [hf_request_event_hook]},
            follow_redirects=True,
            timeout=None,
        )

    def async_client_factory(self) -> httpx2.AsyncClient:
        from huggingface_hub.utils._http import async_hf_request_event_hook

        return httpx2.AsyncClient(
            transport=httpx2.MockTransport(self.handle),
            event_hooks={"request": [async_hf_request_event_hook]},
            follow_redirects=True,
            timeout=None,
        )

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        """Serve the handler on 127.0.0.1 (random port, a daemon thread); yields ``http://127.0.0.1:PORT``."""
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            break
                        body += self.rfile.read(size)
                        self.rfile.readline()
                    body = bytes(body)
                else:
                    body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = httpx2.Request(
                    self.command,
                    f"http://{self.headers.get('Host', '%s:%d' % self.server.server_address[:2])}{self.path}",
                    headers=[(k, v) for k, v in self.headers.items()
                             if k.lower() not in ("transfer-encoding", "content-length")],
                    content=body,
                )
                response = stand_in.handle(request)
                payload = response.content
                self.send_response(response.status_code)
                for key, value in response.headers.multi_items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", response.headers.get("Content-Length", str(len(payload))))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

            def log_message(self, format, *args):  # noqa: A002 - keep pytest output quiet
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.hosts.add("127.0.0.1")
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, name="hub-stand-in", daemon=True)
        thread.start()
        try:
            yield "http://127.0.0.1:%d" % server.server_address[1]
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

    def subprocess_env(self, endpoint: str, home=None, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a child process talking to :meth:`serve`'s ``endpoint``: online, no Xet, a fake token,
        and, when ``home`` is given, its own HF_HOME / hub / datasets / remote-code module caches there (else those
        of ``base``, ``os.environ`` by default, which the ``hub`` fixture points into the test's tmp_path)."""
        env = dict(os.environ if base is None else base)
        env.update(HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0", HF_HUB_DISABLE_XET="1",
                   HF_TOKEN=TOKEN, HF_HUB_DISABLE_TELEMETRY="1")
        env.pop("TRANSFORMERS_OFFLINE", None)
        if home is not None:
            home = os.fspath(home)
            env.update(HF_HOME=home, HF_HUB_CACHE=os.path.join(home, "hub"),
                       HF_DATASETS_CACHE=os.path.join(home, "datasets"), HF_MODULES_CACHE=os.path.join(home, "modules"))
            env.pop("HUGGINGFACE_HUB_CACHE", None)
        return env

    # ------------------------------------------------------------------ HTTP
    def handle(self, request: httpx2.Request) -> httpx2.Response:
        request.read()
        foreign = request.url.host not in self.hosts
        label = f"{request.method} {request.url if foreign else request.url.raw_path.decode()}"
        try:
            if foreign:  # datasets asks datasets-server.huggingface.co and a legacy S3 bucket; for new repos both 404
                with self._lock:
                    self.foreign_requests.append(label)
                raise HubError(404, f"hub stand-in: {label} is not on the Hub endpoint {self.endpoint}")
            response = self._route(request)
        except HubError as error:
            headers = {"X-Error-Message": error.message}
            if error.code:
                headers["X-Error-Code"] = error.code
            response = httpx2.Response(error.status, headers=headers, json={"error": error.message})
        except Exception as error:  # a stand-in bug: 501 is not retried by huggingface_hub's backoff
            self.errors.append(f"{label}\n{traceback.format_exc()}")
            message = f"hub stand-in crashed on {label}: {type(error).__name__}: {error}"
            response = httpx2.Response(501, headers={"X-Error-Message": message[:1000]}, json={"error": message})
        with self._lock:
            self.requests.append((request.method, label.split(" ", 1)[1], response.status_code))
        return response

    def _route(self, request: httpx2.Request) -> httpx2.Response:
        method = request.method
        raw_path = request.url.raw_path.decode().split("?", 1)[0]
        query = {key: values[-1] for key, values in parse_qs(request.url.query.decode()).items()}
        base = f"{request.url.scheme}://{request.url.netloc.decode()}"
        parts = raw_path.strip("/").split("/")

        if parts[0] == "api":
            if method == "POST" and parts[1:] == ["repos", "create"]:
                return self._api_create(request, base)
            if method in ("DELETE", "POST") and parts[1:] == ["repos", "delete"]:
                return self._api_delete(request)
            if method == "POST" and parts[1:] == ["validate-yaml"]:
                return httpx2.Response(200, json={"errors": [], "warnings": []})
            if method == "GET" and parts[1:] == ["agent-harnesses"]:  # huggingface_hub's user-agent registry
                return httpx2.Response(200, json={"standardEnvVars": [], "harnesses": {}})
            if method == "GET" and parts[1:] == ["whoami-v2"]:
                return httpx2.Response(200, json={"type": "user", "name": USER, "fullname": USER, "orgs": [],
                                                  "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
            if len(parts) >= 4 and parts[1].endswith("s") and parts[1][:-1] in REPO_TYPES:
                repo_type, repo_id, rest = parts[1][:-1], f"{unquote(parts[2])}/{unquote(parts[3])}", parts[4:]
                if not rest and method == "GET":
                    return self._api_info(repo_type, repo_id, "main", query)
                if len(rest) == 2 and rest[0] == "revision" and method == "GET":
                    return self._api_info(repo_type, repo_id, unquote(rest[1]), query)
                if len(rest) == 2 and rest[0] == "preupload" and method == "POST":
                    return self._api_preupload(request, repo_type, repo_id, unquote(rest[1]))
                if len(rest) == 2 and rest[0] == "commit" and method == "POST":
                    return self._api_commit(request, base, repo_type, repo_id, unquote(rest[1]), query)
                if len(rest) >= 2 and rest[0] == "tree" and method == "GET":
                    folder = unquote("/".join(rest[2:])).strip("/")
                    return self._api_tree(repo_type, repo_id, unquote(rest[1]), folder, query)
                if len(rest) == 2 and rest[0] == "paths-info" and method == "POST":
                    return self._api_paths_info(request, repo_type, repo_id, unquote(rest[1]))
                if len(rest) == 2 and rest[0] == "commits" and method == "GET":
                    return self._api_commits(repo_type, repo_id, unquote(rest[1]))
                if rest == ["refs"] and method == "GET":
                    return self._api_refs(repo_type, repo_id, query)
                if len(rest) == 2 and rest[0] in ("branch", "tag") and method in ("POST", "DELETE"):
                    return self._api_ref(request, repo_type, repo_id, rest[0], unquote(rest[1]))
        elif parts[0] == "_stand_in" and parts[1:2] == ["lfs"] and len(parts) == 3 and method == "PUT":
            return self._lfs_put(request, parts[2])
        else:
            repo_type = {"datasets": "dataset", "spaces": "space"}.get(parts[0], "model")
            offset = 0 if repo_type == "model" else 1
            if len(parts) >= offset + 3:
                namespace, name, rest = unquote(parts[offset]), unquote(parts[offset + 1]), parts[offset + 2:]
                if name.endswith(".git") and rest == ["info", "lfs", "objects", "batch"] and method == "POST":
                    return self._lfs_batch(request, base, repo_type, f"{namespace}/{name[:-4]}")
                if rest[0] == "resolve" and len(rest) >= 3 and method in ("GET", "HEAD"):
                    return self._resolve(request, repo_type, f"{namespace}/{name}", unquote(rest[1]),
                                         unquote("/".join(rest[2:])))
        with self._lock:
            self.unknown_requests.append(f"{method} {request.url.raw_path.decode()}")
        raise HubError(404, f"hub stand-in: no endpoint for {method} {request.url.raw_path.decode()}")

    # ------------------------------------------------------------------ helpers
    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository Not Found for {repo_type} repo {repo_id!r} (hub stand-in)", "RepoNotFound")
        return repo

    def _revision(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision} (hub stand-in, {repo.repo_type} repo {repo.repo_id})",
                           "RevisionNotFound")
        return commit

    @staticmethod
    def _wants_lfs(path: str, size: int, sample: bytes) -> bool:
        name = path.rsplit("/", 1)[-1]
        return size >= LFS_THRESHOLD or b"\0" in sample or any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS)

    def _commit(self, repo: Repo, branch: str, parent: str | None, files: dict[str, Blob], title: str,
                description: str) -> Commit:
        seed = f"{repo.repo_type}/{repo.repo_id}/{branch}/{parent}/{title}/{next(self._counter)}".encode()
        digest = hashlib.sha1(seed + b"".join(p.encode() + b.oid.encode() for p, b in sorted(files.items())))
        commit = Commit(digest.hexdigest(), parent, files, title, description, _dt.datetime.now(_dt.timezone.utc))
        repo.commits[commit.sha] = commit
        repo.branches[branch] = commit.sha
        return commit

    def _last_commit(self, repo: Repo, commit: Commit, path: str) -> Commit:
        blob = commit.files.get(path)
        while commit.parent:
            parent = repo.commits[commit.parent]
            same = parent.files.get(path) == blob if blob is not None else any(
                p.startswith(path + "/") for p in parent.files)
            if not same or blob is None:
                break
            commit = parent
        return commit

    def _file_entry(self, repo: Repo, commit: Commit, path: str, expand: bool) -> dict:
        blob = commit.files[path]
        entry = {"type": "file", "oid": blob.oid, "size": len(blob.data), "path": path}
        if blob.lfs:
            entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
        if expand:
            last = self._last_commit(repo, commit, path)
            entry["lastCommit"] = {"id": last.sha, "title": last.title, "date": _iso(last.date)}
            entry["securityFileStatus"] = {"status": "safe"}
        return entry

    def _folder_entry(self, repo: Repo, commit: Commit, path: str, expand: bool) -> dict:
        entry = {"type": "directory", "oid": hashlib.sha1(f"{commit.sha}:{path}".encode()).hexdigest(), "path": path}
        if expand:
            entry["lastCommit"] = {"id": commit.sha, "title": commit.title, "date": _iso(commit.date)}
        return entry

    @staticmethod
    def _folders(commit: Commit) -> set[str]:
        return {"/".join(path.split("/")[:depth]) for path in commit.files for depth in range(1, path.count("/") + 1)}

    @staticmethod
    def _is_true(value) -> bool:
        return str(value).lower() in ("1", "true", "yes")

    @staticmethod
    def _json_or_form(request: httpx2.Request) -> dict:
        content_type = request.headers.get("Content-Type", "")
        if "application/x-www-form-urlencoded" in content_type:
            return {key: values for key, values in parse_qs(request.content.decode()).items()}
        return json.loads(request.content or b"{}")

    # ------------------------------------------------------------------ endpoints
    def _api_create(self, request: httpx2.Request, base: str) -> httpx2.Response:
        payload = json.loads(request.content)
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        private = payload.get("private") or payload.get("visibility") in ("private", "protected")
        url = f"{base}/{URL_PREFIXES[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.repos:  # like the Hub: 409, with the url (create_repo(exist_ok=True) reads it)
            message = f"You already created this {repo_type} repo"
            return httpx2.Response(409, headers={"X-Error-Message": message}, json={"error": message, "url": url})
        self.create_repo(repo_id, repo_type, bool(private))
        return httpx2.Response(200, json={"url": url, "name": repo_id, "id": repo_id})

    def _api_delete(self, request: httpx2.Request) -> httpx2.Response:
        payload = json.loads(request.content)
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        with self._lock:
            self._repo(repo_type, repo_id)
            del self.repos[(repo_type, repo_id)]
        return httpx2.Response(200, json={})

    def _api_info(self, repo_type: str, repo_id: str, revision: str, query: dict) -> httpx2.Response:
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            commit = self._revision(repo, revision)
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling = {"rfilename": path, "size": len(blob.data), "blobId": blob.oid}
            if blob.lfs:
                sibling["lfs"] = {"size": len(blob.data), "sha256": blob.sha256, "pointerSize": len(blob.pointer)}
            siblings.append(sibling)
        info = {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24], "id": repo_id,
            "author": repo_id.split("/")[0], "sha": commit.sha, "lastModified": _iso(commit.date),
            "createdAt": _iso(repo.created), "private": repo.private, "disabled": False, "gated": False,
            "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
            "usedStorage": sum(len(blob.data) for blob in commit.files.values()),
        }
        card = _card_data(commit.files.get("README.md"))
        if card is not None:
            info["cardData"] = card
        if repo_type == "model":
            info["modelId"] = repo_id
            if "config.json" in commit.files:
                with contextlib.suppress(ValueError):
                    config = json.loads(commit.files["config.json"].data)
                    info["config"] = {key: config[key] for key in ("architectures", "model_type") if key in config}
        return httpx2.Response(200, json=info)

    def _api_preupload(self, request: httpx2.Request, repo_type: str, repo_id: str, revision: str) -> httpx2.Response:
        payload = json.loads(request.content)
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            commit = repo.resolve(revision) or repo.commits[repo.branches["main"]]
        answers = []
        for item in payload["files"]:
            sample = base64.b64decode(item.get("sample", ""))
            lfs = self._wants_lfs(item["path"], int(item["size"]), sample)
            remote = commit.files.get(item["path"])
            answer = {"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if remote is not None:
                answer["oid"] = remote.sha256 if remote.lfs else git_blob_oid(remote.data)
            answers.append(answer)
        return httpx2.Response(200, json={"files": answers, "commitOid": commit.sha})

    def _lfs_batch(self, request: httpx2.Request, base: str, repo_type: str, repo_id: str) -> httpx2.Response:
        payload = json.loads(request.content)
        with self._lock:
            self._repo(repo_type, repo_id)
        if payload.get("operation") != "upload":
            raise HubError(400, f"hub stand-in: LFS batch operation {payload.get('operation')!r} not supported")
        objects = []
        for item in payload["objects"]:
            entry = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if item["oid"] not in self.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{base}/_stand_in/lfs/{item['oid']}", "expires_in": 3600}}
            objects.append(entry)
        return httpx2.Response(200, json={"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                               headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, request: httpx2.Request, oid: str) -> httpx2.Response:
        data = request.content
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, f"hub stand-in: LFS upload for {oid} has sha256 {hashlib.sha256(data).hexdigest()}")
        with self._lock:
            self.lfs_objects[oid] = data
        return httpx2.Response(200)

    def _api_commit(self, request: httpx2.Request, base: str, repo_type: str, repo_id: str, revision: str,
                    query: dict) -> httpx2.Response:
        lines = [json.loads(line) for line in request.content.splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            head = self._revision(repo, revision)
            create_pr = self._is_true(query.get("create_pr", "0"))
            parent = header.get("parentCommit")
            if parent and parent != head.sha and not create_pr:
                raise HubError(412, f"A commit has happened since {parent}: head of {revision} is {head.sha}")
            files = dict(repo.commits[parent].files if create_pr and parent in repo.commits else head.files)
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "header":
                    continue
                path = value["path"]
                if key == "file":
                    content = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else value[
                        "content"].encode()
                    files[path] = Blob(content, False)
                elif key == "lfsFile":
                    if value["oid"] not in self.lfs_objects:
                        raise HubError(422, f"hub stand-in: LFS object {value['oid']} for {path} was never uploaded")
                    files[path] = Blob(self.lfs_objects[value["oid"]], True)
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"File not found: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, f"Folder not found: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
                else:
                    raise HubError(400, f"hub stand-in: commit operation {key!r} not supported")
            branch, pr_url = revision, None
            if create_pr:
                repo.pull_requests += 1
                branch = f"refs/pr/{repo.pull_requests}"
                pr_url = f"{base}/{repo.url_path}/discussions/{repo.pull_requests}"
            elif revision not in repo.branches:
                raise HubError(400, f"hub stand-in: can only commit to a branch, not {revision!r}")
            commit = self._commit(repo, branch, head.sha, files, header.get("summary", ""),
                                  header.get("description", ""))
        body = {"commitUrl": f"{base}/{repo.url_path}/commit/{commit.sha}", "commitOid": commit.sha,
                "success": True, "pullRequestUrl": pr_url}
        return httpx2.Response(200, json=body)

    def _api_tree(self, repo_type: str, repo_id: str, revision: str, folder: str, query: dict) -> httpx2.Response:
        recursive, expand = self._is_true(query.get("recursive")), self._is_true(query.get("expand"))
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            commit = self._revision(repo, revision)
        folders = self._folders(commit)
        if folder and folder not in folders:
            raise HubError(404, f"Entry not found: {folder!r} is not a folder at {revision}", "EntryNotFound")
        prefix = folder + "/" if folder else ""

        def wanted(path: str) -> bool:
            return path.startswith(prefix) and (recursive or "/" not in path[len(prefix):])

        entries = [self._folder_entry(repo, commit, p, expand) for p in sorted(folders) if wanted(p)]
        entries += [self._file_entry(repo, commit, p, expand) for p in sorted(commit.files) if wanted(p)]
        return httpx2.Response(200, json=entries)

    def _api_paths_info(self, request: httpx2.Request, repo_type: str, repo_id: str, revision: str) -> httpx2.Response:
        payload = self._json_or_form(request)
        paths = payload.get("paths", [])
        paths = [paths] if isinstance(paths, str) else paths
        expand = self._is_true(payload.get("expand", [False])[-1] if isinstance(payload.get("expand"), list)
                               else payload.get("expand", False))
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            commit = self._revision(repo, revision)
        folders, entries = self._folders(commit), []
        for path in paths:
            path = path.strip("/")
            if path in commit.files:
                entries.append(self._file_entry(repo, commit, path, expand))
            elif path in folders:
                entries.append(self._folder_entry(repo, commit, path, expand))
        return httpx2.Response(200, json=entries)

    def _api_commits(self, repo_type: str, repo_id: str, revision: str) -> httpx2.Response:
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            self._revision(repo, revision)
            chain = self.history(repo_id, repo_type, revision)
        return httpx2.Response(200, json=[
            {"id": c.sha, "title": c.title, "message": c.description, "date": _iso(c.date),
             "authors": [{"user": USER}]} for c in chain])

    def _api_refs(self, repo_type: str, repo_id: str, query: dict) -> httpx2.Response:
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            refs = {
                "branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s}
                             for n, s in repo.branches.items() if not n.startswith("refs/")],
                "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in repo.tags.items()],
                "converts": [],
            }
            if self._is_true(query.get("include_prs")):
                refs["pullRequests"] = [{"name": n, "ref": n, "targetCommit": s}
                                        for n, s in repo.branches.items() if n.startswith("refs/pr/")]
        return httpx2.Response(200, json=refs)

    def _api_ref(self, request: httpx2.Request, repo_type: str, repo_id: str, kind: str,
                 name: str) -> httpx2.Response:
        """POST/DELETE .../branch/{branch} (body: optional startingPoint) and .../tag/{revision} (body: tag)."""
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            if request.method == "DELETE":
                refs = repo.branches if kind == "branch" else repo.tags
                if name not in refs or name == "main" and kind == "branch":
                    raise HubError(404 if name not in refs else 403, f"cannot delete {kind} {name!r}",
                                   "RevisionNotFound" if name not in refs else None)
                del refs[name]
                return httpx2.Response(200, json={})
            payload = json.loads(request.content or b"{}")
            if kind == "branch":
                target, refs, start = name, repo.branches, payload.get("startingPoint") or "main"
            else:
                target, refs, start = payload["tag"], repo.tags, name
            if target in repo.branches or target in repo.tags:
                message = f"Reference {target!r} already exists"
                return httpx2.Response(409, headers={"X-Error-Message": message}, json={"error": message})
            refs[target] = self._revision(repo, start).sha
        return httpx2.Response(200, json={})

    def _resolve(self, request: httpx2.Request, repo_type: str, repo_id: str, revision: str,
                 path: str) -> httpx2.Response:
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            commit = self._revision(repo, revision)
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, f"Entry not found: {path} in {repo_type} repo {repo_id} at {revision}",
                           "EntryNotFound")
        data, size = blob.data, len(blob.data)
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{blob.etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream" if blob.lfs else "text/plain; charset=utf-8",
                   "Content-Disposition": f'inline; filename="{quote(path.rsplit("/", 1)[-1])}"'}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(size)})
        status = 200
        spec = request.headers.get("Range")
        if spec:
            match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", spec)
            if not match or match.groups() == ("", ""):
                raise HubError(416, f"hub stand-in: unsupported Range {spec!r}")
            first, last = match.groups()
            if first == "":
                start, stop = max(size - int(last), 0), size
            else:
                start, stop = int(first), min(int(last) + 1, size) if last else size
            if start >= size and size > 0 or start > stop:
                return httpx2.Response(416, headers={"Content-Range": f"bytes */{size}", **headers})
            data, status = data[start:stop], 206
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        headers["Content-Length"] = str(len(data))
        if request.method == "HEAD":
            return httpx2.Response(status, headers=headers)
        return httpx2.Response(status, headers=headers, content=data)


def _card_data(blob: Blob | None) -> dict | None:
    if blob is None:
        return None
    match = re.match(rb"^---\s*\n(.*?)\n---\s*(\n|$)", blob.data, re.DOTALL)
    if not match:
        return None
    import yaml

    with contextlib.suppress(yaml.YAMLError):
        data = yaml.safe_load(match.group(1))
        return data if isinstance(data, dict) else None
    return None


# ---------------------------------------------------------------------- installing it in a test process
def install(monkeypatch: pytest.MonkeyPatch, tmp_path, endpoint: str = ENDPOINT) -> HubStandIn:
    """Route every huggingface_hub request in this process to a fresh :class:`HubStandIn`, online, with caches
    under ``tmp_path/hf_home``. Everything is patched through ``monkeypatch``; call :func:`uninstall` (the ``hub``
    fixture does) before monkeypatch undoes it, so the stand-in's shared client is closed."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub import hf_api as hf_api_module
    from huggingface_hub.utils import _http

    stand_in = HubStandIn(endpoint)
    home = tmp_path / "hf_home"
    hub_cache, datasets_cache = home / "hub", home / "datasets"
    for folder in (hub_cache, datasets_cache):
        folder.mkdir(parents=True, exist_ok=True)

    # Environment, for code reading it at call time and for child processes.
    for name, value in {"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
                        "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": TOKEN, "HF_HOME": str(home),
                        "HF_HUB_CACHE": str(hub_cache), "HF_DATASETS_CACHE": str(datasets_cache),
                        "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)

    # huggingface_hub reads its constants at import time: patch the copies, and move every path under HF_HOME.
    host = urlsplit(endpoint).hostname
    old_home = constants.HF_HOME.rstrip(os.sep)
    for name in dir(constants):
        value = getattr(constants, name)
        if name.isupper() and isinstance(value, str) and (value == old_home or value.startswith(old_home + os.sep)):
            monkeypatch.setattr(constants, name, str(home) + value[len(old_home):])
    for name, value in {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(constants.HF_URL_HOSTS | {host}),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
    }.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api_module.api, "endpoint", endpoint)  # the module-level HfApi behind model_info & co.
    # transformers caches its own HfApi on first use (e.g. a failed offline from_pretrained in an earlier test):
    # drop it so it is rebuilt with the stand-in's endpoint.
    import transformers.utils.hub as transformers_hub

    monkeypatch.setattr(transformers_hub, "_hf_api", None)

    # datasets keeps its own copies (import it now so that they are patched and restored, not frozen mid-test).
    try:
        import datasets.config as datasets_config
    except ImportError:
        datasets_config = None
    if datasets_config is not None:
        for name, value in {
            "HF_ENDPOINT": endpoint,
            "HUB_DATASETS_URL": endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}",
            "HF_HUB_OFFLINE": False,
            "HF_DATASETS_OFFLINE": False,
            "HF_CACHE_HOME": str(home),
            "HF_DATASETS_CACHE": datasets_cache,
            "DOWNLOADED_DATASETS_PATH": datasets_cache / datasets_config.DOWNLOADED_DATASETS_DIR,
            "EXTRACTED_DATASETS_PATH": datasets_cache / datasets_config.DOWNLOADED_DATASETS_DIR
            / datasets_config.EXTRACTED_DATASETS_DIR,
        }.items():
            if hasattr(datasets_config, name):
                monkeypatch.setattr(datasets_config, name, value)

    # The shared clients: swap the factories and drop the cached client (restored by monkeypatch on undo).
    monkeypatch.setattr(_http, "_GLOBAL_CLIENT", None)
    monkeypatch.setattr(_http, "_GLOBAL_CLIENT_FACTORY", stand_in.client_factory)
    monkeypatch.setattr(_http, "_GLOBAL_ASYNC_CLIENT_FACTORY", stand_in.async_client_factory)
    huggingface_hub.HfFileSystem.clear_instance_cache()  # fsspec caches instances and their directory listings
    return stand_in


def uninstall() -> None:
    """Close the stand-in's shared client and forget cached filesystems (before monkeypatch restores the rest)."""
    import huggingface_hub
    from huggingface_hub.utils import _http

    _http.close_session()
    huggingface_hub.HfFileSystem.clear_instance_cache()


@pytest.fixture
def hub(monkeypatch, tmp_path) -> Iterator[HubStandIn]:
    """A fresh in-memory Hub that every huggingface_hub / transformers / peft / datasets call in the test talks to."""
    stand_in = install(monkeypatch, tmp_path)
    try:
        yield stand_in
    finally:
        uninstall()


__all__ = ["ENDPOINT", "TOKEN", "Blob", "Commit", "HubError", "HubStandIn", "Repo", "hub", "install", "uninstall"]
