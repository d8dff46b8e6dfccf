"""The project's Hub-compatible server against the real huggingface_hub client, over HTTP on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

TOKEN = "hf_unit_test_token"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from hub import hub_server

    with hub_server(tmp_path_factory.mktemp("hub") / "repos", TOKEN) as url:
        yield url


@pytest.fixture
def api(hub: str):  # type: ignore[no-untyped-def]
    from huggingface_hub import HfApi

    assert os.environ.get("HF_HUB_DISABLE_XET") == "1"
    return HfApi(endpoint=hub, token=TOKEN)


def test_upload_tag_download_round_trip(api, hub: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from huggingface_hub import hf_hub_download, snapshot_download

    folder = tmp_path / "bundle"
    (folder / "sub").mkdir(parents=True)
    (folder / "README.md").write_text("# hello\n")
    big = os.urandom(11 * 1024 * 1024)  # > 10 MB: goes through the LFS batch API
    (folder / "sub" / "weights.bin").write_bytes(big)

    api.create_repo("team/round-trip", exist_ok=True)
    first = api.upload_folder(repo_id="team/round-trip", folder_path=folder, commit_message="v1")
    api.create_tag("team/round-trip", tag="v1", revision=first.oid)
    api.create_branch("team/round-trip", branch="dev")
    assert set(api.list_repo_files("team/round-trip")) == {"README.md", "sub/weights.bin"}
    refs = api.list_repo_refs("team/round-trip")
    assert {t.name for t in refs.tags} == {"v1"} and {b.name for b in refs.branches} == {"main", "dev"}

    (folder / "README.md").write_text("# hello again\n")
    second = api.upload_folder(repo_id="team/round-trip", folder_path=folder, commit_message="v2")
    assert second.oid != first.oid
    assert [c.title for c in api.list_repo_commits("team/round-trip")] == ["v2", "v1", "initial commit"]

    old = hf_hub_download(
        "team/round-trip", "README.md", revision="v1", endpoint=hub, token=TOKEN, cache_dir=tmp_path / "c"
    )
    assert Path(old).read_text() == "# hello\n"
    new = hf_hub_download("team/round-trip", "README.md", endpoint=hub, token=TOKEN, cache_dir=tmp_path / "c")
    assert Path(new).read_text() == "# hello again\n"
    weights = hf_hub_download("team/round-trip", "sub/weights.bin", revision=first.oid, endpoint=hub, token=TOKEN,
                              cache_dir=tmp_path / "c")  # fmt: skip
    assert Path(weights).read_bytes() == big
    snap = Path(
        snapshot_download("team/round-trip", revision="v1", endpoint=hub, token=TOKEN, cache_dir=tmp_path / "s")
    )
    assert (snap / "README.md").read_text() == "# hello\n" and (snap / "sub" / "weights.bin").stat().st_size == len(big)


def test_identical_upload_makes_no_commit(api, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "a.txt").write_text("same")
    api.create_repo("team/idempotent", exist_ok=True)
    first = api.upload_folder(repo_id="team/idempotent", folder_path=tmp_path)
    again = api.upload_folder(repo_id="team/idempotent", folder_path=tmp_path)
    assert again.oid == first.oid
    assert len(api.list_repo_commits("team/idempotent")) == 2  # initial + one upload


def test_create_repo_exist_ok_and_conflict(api) -> None:  # type: ignore[no-untyped-def]
    from huggingface_hub.errors import HfHubHTTPError

    api.create_repo("team/twice")
    api.create_repo("team/twice", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as info:
        api.create_repo("team/twice")
    assert info.value.response.status_code == 409


def test_writes_need_the_token(hub: str) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError) as info:
        HfApi(endpoint=hub, token="wrong").create_repo("team/nope")
    assert info.value.response.status_code == 401


def test_private_repo_is_hidden_without_token(api, hub: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    api.create_repo("team/secret", private=True)
    assert api.model_info("team/secret").private
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub, token=False).model_info("team/secret")
