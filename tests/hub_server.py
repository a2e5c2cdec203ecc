"""A small in-memory Hugging Face Hub server, for tests only.

Why it exists: our tests push and load models through the real `huggingface_hub` client over
real HTTP, and there is no network. No Hub server on PyPI works offline: hf-local-hub ships no
server binary and olah is a read-only mirror. So this module implements just the subset of the
Hub HTTP API that `huggingface_hub` (2.x) uses for model repos in `create_repo`, `delete_repo`,
`whoami`, `model_info`, `list_repo_tree`, `get_paths_info`, `create_commit` / `upload_*`
(hence `push_to_hub`) and `hf_hub_download` / `snapshot_download` (hence `from_pretrained`):

    GET      /api/whoami-v2
    POST     /api/repos/create                        409 (with the url) when it already exists
    DELETE   /api/repos/delete
    POST     /api/validate-yaml                       create_commit checks README.md metadata first
    GET      /api/models/{repo_id}[/revision/{rev}]   sha + siblings
    GET      /api/models/{repo_id}/tree/{rev}[/{path}]
    POST     /api/models/{repo_id}/paths-info/{rev}
    POST     /api/models/{repo_id}/preupload/{rev}    every file is "regular" (no LFS, no xet)
    POST     /api/models/{repo_id}/commit/{rev}       NDJSON: header, file, deletedFile, deletedFolder
    GET|HEAD /{repo_id}/resolve/{rev}/{path}

Limits: model repos only, a single branch "main" (a full commit id also works as a revision),
everything public, no pull requests, no pagination. Errors carry the `X-Error-Code` header the
client turns into exceptions: RepoNotFound -> RepositoryNotFoundError, RevisionNotFound ->
RevisionNotFoundError, EntryNotFound -> EntryNotFoundError. Since uploads are never "lfs" and
downloads never carry `X-Xet-Hash`, the client never switches to `hf_xet`.
"""

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Commit:
    oid: str
    title: str
    date: str
    files: dict[str, bytes]  # full snapshot of the repo at this commit: path -> content


