"""Trusting the Hub only as far as it answers: the published comparison (eval) skips its checks only on a confirmed
"no loraforge release yet", `pull` insists on every file its lineage lists and on a well-formed lineage, and the
token is looked up like huggingface_hub does and never sent over plain http off this machine.

Repos live on the project's Hub server (a subprocess on loopback); refused tokens, server errors and flaky
answers come from a small scripted HTTP server in this file; an unreachable Hub is a closed loopback port."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# huggingface_hub reads HF_HUB_DISABLE_XET once, when imported; the server speaks LFS, not Xet.
os.environ["HF_HUB_DISABLE_XET"] = "1"

from huggingface_hub import HfApi, constants  # noqa: E402

from loraforge.tasks import hubclient  # noqa: E402
from loraforge.tasks.artifacts import Artifact  # noqa: E402
from loraforge.tasks.errors import StageError  # noqa: E402
from loraforge.tasks.evaluate import EvalConfig, _download_adapter, _resolve_published  # noqa: E402
from loraforge.tasks.hubclient import check_transport, hub_token, is_loopback  # noqa: E402
from loraforge.tasks.pull import _download, pull  # noqa: E402

TOKEN = "hf_trust_test_token"
REMOTE = "http://hub.invalid:8765"  # plain http off loopback (.invalid never resolves: nothing may connect first)
TAG = "loraforge-0123456789ab"
GATE = ["accuracy_vs_published >= -0.01"]


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return TOKEN


# --- tokens: where they come from, where they may go ----------------------------------------------------------


def test_token_lookup_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from prefect.blocks.system import Secret

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    assert hub_token() is None
    (tmp_path / "token").write_text("hf_from_login\n")  # what `hf auth login` saves
    assert hub_token() == "hf_from_login"
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert hub_token() == "hf_from_env"

    class Block:
        def get(self) -> str:
            return "hf_from_block"

    monkeypatch.setattr(Secret, "load", classmethod(lambda cls, name, **kwargs: Block()))
    assert hub_token("hub-token") == "hf_from_block"  # a named Secret block comes first


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://127.0.0.1:8765",
        "http://127.8.9.10",
        "http://[::1]:8765",
        "http://localhost:8765",
        "http://LOCALHOST",
        "https://huggingface.co",
        "https://hub.example.com:8443",
    ],
)
def test_a_token_may_go_over_https_or_to_loopback(endpoint: str) -> None:
    check_transport(endpoint, "hf_secret")


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://hub.example.com",
        "http://10.0.0.5:8765",
        "http://localhost.example.com",
        "http://127.0.0.1.nip.io",
        "http://[::2]:8765",
        "ftp://127.0.0.1",
        "127.0.0.1:8765",
    ],
)
def test_a_token_never_goes_over_plain_http_off_loopback(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(StageError) as error:
        check_transport(endpoint, "hf_secret")
    message = str(error.value)
    assert message.startswith(f"refusing to send the Hub token to {endpoint}: only https://")
    assert "https:// URL" in message and "hf_secret" not in message
    check_transport(endpoint, None)  # without a token nothing is at risk
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    with pytest.raises(StageError, match="refusing to send the Hub token"):
        hub_token(endpoint=endpoint)


def test_loopback_hosts() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.255.0.1", "::1", "[::1]", "localhost", "LocalHost"]))
    assert not any(map(is_loopback, ["10.0.0.1", "::2", "localhost.example.com", "127.0.0.1.nip.io", ""]))


def test_publish_and_data_refuse_plain_http_off_loopback(
    token: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loraforge.tasks.data import _materialize
    from loraforge.tasks.publish import PublishConfig, _push

    with pytest.raises(StageError, match=rf"^refusing to send the Hub token to {REMOTE}"):
        _push(tmp_path, PublishConfig(), REMOTE, TOKEN, "v1")
    monkeypatch.setenv("HF_ENDPOINT", REMOTE)
    with pytest.raises(StageError, match=rf"^refusing to send the Hub token to {REMOTE}"):
        _materialize("hub:acme/tickets")


# --- the repos, a scripted server -----------------------------------------------------------------------------


def _release(folder: Path, **lineage_changes: Any) -> dict[str, str]:
    """Write a loraforge release into `folder` (adapter, tokenizer, two GGUF files, card, lineage); returns the
    lineage's file hashes."""
    files = {
        "adapter_config.json": json.dumps({"base_model_name_or_path": "tiny-base", "peft_type": "LORA"}).encode(),
        "adapter_model.safetensors": b"\0safetensors" + os.urandom(64),  # binary: goes through LFS
        "tokenizer.json": b'{"version": "1.0"}',
        "gguf/t-Q4_K_M.gguf": b"GGUF\0" + os.urandom(32),
        "gguf/t-Q8_0.gguf": b"GGUF\0" + os.urandom(32),
    }
    hashes = {}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        hashes[name] = hashlib.sha256(data).hexdigest()
    adapter_sha = hashes["adapter_model.safetensors"]
    lineage: dict[str, Any] = {"pipeline": "t", "tag": TAG, "files": hashes, "train": {"adapter_sha256": adapter_sha},
                               "base_model": {"base_model": "tiny-base"}, **lineage_changes}  # fmt: skip
    (folder / "loraforge").mkdir(exist_ok=True)
    (folder / "loraforge" / "lineage.json").write_text(json.dumps(lineage))
    (folder / "README.md").write_text(f"---\nlicense: apache-2.0\n---\n# t\n\nadapter sha256: `{adapter_sha}`\n")
    return hashes


