"""A stand-in for the Hugging Face Hub's HTTP API, for tests: an in-memory Hub on a loopback port.

Import the fixtures into a test module (or conftest.py)::

    from hubserver import hub, hub_server  # noqa: F401

``hub_server`` (session) runs one :class:`HubServer` in a thread of the test
process. ``hub`` (function) empties it, points this process at it as a user
would (``HF_ENDPOINT``, ``HF_TOKEN``; offline mode, which conftest.py turns on
for model loads, off) and yields it; ``hub.env()`` does the same for a
subprocess.

It speaks exactly what huggingface_hub 2.4.0's ``HfApi`` and ``HfFileSystem``
send for dataset repositories, with the Hub's answers and error headers
(``X-Error-Code``: RepoNotFound, RevisionNotFound, EntryNotFound), so the
client raises the same exceptions as against huggingface.co:

* ``POST /api/repos/create`` (409 if it exists), ``POST /api/datasets/{id}/branch/{branch}``;
* ``GET /api/datasets/{id}[/revision/{rev}]`` (the head commit as ``sha``; ``expand`` honoured);
* ``GET /api/datasets/{id}/tree/{rev}[/{path}]`` (``recursive``, ``expand``; pages of
  ``page_size`` entries joined by a ``Link: <...>; rel="next"`` header, as the Hub's cursor);
* ``POST /api/datasets/{id}/paths-info/{rev}`` (form: ``paths``, ``expand``);
* ``GET``/``HEAD /datasets/{id}/resolve/{rev}/{path}`` (``Range``: 206 or 416; ``X-Repo-Commit``,
  ``ETag``, ``Content-Length``, ``Accept-Ranges``);
* ``POST /api/datasets/{id}/preupload/{rev}``: every file is ``regular`` (so its bytes come base64
  in the commit, and no LFS or Xet upload is ever attempted), with the ``oid`` of a file already
  there, which is how the client skips an unchanged file;
* ``POST /api/validate-yaml`` (the front matter of a README.md the client commits);
* ``POST /api/datasets/{id}/commit/{rev}`` (ndjson: a ``header`` with an optional ``parentCommit``,
  then ``file`` and ``deletedFile``/``deletedFolder`` lines): applied atomically on the branch's
  head, a linear history of commit ids; ``412 Precondition Failed`` when ``parentCommit`` is not
  the head, 404 EntryNotFound when a deleted file is not there, 400 for an ``lfsFile``.

Anything else is answered 404 and recorded in ``unhandled`` (a test asserts it stays empty).
Every repository is private: no token is a 401 the client reads as RepoNotFound, an unknown one
a 401 "Invalid credentials in Authorization header", the read-only ``READ_TOKEN`` writing a 403.
``hold_commits``, ``refuse_commits`` and ``commit_delay`` stage races and a busy Hub deterministically.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import pytest
import yaml

TOKEN = "hf_moekd_stand_in_write_token"
READ_TOKEN = "hf_moekd_stand_in_read_token"
GITATTRIBUTES = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n"  # what the Hub puts in a new repository
PRECONDITION_FAILED = "A commit has happened since. Please refresh and try again."


def blob_oid(data: bytes) -> str:
    """The git blob id of `data` (what the Hub calls a file's oid, and huggingface_hub's `sha.git_hash`)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    date: str
    files: dict  # path -> (bytes, oid of the commit that last changed it)


