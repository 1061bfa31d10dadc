"""A local HTTP server speaking the few Hugging Face Hub endpoints that `upload_folder` uses.

Repository creation, the model-card YAML check, the preupload check (every file answered as a regular,
inline upload) and the commit (NDJSON with base64 file contents). Requests need `Authorization: Bearer
<token>`; others get 401.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import huggingface_hub.constants as hub_constants
import pytest


class FakeHub:
    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, dict[str, Any]] = {}  # repo_id -> {"private": bool, "files": {path: bytes}, "commits": [...]}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_GET(self) -> None:  # noqa: N802
                self._reply(404, {"error": f"fake hub: no endpoint {self.path}"})

            def do_POST(self) -> None:  # noqa: N802
                body = self._body()
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.send_header("X-Error-Message", "Invalid credentials in Authorization header")
                    self.end_headers()
                    return
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:3] == ["api", "repos", "create"]:
                    req = json.loads(body)
                    repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    private = req["private"] if "private" in req else req.get("visibility") == "private"  # old/new clients
                    hub.repos.setdefault(repo_id, {"private": private, "files": {}, "commits": []})
                    return self._reply(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})
                if parts[:2] == ["api", "validate-yaml"]:
                    return self._reply(200, {"errors": [], "warnings": []})
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False, "oid": None} for f in files]})
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "commit":
                    repo_id = f"{parts[2]}/{parts[3]}"
                    repo = hub.repos[repo_id]
                    summary = None
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "header":
                            summary = item["value"]["summary"]
                        elif item["key"] == "file":
                            repo["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    oid = hashlib.sha1(body).hexdigest()
                    repo["commits"].append(summary)
                    return self._reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                                             "success": True})
                self._reply(404, {"error": f"fake hub: no endpoint {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def use_hub(monkeypatch: pytest.MonkeyPatch, hub: FakeHub, token: str, offline: bool = False) -> None:
    """What HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE give a CLI run, in this process: huggingface_hub reads the
    endpoint and offline mode when it is imported, the token (an empty one counts as unset) at each request.
    (test_secrets pushes through the CLI with these variables.)"""
    monkeypatch.setattr(hub_constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_TOKEN", token)