def _publish(api: HfApi, repo: str, folder: Path, private: bool = False, tag: str | None = TAG) -> str:
    api.create_repo(repo, private=private)
    commit = str(api.upload_folder(repo_id=repo, folder_path=folder).oid)
    if tag:
        api.create_tag(repo, tag=tag, revision=commit)
    return commit


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Hub server with the repos of these tests: a release (public and private), a repo with no release,
    lineages that are not JSON or lack keys, and releases that lost a listed file after publishing."""
    from hub import hub_server

    with hub_server(tmp_path_factory.mktemp("hub") / "repos", TOKEN) as url:
        api = HfApi(endpoint=url, token=TOKEN)
        for repo, private in (("team/released", False), ("team/hidden", True)):
            _release(folder := tmp_path_factory.mktemp("release"))
            _publish(api, repo, folder, private)
        api.create_repo("team/plain")
        api.upload_file(path_or_fileobj=b"# not a loraforge repo\n", path_in_repo="README.md", repo_id="team/plain")
        _release(folder := tmp_path_factory.mktemp("release"))
        (folder / "loraforge" / "lineage.json").write_text('{"pipeline": "t", "files": {')  # cut short
        _publish(api, "team/not-json", folder)
        _release(folder := tmp_path_factory.mktemp("release"), tag=7, files=["adapter_model.safetensors"])
        lineage = json.loads((folder / "loraforge" / "lineage.json").read_text())
        (folder / "loraforge" / "lineage.json").write_text(
            json.dumps({k: v for k, v in lineage.items() if k != "train"})
        )
        _publish(api, "team/bad-keys", folder)
        _release(folder := tmp_path_factory.mktemp("release"))
        _publish(api, "team/lost-files", folder)
        api.delete_file("tokenizer.json", repo_id="team/lost-files")
        api.delete_file("gguf/t-Q8_0.gguf", repo_id="team/lost-files")
        yield url


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries without the backoff's seconds."""
    monkeypatch.setattr(hubclient, "RETRY_DELAYS", (0.0, 0.0, 0.0))


def _compare(spec: str, endpoint: str) -> dict[str, Any]:
    return _resolve_published(EvalConfig(compare_published=spec, endpoint=endpoint, gate=GATE))


class Scripted(http.server.ThreadingHTTPServer):
    """An HTTP server on loopback answering each request with the next scripted (status, headers, JSON body) and
    the last one from then on; `paths` records what was asked."""

    def __init__(self, answers: list[tuple[int, dict[str, str], Any]]) -> None:
        self.answers, self.paths = answers, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
                server: Scripted = self.server  # type: ignore[assignment]
                server.paths.append(self.path)
                status, headers, body = server.answers.pop(0) if len(server.answers) > 1 else server.answers[0]
                data = json.dumps(body).encode()
                self.send_response(status)
                for name, value in {**headers, "Content-Type": "application/json"}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> Scripted:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *args: object) -> None:
        self.shutdown()
        self.server_close()


NOT_FOUND = (404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, {"error": "no"})
WHOAMI = (200, {}, {"type": "user", "name": "me", "auth": {}})


# --- the published comparison: skip only on a confirmed "no loraforge release yet" ----------------------------


