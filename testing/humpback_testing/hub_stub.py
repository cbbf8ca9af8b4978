"""A tiny Hugging Face Hub stand-in on loopback: the routes ``huggingface_hub`` uses to create a
repository and push a folder, for tests without network.

    with HubStub(token="hf_test") as hub:          # then HF_ENDPOINT=hub.url
        HfApi(endpoint=hub.url, token="hf_test").upload_folder(...)
        hub.repos["me/model"].files["README.md"]  # the bytes that were pushed

Routes (what huggingface_hub 1.x/2.x sends):

- ``POST /api/repos/create`` ``{"name", "organization"?, "type"?, "private"?|"visibility"?}``: 200 with
  ``{"url"}``, or 409 with ``{"error", "url"}`` when the repository exists (``create_repo(exist_ok=True)``
  accepts that).
- ``GET /api/{models|datasets}/OWNER/NAME[/revision/REV]``: ``{"id", "private", "sha"}``, 404 when missing.
- ``POST /api/validate-yaml`` ``{"content", "repoType"}`` (``upload_folder`` sends each README.md first):
  the metadata parsed by huggingface_hub's own card classes (``ModelCard`` / ``DatasetCard``, with
  ``ignore_metadata_errors=False``: a model-index that does not parse is an error); 400 with
  ``{"errors": [{"message"}]}`` when it fails, a warning when the metadata is empty.
- ``POST /api/{models|datasets}/OWNER/NAME/preupload/REV``: every file ``"uploadMode": "regular"``
  (so the commit carries the contents inline; no LFS, no Xet).
- ``POST /api/{models|datasets}/OWNER/NAME/commit/REV`` (NDJSON: a header, then one line per file
  with base64 content, or ``deletedFile``): applies the commit, answers ``{"commitUrl", "commitOid"}``.

With ``token`` set, a request without ``Authorization: Bearer <token>`` gets 401. ``requests``
records ``(method, path, authorization)`` of every request, ``validated`` the READMEs validated.
Standard library only, except ``huggingface_hub`` for the metadata check (imported when it runs).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_REPO = re.compile(r"^/api/(?P<type>models|datasets|spaces)/(?P<id>[^/]+/[^/]+|[^/]+)"
                   r"(?:/(?P<op>preupload|commit|revision)/(?P<rev>[^/?]+))?/?(?:\?.*)?$")


@dataclass
class StubRepo:
    repo_id: str
    repo_type: str  # model, dataset or space
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict[str, Any]] = field(default_factory=list)  # {"oid", "summary", "files"}

    @property
    def sha(self) -> str:
        return self.commits[-1]["oid"] if self.commits else "0" * 40


class HubStub:
    def __init__(self, token: str | None = None, host: str = "127.0.0.1"):
        self.token = token
        self.repos: dict[str, StubRepo] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.validated: list[tuple[str, str]] = []  # (repo type, README content)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, 0), _handler(self))
        self.url = f"http://{host}:{self._server.server_port}"
        self._thread: threading.Thread | None = None

    def __enter__(self) -> HubStub:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> StubRepo:
        """A repository that exists before the test pushes (e.g. a public one)."""
        repo = self.repos[repo_id] = StubRepo(repo_id, repo_type, private)
        return repo

    def repo_url(self, repo: StubRepo) -> str:
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return f"{self.url}/{prefix}{repo.repo_id}"


def _handler(stub: HubStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _reply(self, status: int, obj: Any) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, **extra: Any) -> None:
            self.send_response(status)
            data = json.dumps({"error": message, **extra}).encode()
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            auth = self.headers.get("Authorization")
            with stub._lock:
                stub.requests.append((self.command, self.path, auth))
            if stub.token is not None and auth != f"Bearer {stub.token}":
                self._error(401, "Invalid credentials in Authorization header")
                return False
            return True

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _repo(self, match: re.Match) -> StubRepo | None:
            repo = stub.repos.get(match["id"])
            return repo if repo is not None and f"{repo.repo_type}s" == match["type"] else None

        def do_GET(self) -> None:  # noqa: N802
            if not self._authorized():
                return
            m = _REPO.match(self.path)
            if not m or m["op"] not in (None, "revision"):
                return self._error(404, f"no route {self.path}")
            repo = self._repo(m)
            if repo is None:
                return self._error(404, "Repository not found")
            self._reply(200, {"id": repo.repo_id, "private": repo.private, "sha": repo.sha,
                              "siblings": [{"rfilename": f} for f in sorted(repo.files)]})

        def do_POST(self) -> None:  # noqa: N802
            if not self._authorized():
                return
            body = self._body()
            if self.path.split("?")[0] == "/api/repos/create":
                req = json.loads(body)
                repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                with stub._lock:
                    if repo_id in stub.repos:  # the Hub's 409 names the existing repository's URL
                        return self._error(409, "You already created this repo", url=stub.repo_url(stub.repos[repo_id]))
                    private = bool(req.get("private")) or req.get("visibility") == "private"
                    repo = stub.add_repo(repo_id, req.get("type") or "model", private)
                return self._reply(200, {"url": stub.repo_url(repo)})
            if self.path.split("?")[0] == "/api/validate-yaml":
                return self._validate_yaml(json.loads(body))
            m = _REPO.match(self.path)
            repo = self._repo(m) if m else None
            if repo is None:
                return self._error(404, "Repository not found")
            if m["op"] == "preupload":
                files = json.loads(body).get("files") or []
                return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                   for f in files]})
            if m["op"] == "commit":
                return self._commit(repo, body)
            self._error(404, f"no route {self.path}")

        def _validate_yaml(self, req: dict) -> None:
            from huggingface_hub import DatasetCard, ModelCard

            repo_type = req.get("repoType") or "model"
            content = req.get("content") or ""
            with stub._lock:
                stub.validated.append((repo_type, content))
            try:
                card = (DatasetCard if repo_type == "dataset" else ModelCard)(content, ignore_metadata_errors=False)
            except Exception as e:  # what the Hub would refuse: YAML that does not parse, a bad model-index
                self.send_response(400)
                data = json.dumps({"errors": [{"message": str(e)}]}).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            warnings = [] if card.data.to_dict() else [{"message": "empty or missing yaml metadata in repo card"}]
            self._reply(200, {"errors": [], "warnings": warnings})

        def _commit(self, repo: StubRepo, body: bytes) -> None:
            summary, changed = "", []
            with stub._lock:
                for line in body.decode("utf-8").splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    value = item.get("value") or {}
                    if item.get("key") == "header":
                        summary = value.get("summary", "")
                    elif item.get("key") == "file":
                        if value.get("encoding") != "base64":
                            return self._error(400, f"unsupported encoding {value.get('encoding')!r}")
                        repo.files[value["path"]] = base64.b64decode(value["content"])
                        changed.append(value["path"])
                    elif item.get("key") == "deletedFile":
                        repo.files.pop(value["path"], None)
                        changed.append(value["path"])
                    else:
                        return self._error(400, f"unsupported commit operation {item.get('key')!r}")
                oid = hashlib.sha1(f"{repo.sha}{summary}{sorted(changed)}".encode()).hexdigest()
                repo.commits.append({"oid": oid, "summary": summary, "files": changed})
            self._reply(200, {"commitUrl": f"{stub.repo_url(repo)}/commit/{oid}", "commitOid": oid,
                              "success": True})

    return Handler
