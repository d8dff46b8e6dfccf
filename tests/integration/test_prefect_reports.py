"""What the pipeline shows in Prefect: live training progress, the training curve and the data report."""

from __future__ import annotations

import asyncio
import json

import pytest

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