class HubError(Exception):
    """An error answer: status, message, and the X-Error-Code the client maps to an exception."""

    def __init__(self, status: int, message: str, error_code: str | None = None, headers=None, body=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = headers or {}  # extra response headers
        self.body = body or {}  # extra JSON fields next to "error"


def git_blob_oid(data: bytes) -> str:
    # The Hub identifies a regular file by its git blob sha1; the client uses it as the ETag.
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _folder_oid(files: dict[str, bytes], folder: str) -> str:
    inside = sorted(
        (path, git_blob_oid(data)) for path, data in files.items() if path.startswith(folder + "/")
    )
    return hashlib.sha1(json.dumps(inside).encode()).hexdigest()


def _file_entry(path: str, data: bytes) -> dict:
    return {"type": "file", "path": path, "size": len(data), "oid": git_blob_oid(data)}


def _folder_entry(files: dict[str, bytes], folder: str) -> dict:
    return {"type": "directory", "path": folder, "oid": _folder_oid(files, folder)}


# Paths are matched before unquoting: the client quotes the revision and tree paths with
# `safe=""`, so a "/" inside them arrives as %2F and never splits a segment.
_REPO = r"(?P<repo_id>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/]+)"
_ROUTES = [
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("DELETE", r"/api/repos/delete", "delete_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", rf"/api/models/{_REPO}(?:/revision/{_REV})?", "model_info"),
    ("GET", rf"/api/models/{_REPO}/tree/{_REV}(?:/(?P<path>.+))?", "tree"),
    ("POST", rf"/api/models/{_REPO}/paths-info/{_REV}", "paths_info"),
    ("POST", rf"/api/models/{_REPO}/preupload/{_REV}", "preupload"),
    ("POST", rf"/api/models/{_REPO}/commit/{_REV}", "commit"),
    ("GET", rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", "resolve"),
    ("HEAD", rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", "resolve"),
]


class LocalHub:
    """In-memory Hub. Binds 127.0.0.1 on a free port at construction, so `url` is known before `start()`."""

    def __init__(self, user: str = "tester", token: str = "hf_local_test_token"):
        self.user = user
        self.token = token
        self.repos: dict[str, list[Commit]] = {}  # repo_id -> commits, oldest first; the last one is "main"
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request served, for assertions
        self.lock = threading.Lock()  # requests are served one at a time: endpoints read and mutate `repos`
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self
        self._thread: threading.Thread | None = None
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    # --- storage -------------------------------------------------------------------------------

    def _commits(self, repo_id: str) -> list[Commit]:
        if repo_id not in self.repos:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return self.repos[repo_id]

    def _resolve(self, repo_id: str, rev: str) -> Commit:
        commits = self._commits(repo_id)
        if rev == "main":
            return commits[-1]
        for commit in commits:
            if commit.oid == rev:
                return commit
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _add_commit(self, repo_id: str, title: str, files: dict[str, bytes]) -> Commit:
        commits = self.repos.setdefault(repo_id, [])
        parent = commits[-1].oid if commits else ""
        listing = sorted((path, git_blob_oid(data)) for path, data in files.items())
        oid = hashlib.sha1(json.dumps([repo_id, len(commits), parent, title, listing]).encode()).hexdigest()
        date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        commit = Commit(oid=oid, title=title, date=date, files=files)
        commits.append(commit)
        return commit

    # --- endpoints: each takes the request handler and the route's path parameters, returns JSON ---

    def whoami(self, request) -> dict:
        request.require_token()
        return {
            "type": "user",
            "name": self.user,
            "fullname": self.user,
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "local-hub", "role": "write"}},
        }

    def create_repo(self, request) -> dict:
        request.require_token()
        body = request.json_body()
        if body.get("type", "model") != "model":
            raise HubError(400, "Only model repos are supported")
        repo_id = f"{body.get('organization') or self.user}/{body['name']}"
        repo_url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            # create_repo(exist_ok=True) swallows the 409 but still reads "url" from the body.
            raise HubError(409, "You already created this model repo", body={"url": repo_url})
        self._add_commit(repo_id, "initial commit", {})
        return {"url": repo_url, "name": repo_id, "id": repo_id}

    def delete_repo(self, request) -> dict:
        request.require_token()
        body = request.json_body()
        repo_id = f"{body.get('organization') or self.user}/{body['name']}"
        self._commits(repo_id)  # raises RepoNotFound, which delete_repo(missing_ok=True) tolerates
        del self.repos[repo_id]
        return {}

    def validate_yaml(self, request) -> dict:
        return {"errors": [], "warnings": []}

    def model_info(self, request, repo_id: str, rev: str | None) -> dict:
        commit = self._resolve(repo_id, rev or "main")
        return {
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "private": False,
            "disabled": False,
            "gated": False,
            "tags": [],
            "siblings": [
                {"rfilename": path, "size": len(data), "blobId": git_blob_oid(data)}
                for path, data in sorted(commit.files.items())
            ],
        }

    def tree(self, request, repo_id: str, rev: str, path: str | None) -> list:
        files = self._resolve(repo_id, rev).files
        recursive = request.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = f"{path.strip('/')}/" if path else ""
        entries: dict[str, dict] = {}
        for file_path, data in sorted(files.items()):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            # A file in a sub-folder shows its folders; without recursion only the first one.
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folder = prefix + "/".join(parts[:depth])
                entries.setdefault(folder, _folder_entry(files, folder))
            if recursive or len(parts) == 1:
                entries[file_path] = _file_entry(file_path, data)
        if path and not entries:
            raise HubError(404, f"{path} does not exist", "EntryNotFound")
        return list(entries.values())

    def paths_info(self, request, repo_id: str, rev: str) -> list:
        files = self._resolve(repo_id, rev).files
        # The client posts a form (paths=a&paths=b&expand=False); missing paths are just left out.
        entries = []
        for path in request.form_body().get("paths", []):
            if path in files:
                entries.append(_file_entry(path, files[path]))
            elif any(file_path.startswith(path + "/") for file_path in files):
                entries.append(_folder_entry(files, path))
        return entries

    def preupload(self, request, repo_id: str, rev: str) -> dict:
        request.require_token()
        files = self._resolve(repo_id, rev).files
        # "regular" makes the client send contents base64-encoded inside the commit, so there is
        # no LFS or xet upload. "oid" of the current file lets the client skip unchanged files.
        return {
            "files": [
                {
                    "path": item["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_oid(files[item["path"]]) if item["path"] in files else None,
                }
                for item in request.json_body()["files"]
            ]
        }

    def commit(self, request, repo_id: str, rev: str) -> dict:
        request.require_token()
        if "create_pr" in request.query:
            raise HubError(400, "Pull requests are not supported by the local hub")
        head = self._resolve(repo_id, rev)
        if head is not self.repos[repo_id][-1]:
            raise HubError(400, f"Can only commit to 'main', not to {rev}")
        files = dict(head.files)
        title = ""
        for line in request.raw_body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                title = value["summary"]
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {path: data for path, data in files.items() if not path.startswith(folder)}
            else:
                raise HubError(400, f"Unsupported commit operation {key!r} (the local hub has no LFS)")
        commit = self._add_commit(repo_id, title, files)
        return {
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{self.url}/{repo_id}/commit/{commit.oid}",
        }

    def resolve(self, request, repo_id: str, rev: str, path: str) -> bytes:
        commit = self._resolve(repo_id, rev)
        # X-Repo-Commit comes with every answer, misses included: the client caches "no such file" per commit.
        headers = {"X-Repo-Commit": commit.oid}
        if path not in commit.files:
            raise HubError(404, f"{path} does not exist at {rev}", "EntryNotFound", headers=headers)
        data = commit.files[path]
        request.response_headers.update(headers, ETag=f'"{git_blob_oid(data)}"')
        return data


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps the client's pooled connections alive; every response sets Content-Length.
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    def log_message(self, format, *args):
        pass  # keep test output clean; `LocalHub.requests` records what was served

    def _dispatch(self) -> None:
        hub: LocalHub = self.server.hub
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.response_headers: dict[str, str] = {}
        # Always read the whole body, even when unused, so the kept-alive connection stays in sync.
        self.raw_body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        hub.requests.append((self.command, url.path))
        try:
            endpoint, params = self._route(url.path)
            with hub.lock:
                result = getattr(hub, endpoint)(self, **params)
        except HubError as error:
            self._send_error(error)
            return
        if isinstance(result, bytes):
            self._send(200, result, "application/octet-stream")
        else:
            self._send(200, json.dumps(result).encode(), "application/json")

    def _route(self, path: str) -> tuple[str, dict]:
        for method, pattern, endpoint in _ROUTES:
            match = re.fullmatch(pattern, path)
            if method == self.command and match:
                return endpoint, {
                    key: unquote(value) if value else value for key, value in match.groupdict().items()
                }
        raise HubError(404, f"The local hub does not implement {self.command} {path}")

    def require_token(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {self.server.hub.token}":
            # This exact message keeps the client from reading the 401 as "repository not found".
            raise HubError(401, "Invalid credentials in Authorization header")

    def json_body(self) -> dict:
        return json.loads(self.raw_body)

    def form_body(self) -> dict[str, list[str]]:
        return parse_qs(self.raw_body.decode())

    def _send_error(self, error: HubError) -> None:
        self.response_headers.update(error.headers)
        self.response_headers["X-Error-Message"] = error.message
        if error.error_code:
            self.response_headers["X-Error-Code"] = error.error_code
        self._send(
            error.status, json.dumps({"error": error.message, **error.body}).encode(), "application/json"
        )

    def _send(self, status: int, payload: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in self.response_headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