class HubError(Exception):
    """An error answer: status, message, and the X-Error-Code the client dispatches on."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.body = status, message, code, headers or {}, body


class Repo:
    def __init__(self, repo_id: str):
        self.repo_id = repo_id
        self.commits: dict[str, Commit] = {}
        self.branches: dict[str, str] = {}

    def resolve(self, revision: str) -> Commit:
        oid = self.branches.get(revision) or (revision if revision in self.commits else None)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]


class HubServer:
    """An in-memory Hub. `url` is its endpoint; state is guarded by one lock, so each commit is atomic."""

    def __init__(self, page_size: int = 1000):
        self.page_size = page_size  # tree entries per page (the Hub: 1000, 50 with expand)
        self.lock = threading.Lock()
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of each request
        self.ranges: list[str | None] = []  # the Range header of each file download (GET .../resolve/...)
        self.unhandled: list[str] = []
        self.refused = 0  # commits answered 412
        self.commit_delay = 0.0  # seconds each commit takes before it is applied (the Hub's take a while)
        self._counter = 0
        self._barrier: threading.Barrier | None = None
        self._held = self._refuse = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-stand-in", daemon=True)

    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def reset(self) -> None:
        """Forget every repository, request and staged race."""
        with self.lock:
            self.repos.clear()
            self.requests.clear()
            self.ranges.clear()
            self.unhandled.clear()
            self.refused, self.commit_delay = 0, 0.0
            self._barrier, self._held, self._refuse = None, 0, 0

    def env(self, token: str = TOKEN) -> dict:
        """What a process needs to use this Hub, as a user sets it."""
        return {"HF_ENDPOINT": self.url, "HF_TOKEN": token, "HF_HUB_OFFLINE": "0"}

    # ------------------------------------------------------------- staging races and a busy Hub

    def hold_commits(self, n: int, timeout: float = 20.0) -> None:
        """Hold each of the next `n` commit requests until all `n` have arrived, then apply them one at a time
        (in the order they take the lock): writers that read the same head race for it deterministically."""
        with self.lock:
            self._barrier, self._held = threading.Barrier(n, timeout=timeout), n

    def refuse_commits(self, n: int) -> None:
        """Answer the next `n` commits 412, as the Hub does when another commit lands first."""
        with self.lock:
            self._refuse = n

    # ------------------------------------------------------------- inspection

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self.lock:
            return {path: data for path, (data, _) in self.repos[repo_id].resolve(revision).files.items()}

    def history(self, repo_id: str, branch: str = "main") -> list[Commit]:
        """The branch's commits, newest first."""
        with self.lock:
            repo = self.repos[repo_id]
            commit, out = repo.commits[repo.branches[branch]], []
            while commit is not None:
                out.append(commit)
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return out

    # ------------------------------------------------------------- the Hub's operations (under the lock)

    def _new_commit(self, repo: Repo, parent: Commit | None, title: str, files: dict, changed: dict) -> Commit:
        """A commit on `parent` of `files` with `changed` ({path: bytes}) written."""
        self._counter += 1
        oid = hashlib.sha1(f"{repo.repo_id}\0{parent.oid if parent else ''}\0{title}\0{self._counter}".encode())
        date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        commit = Commit(oid.hexdigest(), parent.oid if parent else None, title, date, dict(files))
        commit.files.update({path: (data, commit.oid) for path, data in changed.items()})
        repo.commits[commit.oid] = commit
        return commit

    def create_repo(self, repo_id: str) -> None:
        if repo_id in self.repos:
            raise HubError(409, "You already created this dataset repo", body={"url": f"{self.url}/datasets/{repo_id}"})
        repo = self.repos[repo_id] = Repo(repo_id)
        first = self._new_commit(repo, None, "initial commit", {}, {".gitattributes": GITATTRIBUTES})
        repo.branches["main"] = first.oid

    def commit(self, repo: Repo, branch: str, header: dict, lines: list[dict]) -> Commit:
        if branch not in repo.branches:
            raise HubError(404 if branch not in repo.commits else 400, f"Invalid rev id: {branch}",
                           "RevisionNotFound" if branch not in repo.commits else None)
        head = repo.commits[repo.branches[branch]]
        parent = header.get("parentCommit")
        if self._refuse > 0 or (parent is not None and not head.oid.startswith(parent)):
            self._refuse = max(self._refuse - 1, 0)
            self.refused += 1
            raise HubError(412, PRECONDITION_FAILED)
        files, changed = dict(head.files), {}
        for line in lines:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"unsupported encoding for {path}")
                changed[path] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if path not in files and path not in changed:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                files.pop(path, None)
                changed.pop(path, None)
            elif key == "deletedFolder":
                inside = [p for p in files if p.startswith(path.rstrip("/") + "/")]
                if not inside:
                    raise HubError(404, "A folder with this name doesn't exist", "EntryNotFound")
                for p in inside:
                    del files[p]
                changed = {p: data for p, data in changed.items() if not p.startswith(path.rstrip("/") + "/")}
            elif key == "lfsFile":
                raise HubError(400, f"{path}: this stand-in takes regular files only (it never asks for LFS)")
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        commit = self._new_commit(repo, head, header.get("summary") or "commit", files, changed)
        repo.branches[branch] = commit.oid
        return commit


