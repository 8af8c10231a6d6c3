"""A small fake Hugging Face Hub on 127.0.0.1 for tests with no internet.

It answers the routes ``huggingface_hub`` uses to create a repository, commit files
(``preupload`` says every file is a regular git blob, so the commit carries them inline as
base64 NDJSON lines: no LFS or Xet storage) and download a snapshot (``revision`` info and
``resolve`` with the ``X-Repo-Commit``/``ETag`` headers). Repositories live in memory:
``{repo_id: {"private": bool, "commits": [(sha, {path: bytes})]}}``. Every request is
recorded in ``requests`` as ``(method, path)``; an unknown route answers 404 and is recorded
in ``unknown``, so a test sees what a new huggingface_hub release asks for.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.unknown: list[tuple[str, str]] = []
        self.cards: list[str] = []  # README contents sent to validate-yaml
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                hub._serve(self, "GET")

            def do_HEAD(self) -> None:
                hub._serve(self, "HEAD")

            def do_POST(self) -> None:
                hub._serve(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ state

    def add_commit(self, repo_id: str, files: dict[str, bytes | None]) -> str:
        """A commit that replaces/adds ``files`` on main (None deletes one); returns its
        sha."""
        repo = self.repos.setdefault(repo_id, {"private": False, "commits": []})
        current = dict(repo["commits"][-1][1]) if repo["commits"] else {}
        current.update(files)
        current = {k: v for k, v in current.items() if v is not None}  # None: deleted
        sha = hashlib.sha1(json.dumps(sorted(current)).encode()
                           + str(len(repo["commits"])).encode()).hexdigest()
        repo["commits"].append((sha, current))
        return sha

    def _files(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        repo = self.repos.get(repo_id)
        if not repo or not repo["commits"]:
            return None
        if revision in ("main", "HEAD"):
            return repo["commits"][-1]
        for sha, files in repo["commits"]:
            if sha == revision:
                return sha, files
        return None

    # ------------------------------------------------------------------ routes

    def _serve(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests.append((method, path))
        body = b""
        if method == "POST":
            body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        parts = path.strip("/").split("/")
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_card(h, json.loads(body)["content"])
        if method == "POST" and path == "/api/repos/create":
            req = json.loads(body)
            repo_id = f"{req.get('organization') or 'user'}/{req['name']}"
            if "/" in req["name"]:
                repo_id = req["name"]
            if repo_id in self.repos:
                return self._json(h, 409, {"error": "You already created this model repo",
                                           "url": f"{self.url}/{repo_id}"})
            private = bool(req.get("private")) or req.get("visibility") == "private"
            self.repos[repo_id] = {"private": private, "commits": []}
            self.add_commit(repo_id, {".gitattributes": b"*.safetensors filter=lfs\n"})
            return self._json(h, 200, {"url": f"{self.url}/{repo_id}", "name": repo_id})
        if method == "GET" and parts[:2] == ["api", "models"] and len(parts) == 4:
            repo_id = "/".join(parts[2:4])  # repo_info without a revision: main
            found = self._files(repo_id, "main")
            if found is None:
                return self._json(h, 404, {"error": "Repository not found"},
                                  {"X-Error-Code": "RepoNotFound"})
            return self._json(h, 200, {
                "id": repo_id, "modelId": repo_id, "sha": found[0],
                "private": self.repos[repo_id]["private"],
                "siblings": [{"rfilename": name} for name in sorted(found[1])]})
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo_id, action, revision = "/".join(parts[2:4]), parts[4], "/".join(parts[5:])
            if repo_id not in self.repos:
                return self._json(h, 404, {"error": "Repository not found"},
                                  {"X-Error-Code": "RepoNotFound"})
            if method == "POST" and action == "preupload":
                files = json.loads(body)["files"]
                return self._json(h, 200, {"files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                     "oid": None} for f in files]})
            if method == "POST" and action == "commit":
                added = {}
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        value = item["value"]
                        assert value.get("encoding") == "base64", value
                        added[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "deletedFile":
                        added[item["value"]["path"]] = None
                    elif item["key"] not in ("header",):
                        return self._json(h, 400, {"error": f"unsupported {item['key']}"})
                sha = self.add_commit(repo_id, added)
                return self._json(h, 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{sha}",
                                           "commitOid": sha, "pullRequestUrl": None})
            if method == "GET" and action == "tree":
                found = self._files(repo_id, parts[5])
                if found is None:
                    return self._json(h, 404, {"error": "Revision not found"},
                                      {"X-Error-Code": "RevisionNotFound"})
                return self._json(h, 200, [
                    {"type": "file", "path": name, "size": len(data),
                     "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in sorted(found[1].items())])
            if method == "GET" and action == "revision":
                found = self._files(repo_id, revision)
                if found is None:
                    return self._json(h, 404, {"error": "Revision not found"},
                                      {"X-Error-Code": "RevisionNotFound"})
                sha, files = found
                return self._json(h, 200, {
                    "id": repo_id, "modelId": repo_id, "sha": sha,
                    "private": self.repos[repo_id]["private"],
                    "siblings": [{"rfilename": name} for name in sorted(files)]})
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            found = self._files(repo_id, revision)
            if found is None:
                return self._json(h, 404, {"error": "Repository not found"},
                                  {"X-Error-Code": "RepoNotFound"})
            sha, files = found
            if filename not in files:
                return self._json(h, 404, {"error": "Entry not found"},
                                  {"X-Error-Code": "EntryNotFound"})
            data = files[filename]
            h.send_response(200)
            h.send_header("Content-Length", str(len(data)))
            h.send_header("X-Repo-Commit", sha)
            h.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
            h.end_headers()
            if method == "GET":
                h.wfile.write(data)
            return None
        if path != "/api/agent-harnesses":  # best-effort telemetry: its 404 is swallowed
            self.unknown.append((method, path))
        return self._json(h, 404, {"error": f"fake hub: no route {method} {path}"})

    def _validate_card(self, h: BaseHTTPRequestHandler, content: str) -> None:
        """What the Hub checks in a README's front matter: YAML that parses, and a
        ``model-index`` that huggingface_hub itself can read back into eval results."""
        import yaml
        from huggingface_hub.repocard_data import model_index_to_eval_results

        errors = []
        try:
            meta = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else {}
            if not isinstance(meta, dict):
                errors.append("metadata is not a mapping")
            elif "model-index" in meta:
                _, results = model_index_to_eval_results(meta["model-index"])
                if not results:
                    errors.append("model-index has no results")
        except Exception as err:  # any parse failure is a 400, as on the Hub
            errors.append(f"{type(err).__name__}: {err}")
        self.cards.append(content)
        if errors:
            return self._json(h, 400, {"errors": [{"message": e} for e in errors]})
        return self._json(h, 200, {"errors": [], "warnings": []})

    @staticmethod
    def _json(h: BaseHTTPRequestHandler, status: int, payload: dict,
              headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)
