"""A local HTTP server speaking the parts of the Hugging Face hub protocol huggingface-hub uses.

Repo info (`/api/models/{repo}/revision/{rev}`), the file tree (`/api/models/{repo}/tree/{rev}`), and
`/{repo}/resolve/{rev}/{path}` with X-Repo-Commit, ETag / X-Linked-Etag / X-Linked-Size headers and
byte ranges. Faults for tests: cut a transfer after N bytes, serve corrupt bytes, require a token.
Every request is logged. It binds 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".model")


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    token: str | None = None  # required bearer token, if any

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)

    def entry(self, path: str) -> dict:
        data = self.files[path]
        git_oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        item = {"type": "file", "oid": git_oid, "size": len(data), "path": path}
        if self.is_lfs(path):
            item["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return item


@dataclass
class Hub:
    repos: dict[str, Repo] = field(default_factory=dict)
    cut_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before the first GET is cut
    corrupt: set[str] = field(default_factory=set)  # paths served with one byte flipped
    log: list[tuple[str, str, dict]] = field(default_factory=list)

    def add_folder(self, repo_id: str, folder: Path, **kw) -> Repo:
        files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        files["README.md"] = b"# a test model\n"  # present on the hub, not needed by conversion
        self.repos[repo_id] = repo = Repo(files, **kw)
        return repo


class _Handler(BaseHTTPRequestHandler):
    hub: Hub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def do_GET(self) -> None:
        self._handle(head=False)

    def _json(self, status: int, body, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, head: bool) -> None:
        hub = self.hub
        path = self.path.split("?", 1)[0]
        hub.log.append((self.command, self.path, dict(self.headers)))
        m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+)|/tree/([^/]+))?/?$", path)
        if m:
            repo = self._repo(m.group(1))
            if repo is None:
                return
            if m.group(3) is not None:
                return self._json(200, [repo.entry(p) for p in sorted(repo.files)])
            siblings = [{"rfilename": p} for p in sorted(repo.files)]
            return self._json(200, {"_id": m.group(1), "id": m.group(1), "modelId": m.group(1), "sha": repo.commit,
                                    "private": repo.token is not None, "siblings": siblings, "tags": []})  # fmt: skip
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m:
            repo = self._repo(m.group(1))
            if repo is None:
                return
            name = m.group(3)
            if name not in repo.files:
                return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
            return self._file(repo, name, head)
        self._json(404, {"error": "not found"})

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return None
        if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
            self._json(401, {"error": "Invalid credentials"}, {"X-Error-Code": "RepoNotFound"})
            return None
        return repo

    def _file(self, repo: Repo, name: str, head: bool) -> None:
        data = repo.files[name]
        entry = repo.entry(name)
        etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
        if name in self.hub.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = 0
        rng = self.headers.get("Range")
        if rng and (rm := re.match(r"bytes=(\d+)-", rng)):
            start = int(rm.group(1))
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("ETag", f'"{etag}"')
        if "lfs" in entry:
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if head:
            return
        cut = self.hub.cut_after.pop(name, None) if not start else None
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # cut the transfer mid-file
            return
        self.wfile.write(body)


class HubServer:
    def __init__(self, hub: Hub):
        handler = type("Handler", (_Handler,), {"hub": hub})
        self.hub = hub
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