def test_a_release_resolves_to_its_commit(hub: str, token: str) -> None:
    commit = HfApi(endpoint=hub, token=TOKEN).model_info("team/released").sha
    assert _compare("team/released", hub)["commit"] == commit
    assert _compare(f"team/released@{TAG}", hub)["commit"] == commit
    hidden = HfApi(endpoint=hub, token=TOKEN).model_info("team/hidden").sha
    assert _compare("team/hidden", hub)["commit"] == hidden  # private: readable with the token


def test_confirmed_absence_skips_the_published_checks(hub: str, token: str, capsys: pytest.CaptureFixture) -> None:
    assert _compare("team/never-published", hub)["commit"] is None  # the Hub accepts the token, knows no such repo
    assert "does not exist at" in capsys.readouterr().out
    assert _compare("team/plain", hub)["commit"] is None  # the repo exists, with no lineage and no loraforge tag
    assert "no loraforge release yet" in capsys.readouterr().out


def test_no_such_repo_without_a_token_is_not_absence(hub: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    for repo in ("team/hidden", "team/never-published"):  # a private release and a missing repo look the same
        with pytest.raises(StageError) as error:
            _compare(repo, hub)
        message = str(error.value)
        assert message.startswith(f"eval.compare_published={repo}: {hub} knows no such repo, but no token was sent")
        assert "set HF_TOKEN or run `hf auth login`" in message


def test_a_refused_token_fails_with_the_fix(hub: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_revoked_token")
    for repo in ("team/released", "team/never-published"):
        with pytest.raises(StageError) as error:
            _compare(repo, hub)
        message = str(error.value)
        assert f"the Hub at {hub} refused the token (401: invalid or expired)" in message
        assert "check HF_TOKEN / `hf auth login`" in message and "hf_revoked_token" not in message


def test_a_missing_revision_of_a_released_repo_fails(hub: str, token: str) -> None:
    with pytest.raises(StageError) as error:
        _compare("team/released@loraforge-typo", hub)
    assert str(error.value) == (
        f"eval.compare_published=team/released@loraforge-typo: team/released has no revision 'loraforge-typo' at "
        f"{hub}, but it has loraforge releases ({TAG}, main); name one of them after '@', or drop "
        "'@loraforge-typo' to compare with main."
    )
    assert _compare("team/plain@v1", hub)["commit"] is None  # no release at all: nothing to compare with yet


@pytest.mark.parametrize(
    ("repo", "problem"),
    [
        ("team/not-json", "loraforge/lineage.json is not valid JSON (Expecting property name"),
        (
            "team/bad-keys",
            "loraforge/lineage.json is malformed ('tag' is int, not a string; 'files' is list, not "
            "an object; no 'train')",
        ),
    ],
)
def test_a_malformed_published_lineage_fails(hub: str, token: str, repo: str, problem: str) -> None:
    with pytest.raises(StageError) as error:
        _compare(repo, hub)
    message = str(error.value)
    assert message.startswith(f"eval.compare_published={repo} ({repo}@") and problem in message
    assert message.endswith("republish the version (`loraforge stage publish CONFIG`) or use another revision.")


def test_the_published_adapter_must_match_its_lineage(hub: str, token: str, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub, token=TOKEN)
    _release(folder := tmp_path / "release")
    _publish(api, "team/altered", folder, tag=None)
    base = Artifact(
        "base", "k", tmp_path, {"base_model": "tiny-base", "model_path": str(tmp_path), "fingerprint": "f" * 64}
    )
    published = _compare("team/altered", hub)
    assert (Path(_download_adapter(published, base)) / "adapter_model.safetensors").is_file()
    api.upload_file(
        path_or_fileobj=b"\0other weights", path_in_repo="adapter_model.safetensors", repo_id="team/altered"
    )
    with pytest.raises(StageError, match=r"team/altered@\w{12}: adapter_model.safetensors has sha256 \w{16}…, its "
                       r"lineage says \w{16}…; the published files were changed after publishing"):  # fmt: skip
        _download_adapter(_compare("team/altered", hub), base)


def test_server_errors_are_retried_then_fail(token: str, capsys: pytest.CaptureFixture) -> None:
    with Scripted([(503, {}, {"error": "overloaded"})]) as hub, pytest.raises(StageError) as error:
        _compare("team/released", hub.url)
    assert str(error.value).startswith(
        f"eval.compare_published=team/released: the Hub at {hub.url} failed with a server error (503) after 4 "
        "tries: try again later"
    )
    assert len(hub.paths) == 4 and capsys.readouterr().out.count("trying again") == 3


def test_a_flaky_hub_is_retried_until_it_answers(token: str) -> None:
    flaky = [(502, {}, {}), (503, {}, {}), NOT_FOUND, (500, {}, {}), WHOAMI]  # repo lookup, then the token check
    with Scripted(flaky) as hub:
        assert _compare("team/never-published", hub.url)["commit"] is None
    assert [p.split("?")[0] for p in hub.paths] == [*["/api/models/team/never-published"] * 3,
                                                    *["/api/whoami-v2"] * 2]  # fmt: skip


def test_a_forbidden_token_fails_with_the_fix(token: str) -> None:
    forbidden = (403, {"X-Error-Message": "Forbidden"}, {"error": "Forbidden"})
    with Scripted([forbidden]) as hub, pytest.raises(StageError) as error:
        _compare("team/released", hub.url)
    assert str(error.value).startswith(
        f"eval.compare_published=team/released: the Hub at {hub.url} refused access with this token (403: it lacks "
        "the permission"
    )
    assert len(hub.paths) == 1  # not retried: trying again cannot help


def test_an_unreachable_hub_is_retried_then_fails(token: str, capsys: pytest.CaptureFixture) -> None:
    from hub import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(StageError) as error:
        _compare("team/released", endpoint)
    message = str(error.value)
    assert message.startswith(f"eval.compare_published=team/released: cannot reach {endpoint} after 4 tries (")
    assert message.endswith("check HF_ENDPOINT / the endpoint setting and the network.")
    assert capsys.readouterr().out.count("trying again") == 3


def test_eval_refuses_plain_http_off_loopback(token: str) -> None:
    with pytest.raises(StageError, match=rf"^refusing to send the Hub token to {REMOTE}"):
        _compare("team/released", REMOTE)


# --- pull: every listed file, a well-formed lineage -----------------------------------------------------------


def test_pull_verifies_every_file_of_a_release(hub: str, token: str) -> None:
    item = _download("team/released", hub, None)
    assert sorted(item.verified) == ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json"]
    gguf = _download(f"team/released@{TAG}", hub, "q4_k_m")
    assert {"gguf/t-Q4_K_M.gguf", "gguf/t-Q8_0.gguf"} <= set(gguf.verified)  # (+ what the cache's snapshot has)


def test_pull_refuses_a_release_that_lost_listed_files(hub: str, token: str) -> None:
    with pytest.raises(StageError) as error:
        pull(["team/lost-files"], ["hello"], endpoint=hub)
    message = str(error.value)
    assert message.startswith("pull team/lost-files (team/lost-files@") and "verification failed" in message
    assert "tokenizer.json: listed in the lineage but missing from the repo" in message
    assert "t-Q8_0" not in message  # not asked for: an adapter pull does not download GGUF files
    with pytest.raises(StageError, match=r"gguf/t-Q8_0.gguf: listed in the lineage but missing from the repo"):
        pull(["team/lost-files"], ["hello"], gguf="q4_k_m", endpoint=hub)


@pytest.mark.parametrize(
    ("repo", "problem"),
    [
        ("team/not-json", "loraforge/lineage.json is not valid JSON (Expecting property name"),
        ("team/bad-keys", "loraforge/lineage.json is malformed ('tag' is int, not a string; "),
    ],
)
def test_pull_names_the_repo_and_file_of_a_malformed_lineage(hub: str, token: str, repo: str, problem: str) -> None:
    with pytest.raises(StageError) as error:
        pull([repo], ["hello"], endpoint=hub)
    assert str(error.value).startswith(f"pull {repo} ({repo}@") and problem in str(error.value)


def test_pull_explains_a_refused_token(hub: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_revoked_token")
    with pytest.raises(StageError) as error:
        pull(["team/released"], ["hello"], endpoint=hub)
    assert str(error.value) == (
        f"pull team/released: cannot download from {hub}: the Hub at {hub} refused the token (401: invalid or "
        "expired): check HF_TOKEN / `hf auth login` (or the Prefect Secret block named by publish.token_secret)."
    )


def test_pull_refuses_plain_http_off_loopback(token: str) -> None:
    with pytest.raises(StageError, match=rf"^refusing to send the Hub token to {REMOTE}"):
        pull(["team/released"], ["hello"], endpoint=REMOTE)
