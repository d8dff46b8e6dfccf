"""A small Hugging Face Hub-compatible HTTP server: repos on disk with real revisions, branches and tags.

It speaks the part of the Hub API that `huggingface_hub` uses to create repos, upload (regular files inline,
large/binary files through the LFS batch API), tag, branch, list and download, so that loraforge's publish
stage and tests push and pull for real without network access. Set `HF_HUB_DISABLE_XET=1` on the client.

    python infra/hub/server.py --root .hub --port 8765 [--token SECRET]
    HF_ENDPOINT=http://127.0.0.1:8765 HF_HUB_DISABLE_XET=1 HF_TOKEN=SECRET loraforge run ...

Storage: `blobs/<sha256>` holds file contents (deduplicated); `repos/<type>s/<owner>/<name>/` holds
`repo.json` (visibility and refs) and `commits/<id>.json` (message, parent, and the full tree: path -> blob,
size, git oid, lfs flag). A commit id is the sha1 of its canonical JSON. Every write is a temp file + rename.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import uvicorn
import yaml
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response

LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files above 10 MB (and binary files) in LFS
USER = "loraforge"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as `oid` of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


class Storage:
    """Repos, commits and blobs on disk. One lock serializes writes (a test server, not a cluster)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.Lock()
        (root / "blobs").mkdir(parents=True, exist_ok=True)

    def repo_dir(self, kind: str, repo_id: str) -> Path:
        return self.root / "repos" / f"{kind}s" / repo_id

    def load(self, kind: str, repo_id: str) -> dict[str, Any]:
        path = self.repo_dir(kind, repo_id) / "repo.json"
        if not path.is_file():
            raise HTTPException(
                404, detail=f"Repository not found: {kind} {repo_id}", headers={"X-Error-Code": "RepoNotFound"}
            )
        return json.loads(path.read_text())

    def save(self, kind: str, repo_id: str, repo: dict[str, Any]) -> None:
        _write_atomic(self.repo_dir(kind, repo_id) / "repo.json", json.dumps(repo, indent=1).encode())

    def commit(self, kind: str, repo_id: str, commit_id: str) -> dict[str, Any]:
        path = self.repo_dir(kind, repo_id) / "commits" / f"{commit_id}.json"
        if not path.is_file():
            raise HTTPException(
                404, detail=f"Revision not found: {commit_id}", headers={"X-Error-Code": "RevisionNotFound"}
            )
        return json.loads(path.read_text())

    def resolve(self, kind: str, repo_id: str, revision: str) -> dict[str, Any]:
        """A branch, a tag or a full commit id -> the commit."""
        repo = self.load(kind, repo_id)
        commit_id = repo["branches"].get(revision) or repo["tags"].get(revision) or revision
        return self.commit(kind, repo_id, commit_id)

    def add_commit(self, kind: str, repo_id: str, parent: str | None, message: str, tree: dict[str, Any]) -> str:
        body = {"parent": parent, "message": message, "tree": tree, "date": _now()}
        commit_id = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()
        _write_atomic(self.repo_dir(kind, repo_id) / "commits" / f"{commit_id}.json", json.dumps(body).encode())
        return commit_id

    def put_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        target = self.blob(sha)
        if not target.is_file():
            _write_atomic(target, data)
        return sha

    def blob(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256


def create_app(root: Path, token: str | None = None) -> FastAPI:
    """The ASGI app serving the repos under `root`; writes (and private reads) need `token` when given."""
    store = Storage(root)
    app = FastAPI(title="loraforge hub")

    def authorized(request: Request) -> bool:
        return token is None or request.headers.get("authorization", "") == f"Bearer {token}"

    def require_write(request: Request) -> None:
        if not authorized(request):
            raise HTTPException(401, detail="Invalid credentials in Authorization header")

    def readable(request: Request, kind: str, repo_id: str) -> dict[str, Any]:
        repo = store.load(kind, repo_id)
        if repo["private"] and not authorized(request):
            # The Hub answers 404 for private repos to strangers; so do we (with the Hub's error code).
            raise HTTPException(
                404, detail=f"Repository not found: {repo_id}", headers={"X-Error-Code": "RepoNotFound"}
            )
        return repo

    @app.exception_handler(HTTPException)
    async def _error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.get("/api/whoami-v2")
    def whoami(request: Request) -> dict[str, Any]:
        if token is None or not authorized(request):
            raise HTTPException(401, detail="Invalid credentials in Authorization header")
        access = {"type": "access_token", "accessToken": {"displayName": "loraforge", "role": "write"}}
        return {"type": "user", "name": USER, "fullname": USER, "orgs": [], "auth": access}

    @app.post("/api/validate-yaml")
    async def validate_yaml(request: Request) -> JSONResponse:
        """Check a README's YAML front matter: it must parse into a mapping (the Hub checks more)."""
        content = (await request.json()).get("content", "")
        errors = []
        if content.startswith("---"):
            front = content.split("---", 2)[1] if content.count("---") >= 2 else ""
            try:
                meta = yaml.safe_load(front)
                if meta is not None and not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
            except yaml.YAMLError as exc:
                errors.append({"message": f"invalid YAML metadata: {exc}"})
        return JSONResponse({"errors": errors, "warnings": []}, status_code=400 if errors else 200)

    @app.post("/api/repos/create")
    async def create_repo(request: Request) -> JSONResponse:
        require_write(request)
        body = await request.json()
        kind = body.get("type") or "model"
        repo_id = f"{body.get('organization') or USER}/{body['name']}"
        url = f"{str(request.base_url).rstrip('/')}/{'' if kind == 'model' else kind + 's/'}{repo_id}"
        with store.lock:
            if (store.repo_dir(kind, repo_id) / "repo.json").is_file():
                return JSONResponse({"error": "You already created this model repo", "url": url}, status_code=409)
            initial = store.add_commit(kind, repo_id, None, "initial commit", {})
            private = body.get("visibility") == "private" or bool(body.get("private"))
            store.save(kind, repo_id, {"private": private, "branches": {"main": initial}, "tags": {}})
        return JSONResponse({"url": url, "name": repo_id, "id": repo_id})

    @app.api_route("/api/repos/delete", methods=["DELETE"])
    async def delete_repo(request: Request) -> dict[str, Any]:
        require_write(request)
        body = await request.json()
        kind = body.get("type") or "model"
        repo_id = f"{body.get('organization') or USER}/{body['name']}"
        store.load(kind, repo_id)
        import shutil

        shutil.rmtree(store.repo_dir(kind, repo_id))
        return {}

    def info(request: Request, kind: str, repo_id: str, revision: str) -> dict[str, Any]:
        repo = readable(request, kind, repo_id)
        commit_id = repo["branches"].get(revision) or repo["tags"].get(revision) or revision
        commit = store.commit(kind, repo_id, commit_id)
        return {"id": repo_id, "modelId": repo_id, "sha": commit_id, "private": repo["private"], "disabled": False,
                "gated": False, "author": repo_id.split("/")[0], "lastModified": commit["date"], "tags": [],
                "siblings": [{"rfilename": p} for p in sorted(commit["tree"])], "downloads": 0, "likes": 0}  # fmt: skip

    @app.get("/api/{kind}s/{owner}/{name}")
    def repo_info(request: Request, kind: str, owner: str, name: str) -> dict[str, Any]:
        return info(request, kind, f"{owner}/{name}", "main")

    @app.get("/api/{kind}s/{owner}/{name}/revision/{revision:path}")
    def repo_info_at(request: Request, kind: str, owner: str, name: str, revision: str) -> dict[str, Any]:
        return info(request, kind, f"{owner}/{name}", revision)

    @app.post("/api/{kind}s/{owner}/{name}/preupload/{revision:path}")
    async def preupload(request: Request, kind: str, owner: str, name: str, revision: str) -> dict[str, Any]:
        require_write(request)
        repo_id = f"{owner}/{name}"
        tree = store.resolve(kind, repo_id, revision)["tree"]
        files = []
        for item in (await request.json())["files"]:
            sample = base64.b64decode(item["sample"])
            lfs = item["size"] >= LFS_THRESHOLD or b"\0" in sample
            existing = tree.get(item["path"])
            oid = None if existing is None else (existing["sha256"] if existing["lfs"] else existing["git_oid"])
            files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})  # fmt: skip
        return {"files": files, "commitOid": store.load(kind, repo_id)["branches"].get(revision)}

    async def lfs_batch(request: Request, kind: str, repo_id: str) -> dict[str, Any]:
        require_write(request)
        store.load(kind, repo_id)
        base = str(request.base_url).rstrip("/")
        objects = []
        for obj in (await request.json())["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not store.blob(obj["oid"]).is_file():
                entry["actions"] = {"upload": {"href": f"{base}/lfs-upload/{obj['oid']}", "header": {}},
                                    "verify": {"href": f"{base}/lfs-verify", "header": {}}}  # fmt: skip
            objects.append(entry)
        return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    @app.post("/{owner}/{name}.git/info/lfs/objects/batch")
    async def lfs_batch_model(request: Request, owner: str, name: str) -> dict[str, Any]:
        return await lfs_batch(request, "model", f"{owner}/{name}")

    @app.post("/{kind}s/{owner}/{name}.git/info/lfs/objects/batch")
    async def lfs_batch_typed(request: Request, kind: str, owner: str, name: str) -> dict[str, Any]:
        return await lfs_batch(request, kind, f"{owner}/{name}")

    @app.put("/lfs-upload/{oid}")
    async def lfs_upload(request: Request, oid: str) -> Response:
        data = await request.body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise HTTPException(400, detail=f"content does not match oid {oid}")
        store.put_blob(data)
        return Response(status_code=200)

    @app.post("/lfs-verify")
    async def lfs_verify(request: Request) -> dict[str, Any]:
        body = await request.json()
        blob = store.blob(body["oid"])
        if not blob.is_file() or blob.stat().st_size != body["size"]:
            raise HTTPException(404, detail=f"object {body['oid']} not uploaded")
        return {}

    @app.post("/api/{kind}s/{owner}/{name}/commit/{revision:path}")
    async def commit(request: Request, kind: str, owner: str, name: str, revision: str) -> dict[str, Any]:
        require_write(request)
        repo_id = f"{owner}/{name}"
        lines = [json.loads(line) for line in (await request.body()).splitlines() if line.strip()]
        with store.lock:
            repo = store.load(kind, repo_id)
            if revision not in repo["branches"]:
                raise HTTPException(404, detail=f"Invalid rev id: {revision} is not a branch")
            parent = repo["branches"][revision]
            tree = dict(store.commit(kind, repo_id, parent)["tree"])
            message = ""
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "header":
                    message = value.get("summary", "") + (
                        "\n\n" + value["description"] if value.get("description") else ""
                    )
                    if value.get("parentCommit") and value["parentCommit"] != parent:
                        raise HTTPException(412, detail="parentCommit is not the head of the branch")
                elif key == "file":
                    data = base64.b64decode(value["content"])
                    tree[value["path"]] = {"sha256": store.put_blob(data), "size": len(data),
                                           "git_oid": git_blob_sha1(data), "lfs": False}  # fmt: skip
                elif key == "lfsFile":
                    if not store.blob(value["oid"]).is_file():
                        raise HTTPException(422, detail=f"LFS object {value['oid']} was not uploaded")
                    pointer = (
                        f"version https://git-lfs.github.com/spec/v1\noid sha256:{value['oid']}\nsize {value['size']}\n"
                    )
                    tree[value["path"]] = {"sha256": value["oid"], "size": value["size"],
                                           "git_oid": git_blob_sha1(pointer.encode()), "lfs": True}  # fmt: skip
                elif key == "deletedFile":
                    tree.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    tree = {p: e for p, e in tree.items() if not p.startswith(prefix)}
                else:
                    raise HTTPException(422, detail=f"unsupported commit operation {key!r}")
            commit_id = store.add_commit(kind, repo_id, parent, message, tree)
            repo["branches"][revision] = commit_id
            store.save(kind, repo_id, repo)
        base = str(request.base_url).rstrip("/")
        return {"commitUrl": f"{base}/{repo_id}/commit/{commit_id}", "commitOid": commit_id, "pullRequestUrl": None,
                "success": True}  # fmt: skip

    @app.post("/api/{kind}s/{owner}/{name}/tag/{revision:path}")
    async def create_tag(request: Request, kind: str, owner: str, name: str, revision: str) -> dict[str, Any]:
        require_write(request)
        repo_id = f"{owner}/{name}"
        body = await request.json()
        with store.lock:
            repo = store.load(kind, repo_id)
            if body["tag"] in repo["tags"]:
                raise HTTPException(409, detail=f"Tag {body['tag']} already exists")
            repo["tags"][body["tag"]] = store.resolve(kind, repo_id, revision) and (
                repo["branches"].get(revision) or repo["tags"].get(revision) or revision
            )
            store.save(kind, repo_id, repo)
        return {}

    @app.post("/api/{kind}s/{owner}/{name}/branch/{branch:path}")
    async def create_branch(request: Request, kind: str, owner: str, name: str, branch: str) -> dict[str, Any]:
        require_write(request)
        repo_id = f"{owner}/{name}"
        body = await request.json() if await request.body() else {}
        with store.lock:
            repo = store.load(kind, repo_id)
            if branch in repo["branches"]:
                raise HTTPException(409, detail=f"Branch {branch} already exists")
            start = body.get("startingPoint") or "main"
            repo["branches"][branch] = repo["branches"].get(start) or repo["tags"].get(start) or start
            store.commit(kind, repo_id, repo["branches"][branch])
            store.save(kind, repo_id, repo)
        return {}

    @app.get("/api/{kind}s/{owner}/{name}/refs")
    def refs(request: Request, kind: str, owner: str, name: str) -> dict[str, Any]:
        repo = readable(request, kind, f"{owner}/{name}")

        def listing(refs: dict[str, str], prefix: str) -> list[dict[str, str]]:
            return [{"name": n, "ref": f"refs/{prefix}/{n}", "targetCommit": c} for n, c in sorted(refs.items())]

        return {"branches": listing(repo["branches"], "heads"), "tags": listing(repo["tags"], "tags"), "converts": []}

    @app.get("/api/{kind}s/{owner}/{name}/commits/{revision:path}")
    def commits(request: Request, kind: str, owner: str, name: str, revision: str) -> list[dict[str, Any]]:
        repo_id = f"{owner}/{name}"
        repo = readable(request, kind, repo_id)
        commit_id: str | None = repo["branches"].get(revision) or repo["tags"].get(revision) or revision
        history = []
        while commit_id:
            commit = store.commit(kind, repo_id, commit_id)
            history.append({"id": commit_id, "title": commit["message"].split("\n")[0], "message": commit["message"],
                            "authors": [{"user": USER}], "date": commit["date"]})  # fmt: skip
            commit_id = commit["parent"]
        return history

    @app.get("/api/{kind}s/{owner}/{name}/tree/{revision}/{path:path}")
    @app.get("/api/{kind}s/{owner}/{name}/tree/{revision}")
    def tree(request: Request, kind: str, owner: str, name: str, revision: str, path: str = "") -> list[dict[str, Any]]:
        repo_id = f"{owner}/{name}"
        readable(request, kind, repo_id)
        files = store.resolve(kind, repo_id, revision)["tree"]
        recursive = request.query_params.get("recursive", "").lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries: dict[str, dict[str, Any]] = {}
        for file_path, entry in sorted(files.items()):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # folders on the way
                folder = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(
                        folder,
                        {
                            "type": "directory",
                            "path": folder,
                            "oid": hashlib.sha1(folder.encode()).hexdigest(),
                            "size": 0,
                        },
                    )  # noqa: E501
            if recursive or len(parts) == 1:
                item: dict[str, Any] = {
                    "type": "file",
                    "path": file_path,
                    "oid": entry["git_oid"],
                    "size": entry["size"],
                }
                if entry["lfs"]:
                    item["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": 134}
                entries[file_path] = item
        if prefix and not entries:
            raise HTTPException(404, detail=f"Entry not found: {path}", headers={"X-Error-Code": "EntryNotFound"})
        return list(entries.values())

    def resolve_file(request: Request, kind: str, repo_id: str, revision: str, path: str) -> Response:
        repo = readable(request, kind, repo_id)
        commit_id = repo["branches"].get(revision) or repo["tags"].get(revision) or revision
        entry = store.commit(kind, repo_id, commit_id)["tree"].get(path)
        if entry is None:
            raise HTTPException(404, detail=f"Entry not found: {path}", headers={"X-Error-Code": "EntryNotFound"})
        headers = {"X-Repo-Commit": commit_id, "ETag": f'"{entry["git_oid"]}"', "Accept-Ranges": "bytes"}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{entry["sha256"]}"', "X-Linked-Size": str(entry["size"])})
        if request.method == "HEAD":
            return Response(status_code=200, headers={**headers, "Content-Length": str(entry["size"])})
        return FileResponse(store.blob(entry["sha256"]), headers=headers, media_type="application/octet-stream")

    @app.api_route("/{kind}s/{owner}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
    def resolve_typed(request: Request, kind: str, owner: str, name: str, revision: str, path: str) -> Response:
        if kind not in ("dataset", "space"):
            raise HTTPException(404, detail="not found")
        return resolve_file(request, kind, f"{owner}/{name}", revision, path)

    @app.api_route("/{owner}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
    def resolve_model(request: Request, owner: str, name: str, revision: str, path: str) -> Response:
        return resolve_file(request, "model", f"{owner}/{name}", revision, path)

    return app


def main() -> None:
    """Run the server until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="folder holding the repos (created if missing)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token", default=os.environ.get("LORAFORGE_HUB_TOKEN"), help="token required for writes")
    args = parser.parse_args()
    print(f"loraforge hub: serving {args.root.resolve()} on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(create_app(args.root, args.token), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
