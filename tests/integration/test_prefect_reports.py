"""What the pipeline shows in Prefect: live training progress, the training curve and the data report; how a
stage's flow run ends: Cached for a cache hit, TimedOut past orchestration.stage_timeout_s. (A pipeline run's
task runs, Completed then Cached on a re-run, are checked in test_pipeline.py's second run.)"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from pathlib import Path

import pytest
from pipeline_fixtures import _config

from loraforge.tasks.config import DEMO_CONFIG, load_config

pytestmark = pytest.mark.integration


def _latest(key: str) -> object:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read() -> object:
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
            return max(found, key=lambda a: a.created) if found else None

    return asyncio.run(read())


def test_training_progress_curve_and_data_report_reach_prefect(first_run: dict) -> None:
    assert not first_run["stages"]["train"]["cached"]
    progress = _latest("train-progress")
    assert progress is not None and progress.type == "progress" and float(progress.data) == 100.0
    history = _latest("train-history")
    assert history is not None
    rows = json.loads(history.data) if isinstance(history.data, str) else history.data
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "rss_mb"} <= set(rows[-1])
    report = _latest("data-report")
    assert report is not None and "train" in str(report.data)


def test_a_stage_flow_that_was_a_cache_hit_ends_cached(
    first_run: dict, tiny_model: Path, workdir: Path, hub: str, tmp_path: Path
) -> None:
    """Each stage flow (what a deployment runs) on the first run's store: a `Cached` run, the same result."""
    from loraforge.flows.stages import STAGE_FLOWS, base_flow

    config = _config(tiny_model, workdir, hub)
    from loraforge.tasks.registry import stage as declared

    keys = {stage: info["key"] for stage, info in first_run["stages"].items()}
    for stage, stage_flow in STAGE_FLOWS.items():
        inputs = {name: keys[name] for name in declared(stage).inputs}
        state = stage_flow(config=config, inputs=inputs, return_state=True)
        assert (state.type.value, state.name) == ("COMPLETED", "Cached"), (stage, state)
        assert state.result() == {"stage": stage, "key": keys[stage], "cached": True}
    fresh = base_flow(config=config.model_copy(update={"store": str(tmp_path / "store")}), return_state=True)
    assert fresh.name == "Completed" and fresh.result()["cached"] is False


def test_a_stage_flow_past_its_timeout_ends_timed_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The base stage downloading from a Hub that never answers: the flow run stops itself at stage_timeout_s."""
    from loraforge.flows.stages import base_flow

    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers a request
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        # Without the limit the download waits for ever: resetting the connections after 60 s ends it (Failed).
        reset = threading.Timer(60, silent.close)
        reset.start()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        config = load_config(DEMO_CONFIG, ["base_model=loraforge/never-answers", f"store={tmp_path / 'store'}",
                                           "orchestration.stage_timeout_s=1"])  # fmt: skip
        try:
            state = base_flow(config=config, return_state=True)
        finally:
            reset.cancel()
    assert (state.type.value, state.name) == ("FAILED", "TimedOut"), state
    assert "ran past orchestration.stage_timeout_s=1 s" in str(state.message)
