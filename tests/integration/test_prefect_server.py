"""The pipeline against a real `prefect server start` (not the temporary one a CLI run starts for itself): the
flow run and the eval report artifacts are recorded on that server (the session's, tests/integration/conftest.py)."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraforge.tasks.artifacts import ArtifactStore
from loraforge.tasks.config import DEMO_CONFIG

pytestmark = pytest.mark.integration


def test_pipeline_runs_against_a_prefect_server(prefect_api: str, tiny_model: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "loraforge.flows.cli", "run", str(DEMO_CONFIG), f"base_model={tiny_model}",
           f"store={store}", "eval.gate=[loss_delta < 0]", "eval.max_rows=8", "data.max_rows=48",
           "quantize.types=[q8_0]", "quantize.probe_rows=2", "merge.probe_rows=2", "publish.include_gguf=[q8_0]",
           "publish.push=never"]  # fmt: skip
    started = dt.datetime.now(dt.UTC)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "gate: PASSED" in result.stdout

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterId,
        FlowRunFilterStartTime,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    flow_run_id = ArtifactStore(store).load_run("latest")["flow_run_id"]
    with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        # The server is the session's: what this run recorded is what started after it began, of no deployment.
        since = FlowRunFilter(start_time=FlowRunFilterStartTime(after_=started),
                              deployment_id=FlowRunFilterDeploymentId(is_null_=True))  # fmt: skip
        runs = client.read_flow_runs(flow_run_filter=since)
        assert [(str(r.id), r.state_name) for r in runs] == [(flow_run_id, "Completed")]  # stages are tasks of one run
        this_run = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        keys = {a.key for a in client.read_artifacts(flow_run_filter=this_run)}
    assert {"data-report", "train-history", "eval-report", "eval-metrics", "gguf-fidelity"} <= keys
