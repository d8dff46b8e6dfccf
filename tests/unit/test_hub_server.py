"""The Hub-compatible server (infra/hub/server.py) as a real subprocess, used by the real huggingface_hub."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# huggingface_hub reads HF_HUB_DISABLE_XET once, when imported; the server speaks LFS, not Xet.
os.environ["HF_HUB_DISABLE_XET"] = "1"

from huggingface_hub import (  # noqa: E402
    CommitOperationAdd,
    CommitOperationCopy,
    CommitOperationDelete,
    HfApi,
    RepoFile,
    RepoFolder,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_unit_test_token"
README_V1 = "---\nlicense: apache-2.0\n---\n# tiny model\n"  # front matter: the client validates it first
README_V2 = README_V1 + "\nNow with a second paragraph.\n"
BIG = 11 * 1024 * 1024  # above the 10 MiB threshold: goes through the LFS batch API
Answer = tuple[int, Any, bytes]  # status, headers, body


def request(url: str, method: str = "GET", body: bytes | None = None, **headers: str) -> Answer:
    """A raw HTTP call, no huggingface_hub: (status, headers, body), HTTP errors included."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def blob_ids(api: HfApi, repo_id: str, revision: str = "main") -> dict[str, str]:
    """path -> git blob id of every file of `repo_id` at `revision`."""
    entries = api.list_repo_tree(repo_id, recursive=True, revision=revision)
    return {e.path: e.blob_id for e in entries if isinstance(e, RepoFile)}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server on a free loopback port over a fresh root, with a token; yields its URL."""
    from hub import hub_server

    assert constants.HF_HUB_DISABLE_XET, "huggingface_hub was imported before HF_HUB_DISABLE_XET=1 was set"
    with hub_server(tmp_path_factory.mktemp("hub") / "data", TOKEN) as url:
        yield url


@pytest.fixture(scope="module")
def api(hub: str) -> HfApi:
    return HfApi(endpoint=hub, token=TOKEN)


@pytest.fixture(scope="module")
def pushed(api: HfApi, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """team/model: commit v1 (README + an LFS binary) tagged v1, branch dev at v1, then v2 on main."""
    folder = tmp_path_factory.mktemp("upload")
    (folder / "weights").mkdir()
    (folder / "README.md").write_text(README_V1)
    big = os.urandom(BIG)
    (folder / "weights" / "model.bin").write_bytes(big)
    api.create_repo("team/model")
    first = api.upload_folder(repo_id="team/model", folder_path=folder, commit_message="v1")
    api.create_tag("team/model", tag="v1", revision=first.oid)
    api.create_branch("team/model", branch="dev")
    (folder / "README.md").write_text(README_V2)
    second = api.upload_folder(repo_id="team/model", folder_path=folder, commit_message="v2")
    return {"folder": folder, "big": big, "v1": first.oid, "v2": second.oid}


def test_create_repo_public_private_exist_ok_and_conflict(api: HfApi) -> None:
    url = api.create_repo("team/public")
    assert url.repo_id == "team/public" and url.endpoint == api.endpoint
    assert api.create_repo("team/public", exist_ok=True).repo_id == "team/public"  # the 409 means "exists"
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("team/public")
    assert conflict.value.response.status_code == 409
    api.create_repo("team/private", private=True)
    assert api.model_info("team/private").private and not api.model_info("team/public").private
    assert api.create_repo("solo").repo_id == "loraforge/solo"  # no namespace: the token's user
    assert api.create_repo("team/data", repo_type="dataset").repo_type == "dataset"


def test_commits_refs_and_file_listings(api: HfApi, pushed: dict[str, Any]) -> None:
    v1, v2 = pushed["v1"], pushed["v2"]
    assert len(v1) == len(v2) == 40 and v1 != v2
    refs = api.list_repo_refs("team/model")
    assert {b.name: b.target_commit for b in refs.branches} == {"main": v2, "dev": v1}
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": v1}
    commits = api.list_repo_commits("team/model")
    assert [(c.commit_id, c.title) for c in commits[:2]] == [(v2, "v2"), (v1, "v1")]
    assert commits[-1].title == "initial commit" and len(commits) == 3
    at_v1 = api.list_repo_commits("team/model", revision="v1")
    assert [c.commit_id for c in at_v1] == [v1, commits[-1].commit_id]
    assert sorted(api.list_repo_files("team/model")) == ["README.md", "weights/model.bin"]
    assert api.model_info("team/model", revision="v1").sha == v1 and api.model_info("team/model").sha == v2


def test_large_files_go_through_lfs(api: HfApi, pushed: dict[str, Any]) -> None:
    entries = {e.path: e for e in api.list_repo_tree("team/model", recursive=True)}
    assert set(entries) == {"README.md", "weights", "weights/model.bin"}
    weights, readme = entries["weights/model.bin"], entries["README.md"]
    assert isinstance(weights, RepoFile) and isinstance(readme, RepoFile)
    assert isinstance(entries["weights"], RepoFolder)
    assert weights.lfs is not None and weights.lfs.sha256 == hashlib.sha256(pushed["big"]).hexdigest()
    assert weights.size == BIG and readme.lfs is None and readme.size == len(README_V2)
    top = [e.path for e in api.list_repo_tree("team/model")]  # not recursive: the folder, not its files
    assert sorted(top) == ["README.md", "weights"]


def test_downloads_by_tag_commit_and_branch(hub: str, pushed: dict[str, Any], tmp_path: Path) -> None:
    client: dict[str, Any] = {"endpoint": hub, "token": TOKEN, "cache_dir": tmp_path}

    def download(filename: str, revision: str) -> Path:
        return Path(hf_hub_download("team/model", filename, revision=revision, **client))

    assert download("README.md", "v1").read_text() == README_V1
    assert download("README.md", pushed["v2"]).read_text() == README_V2
    assert download("README.md", "main").read_text() == README_V2
    assert download("weights/model.bin", pushed["v1"]).read_bytes() == pushed["big"]
    snapshot = Path(snapshot_download("team/model", revision="v1", **client))
    assert snapshot.name == pushed["v1"]  # the cache's snapshot folder is named after the resolved commit
    assert (snapshot / "README.md").read_text() == README_V1
    assert (snapshot / "weights" / "model.bin").read_bytes() == pushed["big"]


def test_head_and_range_requests(hub: str, pushed: dict[str, Any]) -> None:
    url, auth = f"{hub}/team/model/resolve/v1/weights/model.bin", f"Bearer {TOKEN}"
    status, headers, _ = request(url, "HEAD", authorization=auth)
    assert status == 200 and headers["X-Repo-Commit"] == pushed["v1"]
    assert headers["X-Linked-Etag"] == f'"{hashlib.sha256(pushed["big"]).hexdigest()}"'
    assert headers["X-Linked-Size"] == headers["Content-Length"] == str(BIG) and headers["ETag"]
    status, headers, body = request(url, authorization=auth, range="bytes=100-199")
    assert status == 206 and body == pushed["big"][100:200]
    assert headers["Content-Range"] == f"bytes 100-199/{BIG}"
    status, headers, _ = request(f"{hub}/team/model/resolve/v1/missing.txt", "HEAD", authorization=auth)
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound"
    assert headers["X-Repo-Commit"] == pushed["v1"]  # lets the client cache that the file is absent there


def test_identical_upload_makes_no_commit_and_server_accepts_unchanged_tree(
    api: HfApi, hub: str, pushed: dict[str, Any]
) -> None:
    api.create_repo("team/again")
    first = api.upload_folder(repo_id="team/again", folder_path=pushed["folder"])  # LFS blob: already stored
    # The client asks /preupload for each file's oid, sees nothing changed and sends no commit at all.
    again = api.upload_folder(repo_id="team/again", folder_path=pushed["folder"])
    assert again.oid == first.oid and len(api.list_repo_commits("team/again")) == 2
    files_before = blob_ids(api, "team/again")
    # A commit whose tree equals its parent's, sent directly: the server takes it, with the very same tree.
    content = base64.b64encode(README_V2.encode()).decode()
    readme = {"path": "README.md", "encoding": "base64", "content": content}
    lines = [{"key": "header", "value": {"summary": "same content"}}, {"key": "file", "value": readme}]
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    auth = {"authorization": f"Bearer {TOKEN}", "content-type": "application/x-ndjson"}
    status, _, answer = request(f"{hub}/api/models/team/again/commit/main", "POST", body, **auth)
    assert status == 200
    commit = json.loads(answer)["commitOid"]
    assert commit != first.oid and api.model_info("team/again").sha == commit
    assert blob_ids(api, "team/again") == files_before
    assert [c.commit_id for c in api.list_repo_commits("team/again")][:2] == [commit, first.oid]


def test_branches_are_separate_lines_of_history(api: HfApi) -> None:
    api.create_repo("team/branchy")
    base = api.upload_file(path_or_fileobj=b"base\n", path_in_repo="base.txt", repo_id="team/branchy")
    api.create_branch("team/branchy", branch="dev", revision=base.oid)
    note: dict[str, Any] = {"path_or_fileobj": b"dev only\n", "path_in_repo": "notes.txt"}
    dev = api.upload_file(repo_id="team/branchy", revision="dev", commit_message="dev note", **note)
    assert sorted(api.list_repo_files("team/branchy", revision="dev")) == ["base.txt", "notes.txt"]
    assert api.list_repo_files("team/branchy") == ["base.txt"]
    assert api.list_repo_commits("team/branchy", revision="dev")[1].commit_id == base.oid
    branches = api.list_repo_refs("team/branchy").branches
    assert {b.name: b.target_commit for b in branches} == {"main": base.oid, "dev": dev.oid}


def test_copies_and_deletes(api: HfApi) -> None:
    api.create_repo("team/edits")
    adds = [CommitOperationAdd("a/one.txt", b"1\n"), CommitOperationAdd("a/two.txt", b"2\n")]
    api.create_commit("team/edits", operations=adds, commit_message="add")
    copy = CommitOperationCopy("a/one.txt", "b/one.txt")  # the client asks /paths-info, then commits
    api.create_commit("team/edits", operations=[copy, CommitOperationDelete("a/two.txt")], commit_message="c")
    assert sorted(api.list_repo_files("team/edits")) == ["a/one.txt", "b/one.txt"]
    api.create_commit("team/edits", operations=[CommitOperationDelete("a/")], commit_message="rm folder")
    assert api.list_repo_files("team/edits") == ["b/one.txt"]
    with pytest.raises(RemoteEntryNotFoundError):
        api.create_commit("team/edits", operations=[CommitOperationDelete("gone.txt")], commit_message="rm")


def test_writes_need_the_token(hub: str, api: HfApi) -> None:
    api.create_repo("team/guarded")
    head = api.model_info("team/guarded").sha
    for token in (False, "hf_wrong"):
        stranger = HfApi(endpoint=hub, token=token)
        with pytest.raises(HfHubHTTPError) as create:
            stranger.create_repo("team/intruder")
        with pytest.raises(HfHubHTTPError) as upload:
            stranger.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="team/guarded")
        with pytest.raises(HfHubHTTPError) as tag:
            stranger.create_tag("team/guarded", tag="stolen")
        assert {e.value.response.status_code for e in (create, upload, tag)} == {401}
    assert not api.repo_exists("team/intruder") and api.model_info("team/guarded").sha == head
    assert api.list_repo_refs("team/guarded").tags == []


def test_private_repo_is_unreadable_without_the_token(hub: str, api: HfApi, tmp_path: Path) -> None:
    api.create_repo("team/secret", private=True)
    api.upload_file(path_or_fileobj=b"classified\n", path_in_repo="secret.txt", repo_id="team/secret")
    stranger = HfApi(endpoint=hub, token=False)
    with pytest.raises(RepositoryNotFoundError):  # answered as if it did not exist
        stranger.model_info("team/secret")
    with pytest.raises(RepositoryNotFoundError):
        stranger.list_repo_files("team/secret")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("team/secret", "secret.txt", endpoint=hub, token=False, cache_dir=tmp_path)
    path = hf_hub_download("team/secret", "secret.txt", endpoint=hub, token=TOKEN, cache_dir=tmp_path)
    assert Path(path).read_bytes() == b"classified\n"
    api.create_repo("team/open")
    assert stranger.list_repo_files("team/open") == []  # a public repo: open to all


def test_dataset_repos_and_delete(api: HfApi, hub: str, tmp_path: Path) -> None:
    api.create_repo("team/rows", repo_type="dataset")
    row = b'{"a": 1}\n'
    api.upload_file(path_or_fileobj=row, path_in_repo="train.jsonl", repo_id="team/rows", repo_type="dataset")
    client: dict[str, Any] = {"repo_type": "dataset", "endpoint": hub, "token": TOKEN, "cache_dir": tmp_path}
    assert Path(hf_hub_download("team/rows", "train.jsonl", **client)).read_bytes() == row
    api.delete_repo("team/rows", repo_type="dataset")
    assert not api.repo_exists("team/rows", repo_type="dataset")
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo("team/rows", repo_type="dataset")


def test_a_wrong_token_is_refused_even_for_public_reads(hub: str, api: HfApi, pushed: dict[str, Any]) -> None:
    stranger = HfApi(endpoint=hub, token="hf_wrong")
    for read in (lambda: stranger.model_info("team/model"), lambda: stranger.model_info("team/never-created")):
        with pytest.raises(HfHubHTTPError) as error:  # as on the Hub: not "not found", the token is refused
            read()
        assert error.value.response.status_code == 401 and not isinstance(error.value, RepositoryNotFoundError)
    assert HfApi(endpoint=hub, token=False).model_info("team/model").sha == pushed["v2"]  # no token: public reads


def _server_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("hub_server_module", ROOT / "infra" / "hub" / "server.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


OID = "0" * 64
# Every route that can change what the server stores, with a request for it; the test fails when a new one is
# added without being listed here (and so without being checked for the token).
WRITES: dict[tuple[str, str], tuple[str, bytes]] = {
    ("POST", "/api/repos/create"): ("/api/repos/create", b'{"name": "intruder", "organization": "team"}'),
    ("DELETE", "/api/repos/delete"): ("/api/repos/delete", b'{"name": "model", "organization": "team"}'),
    ("POST", "/api/{kind}s/{owner}/{name}/preupload/{revision}"): (
        "/api/models/team/model/preupload/main",
        b'{"files": []}',
    ),
    ("POST", "/{owner}/{name}.git/info/lfs/objects/batch"): (
        "/team/model.git/info/lfs/objects/batch",
        b'{"operation": "upload", "objects": []}',
    ),
    ("POST", "/{kind}s/{owner}/{name}.git/info/lfs/objects/batch"): (
        "/models/team/model.git/info/lfs/objects/batch",
        b'{"operation": "upload", "objects": []}',
    ),
    ("PUT", "/lfs/{oid}"): (f"/lfs/{OID}?size=1&sig=forged", b"x"),
    ("POST", "/lfs/{oid}/verify"): (f"/lfs/{OID}/verify", b'{"size": 1}'),
    ("POST", "/api/{kind}s/{owner}/{name}/commit/{revision}"): (
        "/api/models/team/model/commit/main",
        b'{"key": "header", "value": {"summary": "x"}}\n',
    ),
    ("POST", "/api/{kind}s/{owner}/{name}/tag/{revision}"): ("/api/models/team/model/tag/main", b'{"tag": "stolen"}'),
    ("POST", "/api/{kind}s/{owner}/{name}/branch/{branch}"): ("/api/models/team/model/branch/stolen", b"{}"),
}
# POST routes that only read: YAML validation, and paths-info (private repos need the token, as for every read).
READ_ONLY_POSTS = {("POST", "/api/validate-yaml"), ("POST", "/api/{kind}s/{owner}/{name}/paths-info/{revision}")}


def test_every_route_that_writes_needs_the_token(hub: str, api: HfApi, pushed: dict[str, Any], tmp_path: Path) -> None:
    app = _server_module().create_app(tmp_path, TOKEN)
    routes = {(method, route.path) for route in app.routes for method in getattr(route, "methods", set())}
    assert {r for r in routes if r[0] not in ("GET", "HEAD")} == set(WRITES) | READ_ONLY_POSTS
    refs_before = api.list_repo_refs("team/model")
    for (method, _), (path, body) in WRITES.items():
        for headers in ({}, {"authorization": "Bearer hf_wrong"}, {"authorization": TOKEN}):  # no "Bearer"
            status, _, answer = request(f"{hub}{path}", method, body, **headers)
            # LFS contents go to a signed URL, without the Authorization header (a presigned URL on the Hub).
            expected = 403 if path.startswith("/lfs/") and not path.endswith("/verify") and not headers else 401
            assert status == expected, (method, path, headers, answer)
    refs_after = api.list_repo_refs("team/model")
    assert refs_after.branches == refs_before.branches and refs_after.tags == refs_before.tags
    assert not api.repo_exists("team/intruder")


def test_without_a_token_the_server_makes_one_and_keeps_it(tmp_path: Path) -> None:
    from hub import free_port, serve

    root, port = tmp_path / "data", free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, str(ROOT / "infra" / "hub" / "server.py"), "--root", str(root), "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k != "LORAFORGE_HUB_TOKEN"}
    with serve(cmd, f"{url}/api/whoami-v2", tmp_path / "hub.log", timeout=60, env=env):
        token = (root / "token").read_text().strip()
        assert (root / "token").stat().st_mode & 0o777 == 0o600 and len(token) == 51 and token.startswith("hf_")
        with pytest.raises(HfHubHTTPError) as refused:
            HfApi(endpoint=url, token=False).create_repo("team/open-door")
        assert refused.value.response.status_code == 401
        HfApi(endpoint=url, token=token).create_repo("team/first")
    assert token not in (tmp_path / "hub.log").read_text() and str(root / "token") in (tmp_path / "hub.log").read_text()
    with serve(cmd, f"{url}/api/whoami-v2", tmp_path / "hub.log", timeout=60, env=env):  # restarted: same token
        assert (root / "token").read_text().strip() == token
        HfApi(endpoint=url, token=token).create_repo("team/second")
