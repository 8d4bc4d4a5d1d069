"""A local HTTP stand-in for the Hub endpoints that ``create_repo`` + ``upload_folder`` call.

Just enough of the protocol for the real ``huggingface_hub`` client (HF_ENDPOINT pointed here,
Xet disabled so that weights go through the LFS protocol):

- ``POST /api/repos/create``                          create (409 when it exists)
- ``POST /api/models/{repo}/branch/{branch}``          create a branch (409 when it exists)
- ``POST /api/validate-yaml``                          README front matter check
- ``POST /api/models/{repo}/preupload/{rev}``           upload mode per file + remote oid
- ``POST /{repo}.git/info/lfs/objects/batch``           LFS batch: upload actions for new objects
- ``PUT  /_lfs/{oid}``                                  LFS object upload (sha256 checked)
- ``POST /api/models/{repo}/commit/{rev}``              ndjson commit of regular + LFS files
- ``GET  /api/models/{repo}/revision/{rev}``            repo info (for a no-op commit)

Every request's method, path and Authorization header is logged; requests without the
expected bearer token get 401 (except the LFS storage URL and the client's public
``GET /api/agent-harnesses`` registry fetch). Failures can be injected: ``fail_put_oids``,
``fail_commits``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})
    commits: list[dict] = field(default_factory=list)


class HubStandIn:
    """Run with ``with HubStandIn(token) as hub: ... hub.url ...``."""

    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.log: list[tuple[str, str]] = []  # (method, path)
        self.auth_headers: list[str | None] = []
        self.fail_put_oids: set[str] = set()  # answer 403 to these LFS uploads (once each)
        self.fail_commits = 0  # answer 403 to this many commits
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> HubStandIn:
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def calls(self, method: str, contains: str = "") -> list[str]:
        return [p for m, p in self.log if m == method and contains in p]

    # --- protocol ---------------------------------------------------------------------------
    def handle(self, method: str, path: str, body: bytes) -> tuple[int, object]:
        parts = path.strip("/").split("/")
        if method == "POST" and path == "/api/repos/create":
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}"
            url = f"{self.url}/{repo_id}"
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": url}
            self.repos[repo_id] = Repo(private=req.get("visibility") == "private")
            return 200, {"url": url}
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {}
        if method == "PUT" and parts[0] == "_lfs":
            oid = parts[1]
            if oid in self.fail_put_oids:
                self.fail_put_oids.discard(oid)
                return 403, {"error": "upload URL expired"}
            if hashlib.sha256(body).hexdigest() != oid:
                return 400, {"error": "sha256 mismatch"}
            self.lfs[oid] = body
            return 200, {}
        if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            objects = []
            for obj in json.loads(body)["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in self.lfs:
                    entry["actions"] = {"upload": {"href": f"{self.url}/_lfs/{obj['oid']}"}}
                objects.append(entry)
            return 200, {"transfer": "basic", "objects": objects}
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo_id, verb, rev = "/".join(parts[2:4]), parts[4], unquote("/".join(parts[5:]))
            repo = self.repos.get(repo_id)
            if repo is None:
                return 404, {"error": "Repository not found"}
            if method == "POST" and verb == "branch":
                if rev in repo.branches:
                    return 409, {"error": "Reference already exists"}
                repo.branches[rev] = dict(repo.branches["main"])
                repo.heads[rev] = repo.heads["main"]
                return 200, {}
            if rev not in repo.branches:
                return 404, {"error": f"Revision not found: {rev}"}
            files = repo.branches[rev]
            if method == "POST" and verb == "preupload":
                out = []
                for f in json.loads(body)["files"]:
                    lfs = f["path"].endswith(".safetensors")
                    have = files.get(f["path"])
                    oid = None
                    if have is not None:
                        oid = hashlib.sha256(have).hexdigest() if lfs else _git_sha1(have)
                    mode = "lfs" if lfs else "regular"
                    out.append(
                        {"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid}
                    )
                return 200, {"files": out}
            if method == "POST" and verb == "commit":
                if self.fail_commits:
                    self.fail_commits -= 1
                    return 403, {"error": "You don't have the rights to commit here"}
                return self._commit(repo_id, repo, rev, body)
            if method == "GET" and verb == "revision":
                siblings = [{"rfilename": name} for name in files]
                return 200, {"id": repo_id, "sha": repo.heads[rev], "siblings": siblings}
        return 404, {"error": f"stand-in has no {method} {path}"}

    def _commit(self, repo_id: str, repo: Repo, rev: str, body: bytes) -> tuple[int, object]:
        new = dict(repo.branches[rev])
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]["value"]
        for item in lines[1:]:
            value = item["value"]
            if item["key"] == "file":
                new[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    return 422, {"error": f"LFS object {value['oid']} was never uploaded"}
                new[value["path"]] = self.lfs[value["oid"]]
            else:
                return 400, {"error": f"stand-in does not support {item['key']}"}
        oid = hashlib.sha1(json.dumps(sorted(new)).encode() + repr(len(repo.commits)).encode())
        repo.branches[rev], repo.heads[rev] = new, oid.hexdigest()
        repo.commits.append({"branch": rev, "summary": header["summary"], "files": sorted(new)})
        url = f"{self.url}/{repo_id}/commit/{repo.heads[rev]}"
        return 200, {"commitUrl": url, "commitOid": repo.heads[rev], "pullRequestUrl": None}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if size == 0:
                            return data
                        data += chunk
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _serve(self) -> None:
                body = self._body()
                path = urlparse(self.path).path
                auth = self.headers.get("Authorization")
                with hub.lock:
                    hub.log.append((self.command, path))
                    hub.auth_headers.append(auth)
                    if path == "/api/agent-harnesses":  # the client's public registry fetch
                        status, payload = 200, {"standardEnvVars": [], "harnesses": {}}
                    # LFS uploads go to storage URLs that carry no token, as on the real Hub
                    elif not path.startswith("/_lfs/") and auth != f"Bearer {hub.token}":
                        status, payload = 401, {"error": "Invalid credentials"}
                    else:
                        status, payload = hub.handle(self.command, path, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status >= 400:
                    self.send_header("X-Error-Message", payload.get("error", ""))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _serve

        return Handler


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
