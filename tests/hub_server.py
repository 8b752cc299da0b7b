"""A loopback stand-in for the Hugging Face Hub: the routes huggingface_hub's push and pull use, in memory (model
repos; dataset repos can be created and committed to).

Standard library only. Repos are dicts of path -> bytes plus a commit history; ``refuse_commits`` makes the commit
route answer 403, and requests without a bearer token get 401 on write routes, as the Hub does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    files: dict[str, bytes] = field(default_factory=dict)
    repo_type: str = "model"
    commits: list[tuple[str, str]] = field(default_factory=list)  # (oid, summary)

    @property
    def sha(self) -> str:
        return self.commits[-1][0] if self.commits else "0" * 40


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.refuse_commits = False
        self.unknown_routes: list[str] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, payload: object = None, raw: bytes | None = None, headers=None) -> None:
                data = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if raw is None else "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _authorised(self) -> bool:
                if self.headers.get("Authorization", "").startswith("Bearer "):
                    return True
                self._send(401, {"error": "Invalid username or password."}, headers={"X-Error-Code": "Unauthorized"})
                return False

            def _repo_info(self, repo_id: str) -> None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._send(404, {"error": "Repository not found"}, headers={"X-Error-Code": "RepoNotFound"})
                    return
                siblings = [{"rfilename": path, "size": len(data)} for path, data in sorted(repo.files.items())]
                self._send(200, {"id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False,
                                 "siblings": siblings, "tags": []})  # fmt: skip

            def do_POST(self) -> None:  # noqa: N802
                path = urlparse(self.path).path
                body = self._body()
                if path == "/api/repos/create":
                    if not self._authorised():
                        return
                    request = json.loads(body)
                    repo_id = (
                        f"{request['organization']}/{request['name']}"
                        if request.get("organization")
                        else request["name"]
                    )
                    with hub.lock:
                        hub.repos.setdefault(repo_id, Repo(repo_type=request.get("type") or "model"))
                    self._send(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                elif path == "/api/validate-yaml":
                    self._send(200, {"errors": [], "warnings": []})
                elif m := re.fullmatch(r"/api/(?:models|datasets)/(.+?)/preupload/(.+)", path):
                    files = json.loads(body).get("files", [])
                    self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})  # fmt: skip
                elif m := re.fullmatch(r"/api/(?:models|datasets)/(.+?)/commit/(.+)", path):
                    if not self._authorised():
                        return
                    if hub.refuse_commits:
                        self._send(403, {"error": "You don't have the rights to create a commit in this repository"})
                        return
                    self._commit(unquote(m.group(1)), body)
                else:
                    hub.unknown_routes.append(f"POST {path}")
                    self._send(404, {"error": f"no route POST {path}"})

            def _commit(self, repo_id: str, body: bytes) -> None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._send(404, {"error": "Repository not found"}, headers={"X-Error-Code": "RepoNotFound"})
                    return
                summary, files = "", {}
                for line in body.decode().splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    if item["key"] == "header":
                        summary = item["value"].get("summary", "")
                    elif item["key"] == "file":
                        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] == "deletedFile":
                        files[item["value"]["path"]] = None
                with hub.lock:
                    for file_path, data in files.items():
                        if data is None:
                            repo.files.pop(file_path, None)
                        else:
                            repo.files[file_path] = data
                    oid = hashlib.sha1(f"{repo_id}{len(repo.commits)}{summary}".encode()).hexdigest()
                    repo.commits.append((oid, summary))
                self._send(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid,
                                 "pullRequestUrl": None})  # fmt: skip

            def do_GET(self) -> None:  # noqa: N802
                path = unquote(urlparse(self.path).path)
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path):
                    self._repo_info(m.group(1))
                elif m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/[^/]+/?(.*)", path):
                    self._tree(m.group(1), m.group(2))
                elif path == "/api/agent-harnesses":  # the client's user-agent registry: an empty one
                    self._send(200, {"standardEnvVars": [], "harnesses": {}})
                elif path == "/api/whoami-v2":
                    if self._authorised():
                        self._send(200, {"name": "tester", "type": "user", "auth": {"accessToken": {"role": "write"}}})
                elif m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                    self._resolve(m.group(1), m.group(3))
                else:
                    hub.unknown_routes.append(f"GET {path}")
                    self._send(404, {"error": f"no route GET {path}"})

            do_HEAD = do_GET  # noqa: N815

            def _tree(self, repo_id: str, prefix: str) -> None:
                """The recursive listing snapshot_download asks for: every file, and every folder above one."""
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._send(404, {"error": "Repository not found"}, headers={"X-Error-Code": "RepoNotFound"})
                    return
                entries, folders = [], set()
                for file_path, data in sorted(repo.files.items()):
                    if prefix and not file_path.startswith(prefix.rstrip("/") + "/"):
                        continue
                    parts = file_path.split("/")
                    folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
                    oid = hashlib.sha1(data).hexdigest()
                    entries.append({"type": "file", "path": file_path, "size": len(data), "oid": oid})
                entries += [{"type": "directory", "path": folder, "oid": "0" * 40} for folder in sorted(folders)]
                self._send(200, entries)

            def _resolve(self, repo_id: str, file_path: str) -> None:
                repo = hub.repos.get(repo_id)
                if repo is None or file_path not in repo.files:
                    self._send(404, {"error": "Entry not found"}, headers={"X-Error-Code": "EntryNotFound"})
                    return
                data = repo.files[file_path]
                etag = f'"{hashlib.sha1(data).hexdigest()}"'
                self._send(200, raw=data, headers={"X-Repo-Commit": repo.sha, "ETag": etag})

        return Handler
