"""The pipeline against a real `prefect server start` (not the temporary in-process one): the flow run and the
eval report artifacts are recorded on that server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.config import DEMO_CONFIG

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from hub import prefect_server

    with prefect_server(tmp_path_factory.mktemp("prefect-home")) as api:
        yield api


def test_pipeline_runs_against_a_prefect_server(prefect_api: str, tiny_model: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    cmd = [sys.executable, "-m", "flows.cli", "run", str(DEMO_CONFIG), f"base_model={tiny_model}",
           f"store={tmp_path / 'store'}", "eval.gate=[loss_delta < 0]", "eval.max_rows=8", "data.max_rows=48",
           "quantize.types=[q8_0]", "quantize.probe_rows=2", "merge.probe_rows=2", "publish.include_gguf=[q8_0]",
           "publish.push=never"]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "gate: PASSED" in result.stdout

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        assert [(r.flow_name if hasattr(r, "flow_name") else None, r.state_name) for r in runs][0][1] == "Completed"
        assert len(runs) == 1
        keys = {a.key for a in client.read_artifacts()}
    assert {"data-report", "train-history", "eval-report", "eval-metrics", "gguf-fidelity"} <= keys
