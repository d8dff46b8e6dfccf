"""The Hub push through a Hub that fails for a while: transient failures (5xx, 429, a connection closed without an
answer) are retried with growing waits, a bounded number of times, each retry printed; a refused token, any other
4xx and a failed gate are never retried.

The Hub is the project's server (infra/hub/server.py, a subprocess on loopback) behind `Flaky` (tests/flaky.py), a
small proxy that answers the first requests with scripted failures and forwards the rest unchanged."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flaky import DROP, Flaky
from huggingface_hub import HfApi

from loraforge.tasks import hubclient
from loraforge.tasks.artifacts import Artifact, ArtifactStore
from loraforge.tasks.errors import GateFailed, StageError
from loraforge.tasks.publish import PublishConfig, _push, publish_model

TOKEN = "hf_retry_test_token"
DELAYS = (0.1, 0.2, 0.4)  # RETRY_DELAYS for these tests: the same growth as (1, 3, 9), in less time


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from hub import hub_server

    with hub_server(tmp_path_factory.mktemp("hub") / "repos", TOKEN) as url:
        yield url


@pytest.fixture(autouse=True)
def short_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hubclient, "RETRY_DELAYS", DELAYS)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """A bundle with a text file and a binary one (binary files go up through the LFS batch API and a PUT)."""
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "README.md").write_text("# retried\n")
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 64)
    return folder


def test_a_push_through_a_flaky_hub_is_retried_with_growing_waits(
    hub: str, bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Flaky(hub, [503, 429, DROP]) as flaky:
        started = time.monotonic()
        commit = _push(bundle, PublishConfig(repo_id="team/flaky", endpoint=flaky.url), flaky.url, TOKEN, "v1")
        took = time.monotonic() - started
    assert flaky.seen[:4] == ["POST /api/repos/create"] * 4  # the same call, until it got through
    retries = [line for line in capsys.readouterr().out.splitlines() if "trying again" in line]
    assert [line.split(": ", 1)[1] for line in retries] == [
        "503 (try 1); trying again in 0.1 s",
        "429 (try 2); trying again in 0.2 s",
        "RemoteProtocolError (try 3); trying again in 0.4 s",
    ]
    assert took >= sum(DELAYS)
    refs = HfApi(endpoint=hub, token=TOKEN).list_repo_refs("team/flaky")
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", commit)]  # the push landed, tagged


def test_a_hub_that_stays_down_fails_after_the_last_try(
    hub: str, bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Flaky(hub, [502] * 10) as flaky, pytest.raises(StageError) as error:
        _push(bundle, PublishConfig(repo_id="team/down", endpoint=flaky.url), flaky.url, TOKEN, "v1")
    assert str(error.value).startswith(
        f"push to {flaky.url}/team/down failed: the Hub at {flaky.url} failed with a server error (502) after 4 tries"
    )
    assert len(flaky.seen) == len(DELAYS) + 1
    assert capsys.readouterr().out.count("trying again") == len(DELAYS)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
def test_a_refusal_is_not_retried(status: int, hub: str, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Flaky(hub, [status]) as flaky, pytest.raises(StageError, match=f"push to {flaky.url}/team/refused failed"):
        _push(bundle, PublishConfig(repo_id="team/refused", endpoint=flaky.url), flaky.url, TOKEN, "v1")
    # Made once (huggingface_hub itself may look the repo up after a refused create: another call)
    assert flaky.seen.count("POST /api/repos/create") == 1, flaky.seen
    assert "trying again" not in capsys.readouterr().out


def test_a_wrong_token_is_refused_once(hub: str, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Flaky(hub, []) as flaky, pytest.raises(StageError) as error:
        _push(bundle, PublishConfig(repo_id="team/other", endpoint=flaky.url), flaky.url, "hf_wrong", "v1")
    assert f"the Hub at {flaky.url} refused the token (401: invalid or expired)" in str(error.value)
    assert flaky.seen.count("POST /api/repos/create") == 1, flaky.seen  # the real server's 401, not retried
    assert "trying again" not in capsys.readouterr().out


def test_a_failed_gate_sends_nothing_and_is_not_retried(
    hub: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loraforge.flows.pipeline import IN_PROCESS

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    failed = {"passed": False, "checks": [{"check": "accuracy >= 0.9", "value": 0.5, "passed": False}]}
    stages = ("base", "data", "train", "merge", "quantize")
    inputs = {s: Artifact(s, f"{s}-key", tmp_path, {"stage": s}) for s in stages}
    eval_ = Artifact("eval", "eval-key", tmp_path, {"stage": "eval", "gate": failed})
    with Flaky(hub, []) as flaky, pytest.raises(GateFailed, match="publish refused: eval gate failed"):
        config = PublishConfig(repo_id="team/gated", endpoint=flaky.url, push="always")
        publish_model(config, "x", False, inputs["base"], inputs["data"], inputs["train"], eval_, inputs["merge"],
                      inputs["quantize"], ArtifactStore(tmp_path / "store"))  # fmt: skip
    assert flaky.seen == []
    assert IN_PROCESS["publish"].retries == 0  # nor does Prefect run the stage again


def test_a_try_the_client_already_retried_at_length_is_not_tried_again(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """huggingface_hub retries its uploads and commits itself (~23 s against a Hub that does not answer): a try
    that took longer than SLOW_TRY_S is not tried again (four such tries took 105 s); a quick failure still is."""
    monkeypatch.setattr(hubclient, "SLOW_TRY_S", 0.2)
    calls: list[float] = []

    def failing(pause: float) -> None:
        calls.append(time.monotonic())
        time.sleep(pause)
        raise ConnectionError("connection refused")

    with pytest.raises(ConnectionError):
        hubclient.with_retries(lambda: failing(0.3), "push team/slow")
    assert len(calls) == 1
    assert "(try 1) after 0 s of huggingface_hub's own retries; not tried again" in capsys.readouterr().out
    calls.clear()
    with pytest.raises(ConnectionError):
        hubclient.with_retries(lambda: failing(0.0), "push team/quick")
    assert len(calls) == len(DELAYS) + 1