def _entries(commit: Commit, paths: list[str], expand: bool, repo: Repo) -> list[dict]:
    """Tree entries (files and folders) in the Hub's JSON shape."""
    out = []
    for path in paths:
        if path in commit.files:
            data, changed = commit.files[path]
            entry = {"type": "file", "oid": blob_oid(data), "size": len(data), "path": path}
        else:
            inside = sorted(p for p in commit.files if p.startswith(path + "/"))
            changed = max((commit.files[p][1] for p in inside), key=lambda oid: _depth(repo, oid))
            entry = {"type": "directory", "oid": hashlib.sha1(f"tree\0{commit.oid}\0{path}".encode()).hexdigest(),
                     "size": 0, "path": path}
        if expand:
            last = repo.commits[changed]
            entry["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
        out.append(entry)
    return out


def _depth(repo: Repo, oid: str) -> int:
    depth, commit = 0, repo.commits[oid]
    while commit.parent:
        depth, commit = depth + 1, repo.commits[commit.parent]
    return depth


def _children(commit: Commit, folder: str, recursive: bool) -> list[str] | None:
    """The paths under `folder` ("": the root): its files and folders, or every one below with `recursive`;
    None if it is not a folder."""
    prefix = folder + "/" if folder else ""
    below = [p[len(prefix):] for p in commit.files if p.startswith(prefix)]
    if folder and not below:
        return None
    found = set()
    for rest in below:
        parts = rest.split("/")
        for depth in range(1, len(parts) + 1 if recursive else 2):
            found.add(prefix + "/".join(parts[:depth]))
    return sorted(found)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every answer has a Content-Length
    disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms delayed-ACK stall
    server_version = "moekd-hub-stand-in"

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    # ------------------------------------------------------------- plumbing

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(size + 2)[:size]
                if not size:
                    return data
                data += chunk
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, value, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(value).encode(), headers)

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        body = self._body() if method == "POST" else b""
        with self.hub.lock:
            self.hub.requests.append((method, split.path))
        try:
            self._route(method, segments, query, body)
        except HubError as e:
            headers = {"X-Error-Message": e.message, **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            body = json.dumps({"error": e.message, **(e.body or {})}).encode()
            self._send(e.status, body, headers, head=method == "HEAD")

    def _authorize(self, write: bool) -> None:
        given = self.headers.get("Authorization", "")
        token = given.removeprefix("Bearer ") if given.startswith("Bearer ") else None
        if token is None:
            raise HubError(401, "Repository not found", "RepoNotFound")
        if token not in (TOKEN, READ_TOKEN):
            raise HubError(401, "Invalid credentials in Authorization header")
        if write and token != TOKEN:
            raise HubError(403, "You don't have the rights to write to this repository")

    def _repo(self, segments: list[str]) -> Repo:
        repo = self.hub.repos.get("/".join(segments[:2]))
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _route(self, method: str, s: list[str], query: dict, body: bytes) -> None:
        if method == "POST" and s == ["api", "repos", "create"]:
            return self._create_repo(body)
        if method == "POST" and s == ["api", "validate-yaml"]:
            return self._validate_yaml(body)
        if len(s) >= 4 and s[:2] == ["api", "datasets"]:
            repo_segments, rest = s[2:4], s[4:]
            if method == "GET" and (not rest or (rest[0] == "revision" and len(rest) == 2)):
                return self._info(repo_segments, rest[1] if rest else "main", query)
            if len(rest) >= 2:
                action, revision, path = rest[0], rest[1], "/".join(rest[2:])
                handler = {("GET", "tree"): self._tree, ("POST", "paths-info"): self._paths_info,
                           ("POST", "preupload"): self._preupload, ("POST", "commit"): self._commit,
                           ("POST", "branch"): self._branch}.get((method, action))
                if handler is not None:
                    return handler(repo_segments, revision, path, query, body)
        if method in ("GET", "HEAD") and len(s) >= 6 and s[0] == "datasets" and s[3] == "resolve":
            return self._resolve(s[1:3], s[4], "/".join(s[5:]), method == "HEAD")
        if s == ["api", "agent-harnesses"]:  # huggingface_hub's best-effort user-agent registry: none here
            raise HubError(404, "no agent-harness registry here")
        with self.hub.lock:
            self.hub.unhandled.append(f"{method} {self.path}")
        raise HubError(404, f"the Hub stand-in does not implement {method} {urlsplit(self.path).path}")

    # ------------------------------------------------------------- endpoints

    def _create_repo(self, body: bytes) -> None:
        self._authorize(write=True)
        payload = json.loads(body)
        if payload.get("type") != "dataset":
            raise HubError(400, "the Hub stand-in holds dataset repositories only")
        repo_id = f"{payload['organization']}/{payload['name']}"
        with self.hub.lock:
            self.hub.create_repo(repo_id)
        self._json({"url": f"{self.hub.url}/datasets/{repo_id}", "name": repo_id})

    def _validate_yaml(self, body: bytes) -> None:
        self._authorize(write=False)
        content = json.loads(body).get("content", "")
        if content.startswith("---\n"):
            try:
                yaml.safe_load(content[4:].split("\n---", 1)[0])
            except yaml.YAMLError as e:
                return self._json({"errors": [{"message": str(e)}], "warnings": []}, status=400)
        self._json({"errors": [], "warnings": []})

    def _info(self, repo_segments: list[str], revision: str, query: dict) -> None:
        self._authorize(write=False)
        with self.hub.lock:
            repo = self._repo(repo_segments)
            commit = repo.resolve(revision)
        info = {"_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0], "sha": commit.oid, "private": True, "disabled": False,
                "gated": False, "lastModified": commit.date, "tags": [], "downloads": 0, "likes": 0,
                "siblings": [{"rfilename": p} for p in sorted(commit.files)]}
        if "expand" in query:
            wanted = set(parse_qs(urlsplit(self.path).query)["expand"])
            info = {k: v for k, v in info.items() if k in wanted or k in ("_id", "id")}
        self._json(info)

    def _tree(self, repo_segments, revision, path, query, body) -> None:
        self._authorize(write=False)
        recursive, expand = query.get("recursive") == "true", query.get("expand") == "true"
        with self.hub.lock:
            repo = self._repo(repo_segments)
            commit = repo.resolve(revision)
            paths = _children(commit, path.strip("/"), recursive)
            if paths is None:
                raise HubError(404, f"{path} does not exist on \"{revision}\"", "EntryNotFound")
            start = int(query.get("cursor", 0))
            size = min(self.hub.page_size, 50) if expand else self.hub.page_size
            page = _entries(commit, paths[start:start + size], expand, repo)
        headers = {}
        if start + size < len(paths):
            base = f"{self.hub.url}{urlsplit(self.path).path}"
            params = urlencode({"recursive": str(recursive).lower(), "expand": str(expand).lower(),
                                "cursor": start + size})
            headers["Link"] = f'<{base}?{params}>; rel="next"'
        self._json(page, headers=headers)

    def _paths_info(self, repo_segments, revision, path, query, body) -> None:
        self._authorize(write=False)
        form = parse_qs(body.decode())
        expand = form.get("expand", ["false"])[-1].lower() == "true"
        with self.hub.lock:
            repo = self._repo(repo_segments)
            commit = repo.resolve(revision)
            found = []
            for wanted in dict.fromkeys(p.strip("/") for p in form.get("paths", [])):
                if wanted in commit.files or (wanted and _children(commit, wanted, False) is not None):
                    found.append(wanted)
            self._json(_entries(commit, found, expand, repo))

    def _preupload(self, repo_segments, revision, path, query, body) -> None:
        self._authorize(write=True)
        with self.hub.lock:
            repo = self._repo(repo_segments)
            commit = repo.resolve(revision)
            files = []
            for file in json.loads(body)["files"]:
                answer = {"path": file["path"], "uploadMode": "regular", "shouldIgnore": False}
                if file["path"] in commit.files:
                    answer["oid"] = blob_oid(commit.files[file["path"]][0])
                files.append(answer)
        self._json({"files": files, "commitOid": commit.oid})

    def _commit(self, repo_segments, revision, path, query, body) -> None:
        self._authorize(write=True)
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "a commit starts with its header")
        with self.hub.lock:  # one of the held commits, or a commit after them
            barrier = self.hub._barrier
            if barrier is not None:
                self.hub._held -= 1
                if self.hub._held == 0:
                    self.hub._barrier = None
        if barrier is not None:
            try:
                barrier.wait()
            except threading.BrokenBarrierError:  # fewer came than were held for: go on, the test will say
                pass
        time.sleep(self.hub.commit_delay)
        with self.hub.lock:
            repo = self._repo(repo_segments)
            commit = self.hub.commit(repo, revision, lines[0]["value"], lines[1:])
        self._json({"success": True, "commitOid": commit.oid, "hookOutput": "",
                    "commitUrl": f"{self.hub.url}/datasets/{repo.repo_id}/commit/{commit.oid}"})

    def _branch(self, repo_segments, branch, path, query, body) -> None:
        self._authorize(write=True)
        start = json.loads(body or b"{}").get("startingPoint", "main")
        with self.hub.lock:
            repo = self._repo(repo_segments)
            if branch in repo.branches:
                raise HubError(409, f"Reference {branch} already exists")
            repo.branches[branch] = repo.resolve(start).oid
        self._json({})

    def _resolve(self, repo_segments, revision, path, head: bool) -> None:
        self._authorize(write=False)
        with self.hub.lock:
            repo = self._repo(repo_segments)
            commit = repo.resolve(revision)
            if path not in commit.files:
                raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
            data = commit.files[path][0]
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
                   "X-Repo-Commit": commit.oid, "ETag": f'"{blob_oid(data)}"'}
        wanted = self.headers.get("Range")
        if not head:
            with self.hub.lock:
                self.hub.ranges.append(wanted)
        if wanted is None or head:
            return self._send(200, data, headers, head=head)
        first, _, last = wanted.strip().removeprefix("bytes=").partition("-")
        if first == "":  # the last `last` bytes
            first, last = max(len(data) - int(last), 0), len(data) - 1
        first, last = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
        if first >= len(data) or first > last:
            raise HubError(416, "Requested Range Not Satisfiable", None, {"Content-Range": f"bytes */{len(data)}"})
        self._send(206, data[first:last + 1], headers | {"Content-Range": f"bytes {first}-{last}/{len(data)}"})


def resolve_url(server: HubServer, repo_id: str, path: str, revision: str = "main") -> str:
    return f"{server.url}/datasets/{repo_id}/resolve/{quote(revision, safe='')}/{quote(path)}"


@pytest.fixture(scope="session")
def hub_server() -> HubServer:
    """The Hub stand-in for the whole session, stopped at its end."""
    server = HubServer(page_size=4).start()  # small pages: listings of a tiny cache follow the Hub's pagination
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hub(hub_server: HubServer, monkeypatch) -> HubServer:
    """The Hub stand-in, emptied, reached by this process as a user reaches the Hub: HF_ENDPOINT and HF_TOKEN in
    the environment, offline mode off. huggingface_hub read HF_ENDPOINT and HF_HUB_OFFLINE when it was imported,
    so its constants follow too (moekd reads HF_ENDPOINT at call time; anything else that calls the Hub lands
    here, never on huggingface.co)."""
    from huggingface_hub import constants

    hub_server.reset()
    for key, value in hub_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub_server.url)
    template = hub_server.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    yield hub_server
    assert hub_server.unhandled == [], f"requests the stand-in does not implement: {hub_server.unhandled}"
