"""A stand-in Hugging Face Hub on 127.0.0.1, for the registry's push/pull tests.

What is real: the ``huggingface_hub`` client (HfApi.create_repo / create_commit, snapshot_download
with its cache, HEAD + ranged GET downloads), real HTTP over a loopback socket (uvicorn), and the
token sent in the Authorization header. What is a stand-in: the server, which implements only
the endpoints those calls use, keeps repositories in memory, answers ``uploadMode: regular`` to
every preupload (so files travel inline in the commit; the LFS / Xet transfer paths of the real
Hub are not exercised), and makes commit shas as sha1 of the commit's content.

Why not ``olah``: olah 0.5.4 requires fastapi>=0.141 (the project pins 0.138.2) and serves
repositories read-only, so it cannot take the uploads ``push`` makes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse


@dataclass
class Repo:
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)  # (sha, files), oldest first

    def at(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        if revision == "main":
            return self.commits[-1] if self.commits else None
        return next((c for c in self.commits if c[0] == revision), None)


class HubStandIn:
    """The in-memory server. ``tokens`` seen and ``requests`` counted for assertions."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.corrupt: dict[str, bytes] = {}  # path -> bytes served instead (tamper tests)
        self.app = self._build()

    def _authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.token}"

    def _build(self) -> FastAPI:  # noqa: C901 - one small handler per endpoint
        app = FastAPI()

        @app.middleware("http")
        async def log(request: Request, call_next):
            self.requests.append((request.method, request.url.path))
            return await call_next(request)

        @app.post("/api/repos/create")
        async def create(request: Request):
            if not self._authorized(request):
                return JSONResponse({"error": "Invalid credentials"}, status_code=401)
            body = await request.json()
            repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
            url = f"{str(request.base_url).rstrip('/')}/{repo_id}"
            if repo_id in self.repos:  # the Hub answers 409 with the url; exist_ok reads it
                return JSONResponse({"error": "You already created this model repo", "url": url}, status_code=409)
            self.repos[repo_id] = Repo()
            return {"url": url, "name": repo_id}

        @app.post("/api/validate-yaml")
        async def validate_yaml(request: Request):  # the client checks a README's front matter
            return {"errors": [], "warnings": []}

        @app.post("/api/models/{ns}/{name}/preupload/{revision}")
        async def preupload(ns: str, name: str, revision: str, request: Request):
            files = (await request.json())["files"]
            return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}

        @app.post("/api/models/{ns}/{name}/commit/{revision}")
        async def commit(ns: str, name: str, revision: str, request: Request):
            if not self._authorized(request):
                return JSONResponse({"error": "Invalid credentials"}, status_code=401)
            repo = self.repos[f"{ns}/{name}"]
            files = dict(repo.at("main")[1]) if repo.commits else {}
            for line in (await request.body()).splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "deletedFile":
                    files.pop(item["value"]["path"], None)
                elif item["key"] != "header":
                    return JSONResponse({"error": f"stand-in does not support {item['key']}"}, status_code=400)
            digest = hashlib.sha1(json.dumps(sorted((p, hashlib.sha1(b).hexdigest()) for p, b in files.items())
                                             ).encode() + str(len(repo.commits)).encode()).hexdigest()
            repo.commits.append((digest, files))
            return {"commitUrl": f"{request.base_url}{ns}/{name}/commit/{digest}", "commitOid": digest,
                    "pullRequestUrl": None}

        @app.get("/api/models/{ns}/{name}/revision/{revision}")
        async def info(ns: str, name: str, revision: str):
            found = self._find(ns, name, revision)
            if isinstance(found, Response):
                return found
            sha, files = found
            return {"id": f"{ns}/{name}", "modelId": f"{ns}/{name}", "sha": sha, "private": False,
                    "siblings": [{"rfilename": p} for p in sorted(files)]}

        @app.get("/api/models/{ns}/{name}/tree/{revision}")
        async def tree(ns: str, name: str, revision: str):
            found = self._find(ns, name, revision)
            if isinstance(found, Response):
                return found
            return [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for p, b in sorted(found[1].items())]

        @app.api_route("/{ns}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
        async def resolve(ns: str, name: str, revision: str, path: str, request: Request):
            found = self._find(ns, name, revision)
            if isinstance(found, Response):
                return found
            sha, files = found
            if path not in files:
                return JSONResponse({"error": "Entry not found"}, status_code=404,
                                    headers={"X-Error-Code": "EntryNotFound"})
            data = self.corrupt.get(path, files[path])
            headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha1(files[path]).hexdigest()}"',
                       "Accept-Ranges": "bytes"}
            start = 0
            if request.headers.get("range", "").startswith("bytes="):
                start = int(request.headers["range"][6:].split("-")[0] or 0)
            body = data[start:]
            headers["Content-Length"] = str(len(body))
            if request.method == "HEAD":
                return Response(status_code=200, headers=headers)
            status = 206 if start else 200
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return Response(body, status_code=status, headers=headers, media_type="application/octet-stream")

        return app

    def _find(self, ns: str, name: str, revision: str):
        repo = self.repos.get(f"{ns}/{name}")
        if repo is None:
            return JSONResponse({"error": "Repository not found"}, status_code=404,
                                headers={"X-Error-Code": "RepoNotFound"})
        found = repo.at(revision)
        if found is None:
            return JSONResponse({"error": f"Invalid rev id: {revision}"}, status_code=404,
                                headers={"X-Error-Code": "RevisionNotFound"})
        return found


class ServerThread:
    """Run a FastAPI app with uvicorn on a free loopback port in a daemon thread."""

    def __init__(self, app: FastAPI) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("stand-in hub did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
