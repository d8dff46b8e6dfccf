"""Hub tokens: looked up like huggingface_hub does (after a named Prefect Secret block), and never sent over plain
http off this machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# huggingface_hub reads HF_HUB_DISABLE_XET once, when imported; the server speaks LFS, not Xet.
os.environ["HF_HUB_DISABLE_XET"] = "1"

from huggingface_hub import constants  # noqa: E402

from tasks.errors import StageError  # noqa: E402
from tasks.hubclient import check_transport, hub_token, is_loopback  # noqa: E402

TOKEN = "hf_trust_test_token"
REMOTE = "http://hub.invalid:8765"  # plain http off loopback (.invalid never resolves: nothing may connect first)


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
    from tasks.data import _materialize
    from tasks.publish import PublishConfig, _push

    with pytest.raises(StageError, match=rf"^refusing to send the Hub token to {REMOTE}"):
        _push(tmp_path, PublishConfig(), REMOTE, TOKEN, "v1")
    monkeypatch.setenv("HF_ENDPOINT", REMOTE)
    with pytest.raises(StageError, match=rf"^refusing to send the Hub token to {REMOTE}"):
        _materialize("hub:acme/tickets")
