"""A small Hugging Face Hub-compatible HTTP server: repos on disk with real, immutable revisions.

It speaks the part of the Hub HTTP API that the `huggingface_hub` client (2.x) uses to create and delete
repos, commit (small files inline, large or binary ones through the Git LFS batch API), branch, tag, list
and download, so that loraforge's publish stage and its tests push and pull for real without a network.
Xet storage is not spoken: clients run with HF_HUB_DISABLE_XET=1 (read when huggingface_hub is imported).

    python infra/hub/server.py --root .hub --port 8765 [--token SECRET]
    HF_ENDPOINT=http://127.0.0.1:8765 HF_HUB_DISABLE_XET=1 HF_TOKEN=SECRET loraforge run ...

Writes and reads of private repos need `Authorization: Bearer <token>`, and a request with any other token is
refused (401) as on the Hub. The token: --token, else $LORAFORGE_HUB_TOKEN (keeps it out of `ps`), else one made
on the first start and kept in ROOT/token (mode 0600): `export HF_TOKEN=$(cat ROOT/token)`.

Fault injection, for tests of interrupted pushes: `--crash-after-lfs-uploads N` stores N LFS objects, then dies
(the whole process, exit status 3) in the middle of receiving the next one, as a server or network failure would
leave a push: some objects stored, no commit. Restart it without the option on the same --root to go on.

Storage under --root (each file is written under a temporary name, then renamed: never half-written):
    blobs/<sha256>                                   file contents, shared by all repos
    repos/<type>s/<owner>/<name>/repo.json           {"private", "createdAt", "branches", "tags"}
    repos/<type>s/<owner>/<name>/commits/<id>.json   {"parent", "message", "description", "date", "tree"}
A tree maps each path to {"sha256", "size", "oid", "lfs"}; a commit id is the sha1 of the commit's JSON.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import uvicorn
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response

USER = "loraforge"  # the account every valid token belongs to; repos created without a namespace go there
LFS_THRESHOLD = 10 * 1024 * 1024  # as on the Hub: files from 10 MiB on, and binary files, go through LFS
REPO_TYPES = ("model", "dataset", "space")
NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,95}")  # owner and repo names; keeps '..' and '/' out of disk paths
REF = re.compile(r"(?![0-9a-f]{40}$)[A-Za-z0-9][\w.-]{0,99}")  # branch/tag names, never commit-id-like
COMMIT_ID, SHA256 = re.compile(r"[0-9a-f]{40}"), re.compile(r"[0-9a-f]{64}")
BAD_TOKEN = "Invalid credentials in Authorization header"  # the client reads this text as an auth error
Json = dict[str, Any]  # a JSON object, as read from a request or from disk
Tree = dict[str, Json]  # path -> {"sha256", "size", "oid", "lfs"}


class HubError(Exception):
    """An error answered as the Hub does: the client maps X-Error-Code (RepoNotFound, RevisionNotFound,
    EntryNotFound) to its exception classes and shows X-Error-Message or the body's "error"."""

    def __init__(self, status: int, message: str, code: str | None = None, **headers: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        header = message.encode("ascii", "backslashreplace").decode()  # header values must be latin-1
        self.headers = {"X-Error-Message": header, **headers} | ({"X-Error-Code": code} if code else {})


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob: the `oid` the Hub reports for a file (and the client compares with)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The Git LFS pointer git stores in place of an LFS file; its blob oid is the file's git `oid`."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def lfs_info(entry: Json) -> Json:
    """An LFS file's facts as the tree listing gives them (repo info calls `oid` "sha256")."""
    pointer = lfs_pointer(entry["sha256"], entry["size"])
    return {"oid": entry["sha256"], "size": entry["size"], "pointerSize": len(pointer)}


def now() -> str:
    """The current UTC time in the Hub's format (the client parses it with `parse_datetime`)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary file and a rename, so that readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def check_path(path: Any) -> str:
    """A file path inside a repo: relative, with no empty, '.' or '..' parts."""
    parts = set(path.split("/")) if isinstance(path, str) else {""}
    if parts & {"", ".", ".."}:
        raise HubError(400, f"invalid path in repo: {path!r}")
    return str(path)


class Store:
    """Repos, commits and blobs on disk. Commits and blobs never change once written, so reads take no
    lock; `lock` makes each read-modify-write of a repo's refs atomic."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.Lock()
        (root / "blobs").mkdir(parents=True, exist_ok=True)

    def repo_dir(self, kind: str, repo_id: str) -> Path:
        owner, _, name = repo_id.partition("/")
        if kind not in REPO_TYPES or not NAME.fullmatch(owner) or not NAME.fullmatch(name):
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return self.root / "repos" / f"{kind}s" / owner / name

    def exists(self, kind: str, repo_id: str) -> bool:
        return (self.repo_dir(kind, repo_id) / "repo.json").is_file()

    def repo(self, kind: str, repo_id: str) -> Json:
        if not self.exists(kind, repo_id):
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return json.loads((self.repo_dir(kind, repo_id) / "repo.json").read_text())

    def save_repo(self, kind: str, repo_id: str, repo: Json) -> None:
        write_atomic(self.repo_dir(kind, repo_id) / "repo.json", json.dumps(repo, indent=1).encode())

    def resolve(self, kind: str, repo_id: str, revision: str, repo: Json) -> str:
        """A branch, a tag or a full commit id -> the commit id (branches first, as in git)."""
        commit_id = repo["branches"].get(revision) or repo["tags"].get(revision) or revision
        if not COMMIT_ID.fullmatch(commit_id) or not self._commit_path(kind, repo_id, commit_id).is_file():
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return str(commit_id)

    def commit(self, kind: str, repo_id: str, commit_id: str) -> Json:
        return json.loads(self._commit_path(kind, repo_id, commit_id).read_text())

    def add_commit(self, kind: str, repo_id: str, parent: str | None, header: Json, tree: Tree) -> str:
        """Store a commit, return its id. The date makes each commit unique, even with an unchanged tree."""
        message, description = str(header.get("summary") or ""), str(header.get("description") or "")
        body = {"parent": parent, "message": message, "description": description, "date": now(), "tree": tree}
        data = json.dumps(body, sort_keys=True).encode()
        commit_id = hashlib.sha1(data).hexdigest()
        write_atomic(self._commit_path(kind, repo_id, commit_id), data)
        return commit_id

    def _commit_path(self, kind: str, repo_id: str, commit_id: str) -> Path:
        return self.repo_dir(kind, repo_id) / "commits" / f"{commit_id}.json"

    def blob(self, sha256: str) -> Path:
        if not SHA256.fullmatch(sha256):
            raise HubError(400, f"not a sha256: {sha256!r}")
        return self.root / "blobs" / sha256

    def put_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.blob(sha).is_file():
            write_atomic(self.blob(sha), data)
        return sha

    def apply(self, tree: Tree, key: str, value: Json) -> None:
        """Apply one operation line of a commit's NDJSON body to `tree`, in place."""
        path = check_path(str(value.get("path")).rstrip("/") if key == "deletedFolder" else value.get("path"))
        if key == "file":  # a regular file, inline
            data = base64.b64decode(value.get("content", ""))
            sha256, oid = self.put_blob(data), git_blob_oid(data)
            tree[path] = {"sha256": sha256, "size": len(data), "oid": oid, "lfs": False}
        elif key == "lfsFile":  # uploaded before through the LFS batch API, or already stored
            blob = self.blob(str(value.get("oid")))
            if not blob.is_file():
                raise HubError(422, f"LFS object {blob.name} of {path} was never uploaded")
            size = blob.stat().st_size  # what is stored, not what the client says (copies send no size)
            oid = git_blob_oid(lfs_pointer(blob.name, size))
            tree[path] = {"sha256": blob.name, "size": size, "oid": oid, "lfs": True}
        elif key in ("deletedFile", "deletedFolder"):
            doomed = [path] if key == "deletedFile" else [p for p in tree if p.startswith(path + "/")]
            if not doomed or not all(p in tree for p in doomed):
                # The client looks for this text to hint at the difference between file and folder deletes.
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            for doomed_path in doomed:
                del tree[doomed_path]
        else:
            raise HubError(400, f"unsupported commit operation {key!r}")


def list_tree(tree: Tree, folder: str, recursive: bool) -> list[Json]:
    """The entries under `folder` as the Hub lists them: files (with `lfs` facts) and directories."""
    prefix = folder.strip("/") + "/" if folder.strip("/") else ""
    files = {path[len(prefix) :]: entry for path, entry in sorted(tree.items()) if path.startswith(prefix)}
    if prefix and not files:
        raise HubError(404, f"Entry not found: {folder}", "EntryNotFound")
    entries: dict[str, Json] = {}
    for rel, entry in files.items():
        parts = rel.split("/")
        for depth in range(1, len(parts) if recursive else min(2, len(parts))):
            sub = "/".join(parts[:depth])  # a directory on the way; its oid stands for its content
            if sub not in entries:
                content = json.dumps([(p, e["oid"]) for p, e in files.items() if p.startswith(sub + "/")])
                oid = hashlib.sha1(content.encode()).hexdigest()
                entries[sub] = {"type": "directory", "path": prefix + sub, "size": 0, "oid": oid}
        if recursive or len(parts) == 1:
            item = {"type": "file", "path": prefix + rel, "size": entry["size"], "oid": entry["oid"]}
            entries[rel] = item | ({"lfs": lfs_info(entry)} if entry["lfs"] else {})
    return list(entries.values())


def create_app(root: Path, token: str | None = None, crash_after_lfs_uploads: int | None = None) -> FastAPI:
    """The ASGI app serving the repos under `root`; with `token`, writes and private reads need it; with
    `crash_after_lfs_uploads` (N), the process exits while receiving the LFS upload that follows the N-th."""
    store = Store(root)
    lfs_stored = [0]  # LFS objects this process has stored (the fault counts them)
    app = FastAPI(title="loraforge hub", docs_url=None, redoc_url=None)
    # LFS content is PUT to the href we hand out, without the Authorization header (a presigned URL on the
    # Hub): each href is signed with a per-process secret, so only callers of the batch API can upload.
    upload_secret = secrets.token_bytes(32)

    def sign(oid: str, size: int) -> str:
        return hmac.new(upload_secret, f"{oid}:{size}".encode(), "sha256").hexdigest()

    def authorized(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return token is None or hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    def require_write(request: Request) -> None:
        if not authorized(request):
            raise HubError(401, BAD_TOKEN)

    def readable(request: Request, kind: str, repo_id: str) -> Json:
        repo = store.repo(kind, repo_id)
        if repo["private"] and not authorized(request):  # answered as a missing repo: its existence is secret
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def branch_head(repo: Json, branch: str) -> str:
        if branch not in repo["branches"]:
            raise HubError(404, f"Invalid rev id: {branch} is not a branch", "RevisionNotFound")
        return str(repo["branches"][branch])

    def repo_url(request: Request, kind: str, repo_id: str) -> str:
        """The repo's web URL; the client parses the repo type and id back out of it (RepoUrl)."""
        return f"{str(request.base_url).rstrip('/')}/{'' if kind == 'model' else kind + 's/'}{repo_id}"

    async def json_body(request: Request) -> Json:
        try:
            body = json.loads(await request.body() or b"{}")
        except json.JSONDecodeError as exc:
            raise HubError(400, f"invalid JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise HubError(400, "the JSON body must be an object")
        return body

    @app.exception_handler(HubError)
    async def hub_error(request: Request, exc: HubError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.middleware("http")
    async def refuse_wrong_tokens(request: Request, call_next: Any) -> Response:
        """A request that sends a token other than ours is refused, whatever it asks (public reads too), as the
        Hub does: a client with a stale token learns it at once, not at its first write."""
        if "authorization" in request.headers and not authorized(request):
            error = HubError(401, BAD_TOKEN)
            return JSONResponse({"error": error.message}, status_code=401, headers=error.headers)
        response: Response = await call_next(request)
        return response

    @app.get("/api/whoami-v2")
    def whoami(request: Request) -> Json:
        require_write(request)
        auth = {"type": "access_token", "accessToken": {"displayName": "loraforge-hub", "role": "write"}}
        return {"type": "user", "name": USER, "fullname": USER, "orgs": [], "auth": auth}

    @app.post("/api/validate-yaml")
    async def validate_yaml(request: Request) -> JSONResponse:
        """The client checks a README's front matter here before committing it: it must be a mapping."""
        content, errors = str((await json_body(request)).get("content", "")), []
        if content.startswith("---") and content.count("---") >= 2:
            try:
                if not isinstance(yaml.safe_load(content.split("---", 2)[1]) or {}, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
            except yaml.YAMLError as exc:
                errors.append({"message": f"invalid YAML metadata: {exc}"})
        return JSONResponse({"errors": errors, "warnings": []}, status_code=400 if errors else 200)

    def named_repo(body: Json) -> tuple[str, str]:
        """(type, id) of the repo named in a create or delete body; no organization means the user's own."""
        kind, owner, name = body.get("type") or "model", body.get("organization") or USER, body.get("name")
        if kind not in REPO_TYPES or not NAME.fullmatch(str(owner)) or not NAME.fullmatch(str(name)):
            raise HubError(400, f"invalid repo: {kind} {owner}/{name}")
        return kind, f"{owner}/{name}"

    @app.post("/api/repos/create")
    async def create_repo(request: Request) -> JSONResponse:
        require_write(request)
        body = await json_body(request)
        kind, repo_id = named_repo(body)
        url = repo_url(request, kind, repo_id)
        with store.lock:
            if store.exists(kind, repo_id):  # create_repo(exist_ok=True) takes a 409 and reads its "url"
                error = f"You already created this {kind} repo"
                return JSONResponse({"error": error, "url": url}, status_code=409)
            initial = store.add_commit(kind, repo_id, None, {"summary": "initial commit"}, {})
            private = body.get("visibility", "private" if body.get("private") else "public") != "public"
            repo = {"private": private, "createdAt": now(), "branches": {"main": initial}, "tags": {}}
            store.save_repo(kind, repo_id, repo)
        return JSONResponse({"url": url, "name": repo_id, "id": repo_id})

    @app.delete("/api/repos/delete")
    async def delete_repo(request: Request) -> Json:
        require_write(request)
        kind, repo_id = named_repo(await json_body(request))
        with store.lock:
            store.repo(kind, repo_id)
            shutil.rmtree(store.repo_dir(kind, repo_id))  # the blobs stay: other repos may share them
        return {}

    def sibling(path: str, entry: Json) -> Json:
        item = {"rfilename": path, "size": entry["size"], "blobId": entry["oid"]}
        if entry["lfs"]:
            lfs = lfs_info(entry)
            item["lfs"] = {"sha256": lfs.pop("oid"), **lfs}
        return item

    def info(request: Request, kind: str, repo_id: str, revision: str) -> Json:
        repo = readable(request, kind, repo_id)
        commit_id = store.resolve(kind, repo_id, revision, repo)
        commit = store.commit(kind, repo_id, commit_id)
        dates = {"createdAt": repo["createdAt"], "lastModified": commit["date"]}
        flags = {"private": repo["private"], "gated": False, "disabled": False}
        siblings = [sibling(path, entry) for path, entry in sorted(commit["tree"].items())]
        names = {"id": repo_id, "author": repo_id.split("/")[0], "sha": commit_id}
        return names | flags | dates | {"siblings": siblings}

    @app.get("/api/{kind}s/{owner}/{name}")
    def repo_info(request: Request, kind: str, owner: str, name: str) -> Json:
        return info(request, kind, f"{owner}/{name}", "main")

    @app.get("/api/{kind}s/{owner}/{name}/revision/{revision}")
    def repo_info_at(request: Request, kind: str, owner: str, name: str, revision: str) -> Json:
        return info(request, kind, f"{owner}/{name}", revision)

    @app.post("/api/{kind}s/{owner}/{name}/preupload/{revision}")
    async def preupload(request: Request, kind: str, owner: str, name: str, revision: str) -> Json:
        require_write(request)
        repo_id, body = f"{owner}/{name}", await json_body(request)
        tree = store.commit(kind, repo_id, branch_head(store.repo(kind, repo_id), revision))["tree"]
        files = []
        for item in body.get("files", []):
            path, sample = check_path(item.get("path")), base64.b64decode(item.get("sample", ""))
            lfs = int(item.get("size", 0)) >= LFS_THRESHOLD or b"\0" in sample
            current = tree.get(path)
            # The client leaves out of its commit each file whose oid here equals its own (sha256 for LFS
            # files, git blob sha1 for regular ones): that is how an unchanged upload makes no commit.
            oid = None if current is None else current["sha256" if current["lfs"] else "oid"]
            mode = "lfs" if lfs else "regular"
            files.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return {"files": files}

    async def lfs_batch(request: Request, kind: str, repo_id: str) -> JSONResponse:
        require_write(request)
        store.repo(kind, repo_id)
        body, base = await json_body(request), str(request.base_url).rstrip("/")
        if body.get("operation") != "upload":
            raise HubError(400, "this server only takes LFS uploads; download files through /resolve")
        objects = []
        for obj in body.get("objects", []):
            oid, size = str(obj.get("oid")), int(obj.get("size", -1))
            entry: Json = {"oid": oid, "size": size, "authenticated": True}
            if not SHA256.fullmatch(oid) or size < 0:
                entry["error"] = {"code": 422, "message": "oid must be a sha256 and size a byte count"}
            elif not store.blob(oid).is_file():  # a stored object gets no actions: the client skips it
                upload = {"href": f"{base}/lfs/{oid}?size={size}&sig={sign(oid, size)}", "header": {}}
                entry["actions"] = {"upload": upload, "verify": {"href": f"{base}/lfs/{oid}/verify"}}
            objects.append(entry)
        answer = {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}
        return JSONResponse(answer, media_type="application/vnd.git-lfs+json")

    @app.post("/{owner}/{name}.git/info/lfs/objects/batch")
    async def lfs_batch_model(request: Request, owner: str, name: str) -> JSONResponse:
        return await lfs_batch(request, "model", f"{owner}/{name}")

    @app.post("/{kind}s/{owner}/{name}.git/info/lfs/objects/batch")
    async def lfs_batch_typed(request: Request, kind: str, owner: str, name: str) -> JSONResponse:
        return await lfs_batch(request, kind, f"{owner}/{name}")

    @app.put("/lfs/{oid}")
    async def lfs_upload(request: Request, oid: str, size: int, sig: str) -> Response:
        if not hmac.compare_digest(sig, sign(oid, size)):
            raise HubError(403, "invalid upload URL: ask the LFS batch endpoint for one")
        target, digest, received = store.blob(oid), hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
        try:  # stream to disk while hashing: LFS files can be far larger than memory
            with os.fdopen(fd, "wb") as handle:
                async for chunk in request.stream():
                    if crash_after_lfs_uploads is not None and lfs_stored[0] >= crash_after_lfs_uploads:
                        print(f"fault: dying while receiving LFS object {oid} (after {lfs_stored[0]})", flush=True)
                        os._exit(3)  # mid-body: the client sees the connection drop, as in a real crash
                    digest.update(chunk)
                    handle.write(chunk)
                    received += len(chunk)
            if digest.hexdigest() != oid or received != size:
                raise HubError(400, f"content is not {size} bytes of sha256 {oid} (got {received} bytes)")
            os.replace(tmp, target)
            lfs_stored[0] += 1
        finally:
            Path(tmp).unlink(missing_ok=True)
        return Response(status_code=200)

    @app.post("/lfs/{oid}/verify")
    async def lfs_verify(request: Request, oid: str) -> Json:
        require_write(request)
        blob, size = store.blob(oid), (await json_body(request)).get("size")
        if not blob.is_file() or blob.stat().st_size != size:
            raise HubError(404, f"LFS object {oid} ({size} bytes) was not uploaded")
        return {}

    @app.post("/api/{kind}s/{owner}/{name}/commit/{revision}")
    async def commit(request: Request, kind: str, owner: str, name: str, revision: str) -> Json:
        require_write(request)
        if request.query_params.get("create_pr"):
            raise HubError(400, "pull requests are not supported by this server")
        repo_id = f"{owner}/{name}"
        try:  # NDJSON: a header line, then one line per operation
            lines = [json.loads(line) for line in (await request.body()).splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise HubError(400, f"invalid NDJSON body: {exc}") from None
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the commit body must start with a header line")
        header = lines[0].get("value") or {}
        with store.lock:  # read the head, build on it, move the branch: one step, so commits serialize
            repo = store.repo(kind, repo_id)
            parent = branch_head(repo, revision)
            if header.get("parentCommit") not in (None, parent):
                raise HubError(412, f"parentCommit is no longer the head of {revision} ({parent})")
            tree = dict(store.commit(kind, repo_id, parent)["tree"])
            for line in lines[1:]:
                store.apply(tree, str(line.get("key")), line.get("value") or {})
            # An unchanged tree still makes a commit (whether to send one is the client's call), same tree.
            commit_id = store.add_commit(kind, repo_id, parent, header, tree)
            repo["branches"][revision] = commit_id
            store.save_repo(kind, repo_id, repo)
        url = f"{repo_url(request, kind, repo_id)}/commit/{commit_id}"
        return {"commitUrl": url, "commitOid": commit_id, "pullRequestUrl": None, "success": True}

    def add_ref(kind: str, repo_id: str, group: str, ref: str, revision: str) -> None:
        """Point a new branch or tag (`group`) at `revision`. A name is a branch or a tag, never both."""
        if not REF.fullmatch(ref):
            raise HubError(400, f"invalid branch or tag name: {ref!r}")
        with store.lock:
            repo = store.repo(kind, repo_id)
            if ref in repo["branches"] or ref in repo["tags"]:
                raise HubError(409, f"Reference {ref} already exists")
            repo[group][ref] = store.resolve(kind, repo_id, revision, repo)
            store.save_repo(kind, repo_id, repo)

    @app.post("/api/{kind}s/{owner}/{name}/tag/{revision}")
    async def create_tag(request: Request, kind: str, owner: str, name: str, revision: str) -> Json:
        require_write(request)
        add_ref(kind, f"{owner}/{name}", "tags", str((await json_body(request)).get("tag")), revision)
        return {}

    @app.post("/api/{kind}s/{owner}/{name}/branch/{branch}")
    async def create_branch(request: Request, kind: str, owner: str, name: str, branch: str) -> Json:
        require_write(request)
        start = (await json_body(request)).get("startingPoint") or "main"
        add_ref(kind, f"{owner}/{name}", "branches", branch, start)
        return {}

    @app.get("/api/{kind}s/{owner}/{name}/refs")
    def refs(request: Request, kind: str, owner: str, name: str) -> Json:
        repo = readable(request, kind, f"{owner}/{name}")

        def listing(group: str, prefix: str) -> list[dict[str, str]]:
            refs = sorted(repo[group].items())
            return [{"name": ref, "ref": f"refs/{prefix}/{ref}", "targetCommit": c} for ref, c in refs]

        branches, tags = listing("branches", "heads"), listing("tags", "tags")
        return {"branches": branches, "tags": tags, "converts": [], "pullRequests": []}

    @app.get("/api/{kind}s/{owner}/{name}/commits/{revision}")
    def commits(request: Request, kind: str, owner: str, name: str, revision: str) -> list[Json]:
        repo_id = f"{owner}/{name}"
        commit_id: str | None = store.resolve(kind, repo_id, revision, readable(request, kind, repo_id))
        history = []
        while commit_id:  # newest first, following the parents down to the initial commit
            commit = store.commit(kind, repo_id, commit_id)
            text = {"title": commit["message"], "message": commit["description"]}
            history.append({"id": commit_id, **text, "authors": [{"user": USER}], "date": commit["date"]})
            commit_id = commit["parent"]
        return history

    @app.get("/api/{kind}s/{owner}/{name}/tree/{revision}")
    @app.get("/api/{kind}s/{owner}/{name}/tree/{revision}/{path:path}")
    def tree(request: Request, kind: str, owner: str, name: str, revision: str, path: str = "") -> list[Any]:
        repo_id = f"{owner}/{name}"
        commit_id = store.resolve(kind, repo_id, revision, readable(request, kind, repo_id))
        recursive = request.query_params.get("recursive", "").lower() in ("1", "true")
        return list_tree(store.commit(kind, repo_id, commit_id)["tree"], path, recursive)

    @app.post("/api/{kind}s/{owner}/{name}/paths-info/{revision}")
    async def paths_info(request: Request, kind: str, owner: str, name: str, revision: str) -> list[Json]:
        """What the given paths (files or folders) are at `revision`; unknown paths are left out."""
        repo_id, form = f"{owner}/{name}", parse_qs((await request.body()).decode())  # a urlencoded form
        commit_id = store.resolve(kind, repo_id, revision, readable(request, kind, repo_id))
        listing = list_tree(store.commit(kind, repo_id, commit_id)["tree"], "", recursive=True)
        return [entry for entry in listing if entry["path"] in form.get("paths", [])]

    def serve_file(request: Request, kind: str, repo_id: str, revision: str, path: str) -> Response:
        commit_id = store.resolve(kind, repo_id, revision, readable(request, kind, repo_id))
        entry = store.commit(kind, repo_id, commit_id)["tree"].get(path)
        if entry is None:  # with X-Repo-Commit the client caches that the file is absent at that commit
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", **{"X-Repo-Commit": commit_id})
        headers = {"X-Repo-Commit": commit_id, "ETag": f'"{entry["oid"]}"'}
        if entry["lfs"]:  # the client names its cached copy of an LFS file after X-Linked-Etag (the sha256)
            headers |= {"X-Linked-Etag": f'"{entry["sha256"]}"', "X-Linked-Size": str(entry["size"])}
        # FileResponse answers HEAD with the headers only, and Range requests (resumed downloads) with 206.
        blob = store.blob(entry["sha256"])
        return FileResponse(blob, headers=headers, media_type="application/octet-stream")

    @app.api_route("/{kind}s/{owner}/{name}/resolve/{rev}/{path:path}", methods=["GET", "HEAD"])
    def resolve_typed(request: Request, kind: str, owner: str, name: str, rev: str, path: str) -> Response:
        return serve_file(request, kind, f"{owner}/{name}", rev, path)

    @app.api_route("/{owner}/{name}/resolve/{rev}/{path:path}", methods=["GET", "HEAD"])
    def resolve_model(request: Request, owner: str, name: str, rev: str, path: str) -> Response:
        return serve_file(request, "model", f"{owner}/{name}", rev, path)

    return app


class ReadyServer(uvicorn.Server):
    """uvicorn's server, printing "ready" and the real port (--port 0 too) once it accepts connections."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(f"loraforge hub ready on http://{host}:{port}", flush=True)


def stored_token(root: Path) -> str:
    """The token kept in ROOT/token: made (random, mode 0600) on the first call, the same one afterwards, so a
    restarted server keeps accepting the clients set up before."""
    path = root / "token"
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=root, prefix=".tmp-token-")  # mkstemp makes it 0600
        with os.fdopen(fd, "w") as handle:
            handle.write(f"hf_{secrets.token_hex(24)}\n")
        try:
            os.link(tmp, path)  # whole or not at all, and never over a token another start made meanwhile
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    path.chmod(0o600)
    return path.read_text().strip()


def main() -> None:
    """Serve the repos under --root until interrupted."""
    layout = argparse.RawDescriptionHelpFormatter  # keeps the docstring's examples as they are
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=layout)
    parser.add_argument("--root", type=Path, required=True, help="folder of blobs and repos (created)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port (printed when ready)")
    token_help = "token for writes and private reads (default: $LORAFORGE_HUB_TOKEN, else ROOT/token, made once)"
    parser.add_argument("--token", default=os.environ.get("LORAFORGE_HUB_TOKEN"), help=token_help)
    fault_help = "fault injection: exit while receiving the LFS upload after the N-th stored one (tests)"
    parser.add_argument("--crash-after-lfs-uploads", type=int, metavar="N", help=fault_help)
    args = parser.parse_args()
    if args.token:
        token, where = args.token, "the token given"
    else:
        token, where = stored_token(args.root), f"the token in {args.root / 'token'}"
    app = create_app(args.root, token, args.crash_after_lfs_uploads)
    print(f"loraforge hub: serving {args.root.resolve()}; writes need {where}", flush=True)
    ReadyServer(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")).run()


if __name__ == "__main__":
    main()
